"""Scores of image-text pairs from any model, the way each family can score one: dual encoders by the cosine
of the two embeddings, fusion models by ITM (the log-odds of "match") or their ITC cosine, generative models
(CoCa, LLaVA) by the caption's log-likelihood given the image. The compositional benchmark
(`vlmkit.eval.compositional`) and, later, a server call it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.errors import ConfigError
from vlmkit.eval.features import _autocast, eval_mode
from vlmkit.inference.generate import VLMPipeline
from vlmkit.models.registry import model_family

ScoreFn = Callable[[list[Path], list[str]], list[float]]


def pair_scorer(
    model,
    tokenizer,
    preprocess,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    scorer: str | None = None,
) -> tuple[str, ScoreFn]:
    """(name, score function) for a loaded model: see the module docstring. `scorer` picks among a model's
    options ("itm" or "itc" for fusion models)."""
    family = model_family(model.cfg)
    transform = ImageTransform(preprocess, train=False)
    device = torch.device(device)
    choices = {
        "fusion": ("itm", "itc"),
        "clip": ("cosine",),
        "coca": ("likelihood",),
        "llava": ("likelihood",),
    }
    options = choices.get(family, ())
    name = scorer or (options[0] if options else None)
    if name not in options:
        raise ConfigError(
            f"a {family} model scores pairs by {' or '.join(options) or 'nothing'}, not {scorer!r}"
        )
    if family == "fusion" and name == "itm" and not hasattr(model, "itm_head"):
        raise ConfigError("this model has no ITM head")

    def pixels(paths: list[Path]) -> torch.Tensor:
        return torch.stack([transform(load_image(p)) for p in paths]).to(device)

    if name == "likelihood":
        pipe = VLMPipeline(model, tokenizer, preprocess, device=device, precision="bf16" if bf16 else "fp32")
        return name, lambda paths, texts: pipe.log_likelihood(paths, texts).tolist()

    @torch.no_grad()
    def score(paths: list[Path], texts: list[str]) -> list[float]:
        unique = list(dict.fromkeys(paths))
        with eval_mode(model), _autocast(device, bf16):
            tokens = tokenizer(texts).to(device)
            which = torch.tensor([unique.index(p) for p in paths], device=device)
            if name == "itm":
                image_tokens = model.encode_image_tokens(pixels(unique))[which]
                logits = model.itm_logits(tokens, image_tokens).float()
                return (logits[:, 1] - logits[:, 0]).tolist()
            image = F.normalize(model.encode_image(pixels(unique)).float(), dim=-1)[which]
            text = F.normalize(model.encode_text(tokens).float(), dim=-1)
            return (image * text).sum(dim=-1).tolist()

    return name, score


__all__ = ["ScoreFn", "pair_scorer"]
