"""Named training recipes: configs as code, one dict per recipe on top of `TrainConfig`'s defaults.

`get_recipe(name, **overrides)` returns a `TrainConfig`; `smoke(cfg)` shrinks any recipe to a
seconds-long run (a tiny model, a handful of steps) for testing a setup end to end.
"""

from __future__ import annotations

from typing import Any

from vlmkit.config import override
from vlmkit.errors import ConfigError
from vlmkit.train.loop import TrainConfig

# CPU recipes are tuned to learn fast from small data within minutes: a convolutional stem (far more
# sample-efficient than a linear patch projection), a short warmup, and moderate crops so that what the
# caption names stays in the picture. GPU recipes follow the published CLIP/SigLIP setups.
RECIPES: dict[str, dict[str, Any]] = {
    "clip-tiny": dict(
        model="clip-tiny",
        model_overrides={"vision.stem": "conv"},
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=50,
        epochs=60,
        crop_scale=(0.7, 1.0),
        eval_every=100,
        save_every=200,
    ),
    "siglip-tiny": dict(
        model="siglip-tiny",
        model_overrides={"vision.stem": "conv"},
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=50,
        epochs=60,
        crop_scale=(0.7, 1.0),
        eval_every=100,
        save_every=200,
    ),
    "clip-small": dict(
        model="clip-small",
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=100,
        epochs=40,
        crop_scale=(0.6, 1.0),
        eval_every=200,
        save_every=500,
    ),
    "clip-B-32": dict(
        model="clip-B-32",
        batch_size=4096,
        lr=5e-4,
        weight_decay=0.2,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=49408,
    ),
    "clip-B-16": dict(
        model="clip-B-16",
        batch_size=4096,
        lr=5e-4,
        weight_decay=0.2,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=49408,
        grad_checkpointing=True,
    ),
    "siglip-B-16": dict(
        model="siglip-B-16",
        batch_size=4096,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=32000,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        grad_checkpointing=True,
    ),
}


def list_recipes() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str, **overrides: Any) -> TrainConfig:
    """The recipe's TrainConfig with `overrides` (field names, or dotted `model_overrides.x`) applied."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    cfg = TrainConfig(**RECIPES[name])
    return override(cfg, overrides, where=f"recipe {name}") if overrides else cfg


def smoke(cfg: TrainConfig) -> TrainConfig:
    """A seconds-long version of any recipe: a tiny model and a few steps (big_vision's `runlocal`)."""
    family = cfg.model.split("-")[0]
    small = {
        "vision.image_size": 32,
        "vision.layers": 1,
        "text.layers": 1,
        "vision.width": 64,
        "text.width": 64,
        "vision.heads": 2,
        "text.heads": 2,
        "text.context_length": 16,
    }
    if family == "siglip":
        small["embed_dim"] = 64
    else:
        small["embed_dim"] = 32
    return override(
        cfg,
        {
            "model": f"{family}-tiny",
            "model_overrides": {**cfg.model_overrides, **small},
            "batch_size": 8,
            "max_steps": 6,
            "warmup_steps": 2,
            "eval_every": 3,
            "save_every": 3,
            "log_every": 1,
            "num_workers": 0,
            "grad_checkpointing": False,
            "vocab_size": 512,
        },
    )
