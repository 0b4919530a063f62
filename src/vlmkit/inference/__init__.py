"""Inference: embeddings and zero-shot classification with dual encoders, generation with CoCa and LLaVA.
The CLI and a server call these."""

from vlmkit.inference.embed import classify, embed_images, embed_texts
from vlmkit.inference.generate import VLMPipeline

__all__ = ["VLMPipeline", "classify", "embed_images", "embed_texts"]
