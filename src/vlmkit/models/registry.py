"""One table of sizes per kind of model, one `create_model(name, **overrides)`.

Names are `<family>-<size>`:
- dual encoders: families `clip` and `siglip`; sizes `tiny` and `small` for CPU, `B-32`, `B-16`, `L-14`
  (and `so400m-14` for SigLIP) for GPUs;
- generative models: families `coca` (dual encoder + captioning decoder) and `llava` (vision tower ->
  projector -> Llama-style decoder); sizes `tiny` and `small` for CPU, `B-16` for GPUs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlmkit.config import from_dict, override
from vlmkit.errors import ConfigError
from vlmkit.models.clip import CLIP, CLIPConfig
from vlmkit.models.text import TextConfig
from vlmkit.models.vit import VisionConfig

# size -> (image_size, patch, vision width/layers/heads, text width/layers/heads, embed_dim, context_length)
SIZES: dict[str, dict[str, Any]] = {
    # tiny: 128 wide, so that the quickstart learns its 30 classes in minutes in fp32 on any CPU (192 wide
    # needed native bf16 for that; at 128 fp32 trains 1.6x the pairs per second and learns as much per step)
    "tiny": dict(image=64, patch=8, v=(128, 3, 2), t=(128, 2, 2), embed=128, ctx=32),
    "small": dict(image=96, patch=8, v=(384, 8, 6), t=(384, 6, 6), embed=384, ctx=48),
    "B-32": dict(image=224, patch=32, v=(768, 12, 12), t=(512, 12, 8), embed=512, ctx=77),
    "B-16": dict(image=224, patch=16, v=(768, 12, 12), t=(512, 12, 8), embed=512, ctx=77),
    "L-14": dict(image=224, patch=14, v=(1024, 24, 16), t=(768, 12, 12), embed=768, ctx=77),
    "so400m-14": dict(image=224, patch=14, v=(1152, 27, 16), t=(1152, 27, 16), embed=1152, ctx=64),
}

# size -> (image_size, patch, vision width/layers/heads, decoder width/layers/heads, embed_dim)
GENERATIVE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image=64, patch=8, v=(192, 3, 3), d=(256, 4, 4), embed=192),
    "small": dict(image=96, patch=8, v=(384, 8, 6), d=(512, 8, 8), embed=384),
    "B-16": dict(image=224, patch=16, v=(768, 12, 12), d=(768, 12, 12), embed=512),
}

FAMILIES = ("clip", "siglip")
GENERATIVE_FAMILIES = ("coca", "llava")


def _classes() -> dict[str, tuple[type, type]]:
    """family -> (config class, model class). Imported on first use: the generative model files import
    this package's building blocks, so importing them here at module level would be circular."""
    from vlmkit.models.coca import CoCa, CoCaConfig
    from vlmkit.models.llava import Llava, LlavaConfig

    return {"clip": (CLIPConfig, CLIP), "coca": (CoCaConfig, CoCa), "llava": (LlavaConfig, Llava)}


def config_class(family: str) -> type:
    """The config dataclass of a family ("clip", "coca", "llava"); ConfigError for others."""
    if family == "clip":
        return CLIPConfig
    classes = _classes()
    if family not in classes:
        raise ConfigError(f"unknown model family {family!r}; vlmkit has {', '.join(classes)}")
    return classes[family][0]


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


def _generative_spec(family: str, size: str) -> dict[str, Any]:
    """A CoCa / LLaVA config as a nested dict. Fields the config derives from others (the decoder's kv_heads,
    mlp_hidden, encoder_width) stay unset, so that overriding e.g. decoder.width re-derives them."""
    s = GENERATIVE_SIZES[size]
    (vw, vl, vh), (dw, dl, dh) = s["v"], s["d"]
    vision = dict(image_size=s["image"], patch_size=s["patch"], width=vw, layers=vl, heads=vh)
    if family == "coca":
        # CoCa: the first half of the decoder encodes text alone (the contrastive text tower), the second
        # half cross-attends to the image tokens (the captioner).
        decoder = dict(width=dw, layers=dl, heads=dh, max_seq_len=256, cross_attention_start=dl // 2)
        return dict(embed_dim=s["embed"], vision=vision, decoder=decoder)
    # LLaVA reads the vision tower's penultimate layer: its pooling head and projection are unused
    decoder = dict(width=dw, layers=dl, heads=dh, max_seq_len=1024)
    return dict(vision={**vision, "proj": False}, decoder=decoder)


def _merge(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` (dotted keys or nested dicts) applied to a nested dict, before it becomes a config."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = _merge(out[head], value)
        else:
            out[head] = value
    return out


def list_models() -> list[str]:
    return [f"{f}-{s}" for f in FAMILIES for s in SIZES] + [
        f"{f}-{s}" for f in GENERATIVE_FAMILIES for s in GENERATIVE_SIZES
    ]


def get_model_config(name: str, **overrides: Any) -> Any:
    """The config of a named model with overrides (dotted keys or nested dicts) applied."""
    family, _, size = name.partition("-")
    if family in FAMILIES and size in SIZES:
        cfg = _base_config(family, size)
    elif family in GENERATIVE_FAMILIES and size in GENERATIVE_SIZES:
        spec = _merge(_generative_spec(family, size), overrides)
        return from_dict(config_class(family), spec, where=name)
    else:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return override(cfg, overrides, where=name) if overrides else cfg


def build_model(cfg: Any) -> torch.nn.Module:
    """A randomly initialised model for a config (CLIPConfig, CoCaConfig or LlavaConfig)."""
    if type(cfg) is CLIPConfig:  # without importing the generative families
        return CLIP(cfg)
    for config_cls, model_cls in _classes().values():
        if type(cfg) is config_cls:
            return model_cls(cfg)
    raise TypeError(f"not a vlmkit model config: {type(cfg).__name__}")


def model_family(cfg: Any) -> str:
    """ "clip" (CLIP and SigLIP), "coca" or "llava": the key config.json records beside the config."""
    if type(cfg) is CLIPConfig:
        return "clip"
    for family, (config_cls, _) in _classes().items():
        if type(cfg) is config_cls:
            return family
    raise TypeError(f"not a vlmkit model config: {type(cfg).__name__}")


def create_model(name: str, **overrides: Any) -> torch.nn.Module:
    """Build a randomly initialised model by name, e.g. `create_model("clip-tiny", embed_dim=128)`."""
    return build_model(get_model_config(name, **overrides))
