"""Embeddings and zero-shot classification with a dual encoder (CLIP, SigLIP, FLIP, or CoCa's contrastive
side): what `vlmkit embed` and `vlmkit classify` run, and what a server calls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.transforms import ImageDecodeError, ImageTransform, load_image
from vlmkit.errors import DataError
from vlmkit.eval.features import encode_images, extract_text_features
from vlmkit.runtime import Precision


def image_batch(images: Sequence[str | Path | Image.Image], transform: ImageTransform) -> torch.Tensor:
    """Paths (decoded with `load_image`) or PIL images -> `transform`ed and stacked: (B, 3, S, S)."""
    return torch.stack([transform(load_image(im) if isinstance(im, (str, Path)) else im) for im in images])


def load_images(images: Sequence[str | Path | Image.Image], preprocess) -> torch.Tensor:
    """Paths or PIL images -> the evaluation transform's (B, 3, S, S) tensor; a file that cannot be decoded
    is a DataError naming it."""
    try:
        return image_batch(images, ImageTransform(preprocess, train=False))
    except ImageDecodeError as e:
        raise DataError(str(e)) from e


def embed_images(
    model, preprocess, images, device: torch.device, precision: Precision, batch_size: int = 64
) -> torch.Tensor:
    """(N, D) unit-norm float32 image embeddings of paths or PIL images, in batches."""
    return encode_images(model, load_images(images, preprocess), batch_size, device, precision.bf16)


def embed_texts(
    model, tokenizer, texts: Sequence[str], device: torch.device, precision: Precision
) -> torch.Tensor:
    """(N, D) unit-norm float32 text embeddings."""
    return extract_text_features(model, tokenizer, list(texts), device=device, bf16=precision.bf16)


@torch.no_grad()
def classify(
    model,
    tokenizer,
    preprocess,
    image,
    labels: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    precision: Precision,
) -> list[tuple[str, float]]:
    """Zero-shot classification of one image among `labels` (prompts from `templates`): (label, probability)
    pairs, most likely first. Probabilities are a softmax over the labels, or for a model trained with a
    sigmoid loss (SigLIP) each label's own sigmoid."""
    from vlmkit.eval.zeroshot import build_zeroshot_classifier

    clf = build_zeroshot_classifier(
        model, tokenizer, list(labels), list(templates), device=device, bf16=precision.bf16
    )  # (D, C) on the CPU
    feats = embed_images(model, preprocess, [image], device, precision)  # (1, D)
    probs = label_probabilities(model, feats, clf.T)[0]
    return [(labels[i], probs[i].item()) for i in probs.argsort(descending=True).tolist()]


def label_probabilities(model, image_features: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities of C labels for N images from unit-norm CPU features (N, D) and (C, D): a softmax
    over the labels, or for a model trained with a sigmoid loss (SigLIP) each label's own sigmoid."""
    scale, bias = (v.detach().float().cpu() if v is not None else None for v in model.scale_and_bias())
    logits = scale * image_features @ label_features.T  # (N, C)
    return torch.sigmoid(logits + bias) if bias is not None else logits.softmax(dim=-1)
