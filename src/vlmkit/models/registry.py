"""One registry of model families, one `create_model(name, **overrides)`.

Names are `<family>-<size>`. Each family is one row of `FAMILIES`: its config class, model class, size table,
a function from a size row to the config (as a nested dict), and the name of the task that trains it
(`vlmkit.tasks`). Adding a family is one model file, one row here and, if it trains differently, one task.

- dual encoders: `clip`, `siglip` and `flip` (CLIP trained with half its image patches dropped); sizes
  `tiny` and `small` for CPU, `B-32`, `B-16`, `L-14` (and `so400m-14`) for GPUs;
- generative models: `coca` (dual encoder + captioning decoder) and `llava` (vision tower -> projector ->
  Llama-style decoder); sizes `tiny` and `small` for CPU, `B-16` for GPUs;
- fusion encoder-decoders: `fusion` (ALBEF/BLIP: ITC, ITM, MLM, MIM, captioning); `tiny` for CPU, `B-16`
  (BLIP-base's shape) for GPUs;
- interleaved image-text models: `flamingo` (frozen vision tower -> Perceiver resampler -> an LM with gated
  cross-attention); `tiny` for CPU, `B` for GPUs;
- text-to-image: `dalle` (a VQ-VAE image tokenizer and a decoder LM over [caption][codes]); `tiny` (64 px,
  8x8 codes) for CPU, `B` (256 px, 16x16 codes) for GPUs; `flow` (a FiLM UNet in pixel space conditioned on a
  frozen CLIP text tower, trained by flow matching); `tiny` (32 px) for CPU, `B` (128 px) for GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.config import from_dict
from vlmkit.errors import ConfigError
from vlmkit.models.clip import CLIP, CLIPConfig
from vlmkit.models.coca import CoCa, CoCaConfig
from vlmkit.models.dalle import Dalle, DalleConfig
from vlmkit.models.flamingo import Flamingo, FlamingoConfig
from vlmkit.models.flow import FlowModel, FlowModelConfig
from vlmkit.models.fusion import Fusion, FusionConfig
from vlmkit.models.llava import Llava, LlavaConfig

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


# size -> (image_size, patch, vision / text width, layers, heads, the first text layer that reads the image,
# embed_dim, position embeddings); tiny: ALBEF's layout (text-only lower half) in pre-norm, which trains
# from scratch without care; B-16: BLIP-base (every layer cross-attends, post-norm BERT)
FUSION_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image=64, patch=8, v=(128, 3, 2), t=(128, 4, 2), start=2, embed=128, ctx=32, post_norm=False
    ),
    "B-16": dict(
        image=224, patch=16, v=(768, 12, 12), t=(768, 12, 12), start=0, embed=256, ctx=512, post_norm=True
    ),
}


# size -> (image_size, patch, vision width/layers/heads, decoder width/layers/heads, perceiver latents/depth,
# a gated cross-attention block every n LM layers). tiny: clip-tiny's tower, so a trained one can be frozen in;
# B: OpenFlamingo-3B's layout at ViT-B/16 (64 latents, depth 6; cross-attention every layer would double
# the LM; every 4th as in OpenFlamingo-9B)
FLAMINGO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image=64, patch=8, v=(128, 3, 2), d=(256, 4, 4), latents=(16, 2), every=1),
    "B": dict(image=224, patch=16, v=(768, 12, 12), d=(1024, 16, 16), latents=(64, 6), every=4),
}

# size -> (image_size, VQ-VAE channels per stage, codebook size, code dim, decoder width/layers/heads, max caption)
DALLE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image=64, vq=(32, 64, 128), codes=(512, 64), d=(256, 4, 4), text=32),
    "B": dict(image=256, vq=(64, 128, 256, 256), codes=(8192, 256), d=(768, 12, 12), text=64),
}


# size -> (image_size, UNet channels per resolution, the text tower's width/layers/heads/context, embed_dim,
# cross-attention to the caption's tokens).
# The text tower's config is replaced by the CLIP's a run takes it from (text_init_from); tiny matches
# clip-tiny's. tiny: the UNet that reached the lowest flow loss in a fixed CPU time (benchmarks/RESULTS.md).
FLOW_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(image=32, unet=(32, 64, 128), t=(128, 2, 2, 32), embed=128, cross=False),
    "B": dict(image=128, unet=(128, 256, 256, 512), t=(512, 12, 8, 77), embed=512, cross=True),
}


def _flow(s: dict) -> dict[str, Any]:
    (tw, tl, th, ctx) = s["t"]
    net = dict(image_size=s["image"], channels=s["unet"], embed_dim=max(128, s["unet"][0] * 2))
    text = dict(width=tw, layers=tl, heads=th, context_length=ctx)
    return dict(net=net, text=text, embed_dim=s["embed"], cross_attention=s["cross"])


def _dalle(s: dict) -> dict[str, Any]:
    (dw, dl, dh), (k, dim) = s["d"], s["codes"]
    grid = s["image"] // 2 ** len(s["vq"])
    return dict(
        vqvae=dict(image_size=s["image"], channels=s["vq"], codebook_size=k, code_dim=dim),
        decoder=dict(width=dw, layers=dl, heads=dh, max_seq_len=s["text"] + 2 + grid**2),
        max_text_len=s["text"],
    )


def _vision(s: dict, **extra: Any) -> dict[str, Any]:
    (w, layers, heads) = s["v"]
    return dict(image_size=s["image"], patch_size=s["patch"], width=w, layers=layers, heads=heads, **extra)


def _clip(s: dict) -> dict[str, Any]:
    (tw, tl, th) = s["t"]
    text = dict(context_length=s["ctx"], width=tw, layers=tl, heads=th)
    return dict(embed_dim=s["embed"], vision=_vision(s), text=text, loss="clip")


def _siglip(s: dict) -> dict[str, Any]:
    # No class token, an attention-pooled vision tower without projection, bidirectional text read at its
    # last token, tanh-GELU, eps 1e-6, and a sigmoid loss with a learnable bias.
    (tw, tl, th) = s["t"]
    vision = _vision(
        s,
        act="gelu_tanh",
        norm_eps=1e-6,
        pool="attn",
        class_token=False,
        ln_pre=False,
        proj=False,
        patch_bias=True,
    )
    text = dict(
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
    return dict(
        embed_dim=s["v"][0],
        vision=vision,
        text=text,
        loss="siglip",
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
    )


def _flip(s: dict) -> dict[str, Any]:
    # FLIP (Li et al., 2023): CLIP that sees a random half of each image's patches while training: twice the
    # pairs per second for little loss per pair. Off in evaluation; a last unmasked stage closes the gap.
    spec = _clip(s)
    spec["vision"]["patch_dropout"] = 0.5
    return spec


def _coca(s: dict) -> dict[str, Any]:
    # The first half of the decoder encodes text alone (the contrastive text tower), the second half
    # cross-attends to the image tokens (the captioner). Fields the config derives from others (the
    # decoder's kv_heads, mlp_hidden, encoder_width) stay unset, so that overriding a width re-derives them.
    (dw, dl, dh) = s["d"]
    decoder = dict(width=dw, layers=dl, heads=dh, max_seq_len=256, cross_attention_start=dl // 2)
    return dict(embed_dim=s["embed"], vision=_vision(s), decoder=decoder)


def _llava(s: dict) -> dict[str, Any]:
    # LLaVA reads the vision tower's hidden states: its pooling head and projection are unused.
    (dw, dl, dh) = s["d"]
    return dict(vision=_vision(s, proj=False), decoder=dict(width=dw, layers=dl, heads=dh, max_seq_len=1024))


def _flamingo(s: dict) -> dict[str, Any]:
    # the tower's hidden states feed the resampler: its pooling head and projection are unused
    (dw, dl, dh) = s["d"]
    latents, depth = s["latents"]
    heads = max(2, s["v"][0] // 64)
    return dict(
        vision=_vision(s, proj=False),
        decoder=dict(width=dw, layers=dl, heads=dh, max_seq_len=1024),
        perceiver=dict(latents=latents, depth=depth, heads=heads, head_dim=s["v"][0] // heads),
        cross_every=s["every"],
    )


def _fusion(s: dict) -> dict[str, Any]:
    (tw, tl, th) = s["t"]
    text = dict(
        width=tw,
        layers=tl,
        heads=th,
        fusion_start=s["start"],
        context_length=s["ctx"],
        post_norm=s["post_norm"],
    )
    if not s["post_norm"]:
        text["norm_eps"] = 1e-5
    vision = _vision(s, ln_pre=False, proj=False, patch_bias=True)
    return dict(embed_dim=s["embed"], vision=vision, text=text)


@dataclass(frozen=True)
class Family:
    config_class: type
    model_class: type
    sizes: dict[str, dict[str, Any]]
    spec: Callable[[dict], dict[str, Any]]  # a size row -> the config as a nested dict
    task: str  # the vlmkit.tasks task that trains it


FAMILIES: dict[str, Family] = {
    "clip": Family(CLIPConfig, CLIP, SIZES, _clip, "contrastive"),
    "siglip": Family(CLIPConfig, CLIP, SIZES, _siglip, "contrastive"),
    "flip": Family(CLIPConfig, CLIP, SIZES, _flip, "contrastive"),
    "coca": Family(CoCaConfig, CoCa, GENERATIVE_SIZES, _coca, "coca"),
    "llava": Family(LlavaConfig, Llava, GENERATIVE_SIZES, _llava, "llava"),
    "fusion": Family(FusionConfig, Fusion, FUSION_SIZES, _fusion, "fusion"),
    "flamingo": Family(FlamingoConfig, Flamingo, FLAMINGO_SIZES, _flamingo, "flamingo"),
    "dalle": Family(DalleConfig, Dalle, DALLE_SIZES, _dalle, "dalle"),
    "flow": Family(FlowModelConfig, FlowModel, FLOW_SIZES, _flow, "flow"),
}


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
    return [f"{name}-{size}" for name, family in FAMILIES.items() for size in family.sizes]


def split_name(name: str) -> tuple[str, str]:
    """`"clip-B-16"` -> `("clip", "B-16")`; ConfigError for a name the registry does not know."""
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in FAMILIES[family].sizes:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return family, size


def get_model_config(name: str, **overrides: Any) -> Any:
    """The config of a named model with overrides (dotted keys or nested dicts) applied."""
    family, size = split_name(name)
    row = FAMILIES[family]
    spec = _merge(row.spec(row.sizes[size]), overrides)
    return from_dict(row.config_class, spec, where=name)


def config_class(family: str) -> type:
    """The config dataclass that a model folder's "family" key names; ConfigError for others."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; vlmkit has {', '.join(FAMILIES)}")
    return FAMILIES[family].config_class


def _row(cfg: Any) -> tuple[str, Family]:
    for name, family in FAMILIES.items():  # the first row of a config class names it (clip, not siglip)
        if type(cfg) is family.config_class:
            return name, family
    raise TypeError(f"not a vlmkit model config: {type(cfg).__name__}")


def model_family(cfg: Any) -> str:
    """The family key a model folder's config.json records: "clip" (for every dual encoder), "coca", "llava"."""
    return _row(cfg)[0]


def task_name(cfg: Any) -> str:
    """The name of the `vlmkit.tasks` task that trains a model of this config."""
    return _row(cfg)[1].task


def task_of(name: str) -> str:
    """The name of the task that trains the named model (e.g. "flip-tiny" -> "contrastive")."""
    return FAMILIES[split_name(name)[0]].task


def build_model(cfg: Any) -> torch.nn.Module:
    """A randomly initialised model for a config (CLIPConfig, CoCaConfig or LlavaConfig)."""
    return _row(cfg)[1].model_class(cfg)


def create_model(name: str, **overrides: Any) -> torch.nn.Module:
    """Build a randomly initialised model by name, e.g. `create_model("clip-tiny", embed_dim=128)`."""
    return build_model(get_model_config(name, **overrides))
