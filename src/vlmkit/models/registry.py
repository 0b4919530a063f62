"""One table of sizes, one `create_model(name, **overrides)`.

Names are `<family>-<size>`: families `clip` and `siglip`; sizes `tiny` and `small` for CPU,
`B-32`, `B-16`, `L-14` (and `so400m-14` for SigLIP) for GPUs.
"""

from __future__ import annotations

import math
from typing import Any

from vlmkit.config import override
from vlmkit.errors import ConfigError
from vlmkit.models.clip import CLIP, CLIPConfig
from vlmkit.models.text import TextConfig
from vlmkit.models.vit import VisionConfig

# size -> (image_size, patch, vision width/layers/heads, text width/layers/heads, embed_dim, context_length)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image=64, patch=8, v=(192, 3, 3), t=(192, 2, 3), embed=192, ctx=32),
    "small": dict(image=96, patch=8, v=(384, 8, 6), t=(384, 6, 6), embed=384, ctx=48),
    "B-32": dict(image=224, patch=32, v=(768, 12, 12), t=(512, 12, 8), embed=512, ctx=77),
    "B-16": dict(image=224, patch=16, v=(768, 12, 12), t=(512, 12, 8), embed=512, ctx=77),
    "L-14": dict(image=224, patch=14, v=(1024, 24, 16), t=(768, 12, 12), embed=768, ctx=77),
    "so400m-14": dict(image=224, patch=14, v=(1152, 27, 16), t=(1152, 27, 16), embed=1152, ctx=64),
}

FAMILIES = ("clip", "siglip")


def _base_config(family: str, size: str) -> CLIPConfig:
    s = SIZES[size]
    (vw, vl, vh), (tw, tl, th) = s["v"], s["t"]
    vision = VisionConfig(image_size=s["image"], patch_size=s["patch"], width=vw, layers=vl, heads=vh)
    text = TextConfig(context_length=s["ctx"], width=tw, layers=tl, heads=th)
    if family == "clip":
        return CLIPConfig(embed_dim=s["embed"], vision=vision, text=text, loss="clip")
    # SigLIP: no class token, attention-pooled vision tower without projection, bidirectional text
    # read at its last token, tanh-GELU, eps 1e-6, and a sigmoid loss with a learnable bias.
    vision = VisionConfig(
        image_size=s["image"],
        patch_size=s["patch"],
        width=vw,
        layers=vl,
        heads=vh,
        act="gelu_tanh",
        norm_eps=1e-6,
        pool="attn",
        class_token=False,
        ln_pre=False,
        proj=False,
        patch_bias=True,
    )
    text = TextConfig(
        context_length=s["ctx"],
        width=tw,
        layers=tl,
        heads=th,
        act="gelu_tanh",
        norm_eps=1e-6,
        causal=False,
        pool="last",
        proj_bias=True,
    )
    return CLIPConfig(
        embed_dim=vw,
        vision=vision,
        text=text,
        loss="siglip",
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
    )


def list_models() -> list[str]:
    return [f"{f}-{s}" for f in FAMILIES for s in SIZES]


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """The config of a named model with overrides (dotted keys or nested dicts) applied."""
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cfg = _base_config(family, size)
    return override(cfg, overrides, where=name) if overrides else cfg


def create_model(name: str, **overrides: Any) -> CLIP:
    """Build a randomly initialised model by name, e.g. `create_model("clip-tiny", embed_dim=128)`."""
    return CLIP(get_model_config(name, **overrides))
