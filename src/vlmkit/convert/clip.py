"""Hugging Face CLIP / SigLIP checkpoint folders <-> vlmkit dual encoders.

One file over 500 lines, as the layout has one adapter per family: the config mapping, the weight-name
rules and loading / saving of both layouts (CLIP, SigLIP) read together; the model card and image
preprocessing live beside it (card.py, preprocess.py).

A Hugging Face folder holds `config.json` (with "model_type": "clip" or "siglip"), weights
(`model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`, read with
`torch.load(weights_only=True)` only), `tokenizer.json` (+ `tokenizer_config.json`) and
`preprocessor_config.json`. `load_hf` turns one into a vlmkit `Pretrained`; `save_hf` writes a vlmkit model
in that layout, with a model card, so that `transformers.CLIPModel` / `SiglipModel`, `AutoTokenizer` and
the CLIP / SigLIP image processors load it and give the same numbers.

The weights differ only in names and in one layout: vlmkit fuses q, k and v into one `qkv` Linear (rows
q, k, v) where Hugging Face has `q_proj`, `k_proj`, `v_proj`; SigLIP's attention-pooling head is an
`nn.MultiheadAttention` whose `in_proj` rows are vlmkit's `q` then `kv`. Everything else maps one to one.
This module does not import transformers: the tests use it as the independent reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.config import atomic_write_text, load_json
from vlmkit.convert.preprocess import preprocess_from_hf, preprocess_to_hf
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.models.clip import CLIP, CLIPConfig
from vlmkit.models.pretrained import Pretrained, save_tensors, unwrap
from vlmkit.models.text import TextConfig
from vlmkit.models.vit import VisionConfig

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)  # in order of preference
PREPROCESSOR = "preprocessor_config.json"
TOKENIZER = "tokenizer.json"
MODEL_CARD = "README.md"
MODEL_TYPES = ("clip", "siglip")

# Hugging Face activation name -> vlmkit's. gelu_new is the tanh approximation written out (equal to ~1e-7).
ACTS_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACTS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# PIL.Image.Resampling values, as preprocessor_config.json stores "resample"

# transformers' defaults for what a config.json may leave out (CLIPTextConfig, SiglipVisionConfig, ...)
_DEFAULTS = {
    "clip": {
        "text_config": dict(
            vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ),
        "vision_config": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
    },
    "siglip": {
        "text_config": dict(
            vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6, pad_token_id=1, bos_token_id=49406, eos_token_id=49407, projection_size=None,
        ),
        "vision_config": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6, vision_use_head=True,
        ),
    },
}  # fmt: skip


def hf_model_type(path: str | Path) -> str | None:
    """The "model_type" of a Hugging Face folder (config.json with it, and weights); None for anything else."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        return None
    try:
        meta = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or "model" in meta:  # a vlmkit folder
        return None
    return meta.get("model_type")


def is_hf_dir(path: str | Path) -> bool:
    """True for a folder with a Hugging Face `config.json` (one with "model_type") and weights."""
    return hf_model_type(path) is not None


# ----------------------------------------------------------------------------------------------
# configs


def layout_of(cfg: CLIPConfig, where: str = "model") -> str:
    """The Hugging Face architecture a vlmkit config corresponds to: "clip" or "siglip" (ConfigError if none).

    CLIP: class token, pre-norm, bias-free patch embedding and projections, causal text pooled at its end
    token. SigLIP: no class token, no pre-norm, attention-pooling head, bidirectional text read at its last
    token, a logit bias.
    """
    v, t = cfg.vision, cfg.text
    if cfg.video.pool != "mean":
        raise ConfigError(
            f"{where}: video.pool={cfg.video.pool!r} (a temporal transformer over frames) has no Hugging Face "
            "CLIP/SigLIP equivalent; export works for image-only and meanP models"
        )
    if v.stem != "patch":
        raise ConfigError(
            f"{where}: vision.stem={v.stem!r} (a convolutional stem) has no Hugging Face CLIP/SigLIP equivalent; "
            "to export, train a patch-stem model (--set model_overrides.vision.stem=patch)"
        )
    for name, tower in (("vision", v), ("text", t)):
        if tower.act not in ACTS_TO_HF:
            raise ConfigError(f"{where}: {name}.act={tower.act!r} has no Hugging Face equivalent")
    if v.pool == "cls":
        problems = [
            (not v.ln_pre, "vision.ln_pre=false"),
            (v.patch_bias, "vision.patch_bias=true"),
            (not t.causal, "text.causal=false"),
            (t.pool not in ("eot", "argmax"), f"text.pool={t.pool!r}"),
            (t.proj and t.proj_bias, "text.proj_bias=true"),
            (cfg.init_logit_bias is not None, "a logit bias"),
        ]
        layout = "clip"
    elif v.pool == "attn" and not v.class_token:
        problems = [
            (v.ln_pre, "vision.ln_pre=true"),
            (v.proj, "vision.proj=true"),
            (t.causal, "text.causal=true"),
            (t.pool != "last", f"text.pool={t.pool!r}"),
        ]
        layout = "siglip"
    else:
        problems = [(True, f"vision.pool={v.pool!r} with class_token={v.class_token}")]
        layout = "none"
    bad = [what for is_bad, what in problems if is_bad]
    if bad:
        expected = "CLIP" if layout == "clip" else "SigLIP" if layout == "siglip" else "CLIP or SigLIP"
        raise ConfigError(
            f"{where}: {', '.join(bad)} does not fit Hugging Face's {expected} architecture; "
            "export models built from the clip-* or siglip-* presets"
        )
    return layout


def _model_type(meta: dict, where: str) -> str:
    model_type = meta.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: unknown model_type {model_type!r}; vlmkit loads {' and '.join(map(repr, MODEL_TYPES))} checkpoints"
        )
    return model_type


def _section(meta: dict, key: str, model_type: str, where: str) -> dict:
    """A tower's settings: transformers' defaults, then `text_config`, then the legacy `text_config_dict`."""
    out = dict(_DEFAULTS[model_type][key])
    for k in (key, f"{key}_dict"):
        part = meta.get(k)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ConfigError(f"{where}: {k} must be an object, got {type(part).__name__}")
        out.update(part)
    return out


def _int(d: dict, key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # a square (height, width)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _act(d: dict, where: str) -> str:
    act = d.get("hidden_act")
    if act not in ACTS_FROM_HF:
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported; vlmkit has {sorted(ACTS_FROM_HF)}")
    return ACTS_FROM_HF[act]


def _mlp_ratio(width: int, hidden: int, where: str) -> float:
    """The mlp_ratio for which vlmkit's `int(width * mlp_ratio)` gives exactly `hidden` units."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # e.g. 1152 * (4304 / 1152) rounding just below 4304
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != hidden:
        raise ConfigError(f"{where}: cannot express intermediate_size {hidden} for hidden_size {width}")
    return ratio


def _tower(d: dict, where: str) -> dict:
    width = _int(d, "hidden_size", where)
    return dict(
        width=width,
        layers=_int(d, "num_hidden_layers", where),
        heads=_int(d, "num_attention_heads", where),
        mlp_ratio=_mlp_ratio(width, _int(d, "intermediate_size", where), where),
        act=_act(d, where),
        norm_eps=_float(d, "layer_norm_eps", where),
    )


def _float(d: dict, key: str, where: str) -> float:
    value = d.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _vision_fields(v: dict, where: str) -> dict:
    """VisionConfig fields shared by CLIP and SigLIP vision towers, from a `vision_config` section."""
    if _int(v, "num_channels", where) != 3:
        raise ConfigError(f"{where}: num_channels must be 3 (RGB), got {v['num_channels']}")
    return dict(
        image_size=_int(v, "image_size", where), patch_size=_int(v, "patch_size", where), **_tower(v, where)
    )


def vision_config_from_hf(v: dict, model_type: str, where: str) -> VisionConfig:
    """A vision tower alone (as LLaVA holds one) from a CLIP / SigLIP `vision_config` dict; transformers'
    defaults fill what it leaves out. CLIPVisionModel has no projection; a SigLIP tower without its
    attention-pooling head (vision_use_head false) gets mean pooling, which has no weights."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: unknown vision model_type {model_type!r}; vlmkit reads clip and siglip towers"
        )
    v = {**_DEFAULTS[model_type]["vision_config"], **v}
    fields = _vision_fields(v, where)
    try:
        if model_type == "clip":
            return VisionConfig(**fields, proj=False)
        pool = "attn" if v.get("vision_use_head", True) else "mean"
        return VisionConfig(**fields, pool=pool, class_token=False, ln_pre=False, proj=False, patch_bias=True)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_hf(meta: dict, where: str, logit_scale: float, logit_bias: float | None) -> CLIPConfig:
    """A vlmkit CLIPConfig from a Hugging Face CLIP/SigLIP `config.json` dict.

    `logit_scale` / `logit_bias` are the checkpoint's values: vlmkit clamps the scale at `max_logit_scale`
    (Hugging Face does not), so the cap is raised to the loaded value where it is higher.
    """
    model_type = _model_type(meta, where)
    t = _section(meta, "text_config", model_type, where)
    v = _section(meta, "vision_config", model_type, where)
    tw, vw = f"{where} text_config", f"{where} vision_config"
    vision = _vision_fields(v, vw)
    text = dict(
        vocab_size=_int(t, "vocab_size", tw),
        context_length=_int(t, "max_position_embeddings", tw),
        pad_token_id=t.get("pad_token_id") if isinstance(t.get("pad_token_id"), int) else 0,
        **_tower(t, tw),
    )
    eos = t.get("eos_token_id")
    if not isinstance(eos, int):
        raise ConfigError(f"{tw}: eos_token_id must be an integer, got {eos!r}")
    max_scale = max(math.log(100), logit_scale)
    try:
        if model_type == "clip":
            # transformers pools legacy configs (eos_token_id 2) at input_ids.argmax(-1), others at the first eos
            pool = dict(pool="argmax") if eos == 2 else dict(pool="eot", eot_token_id=eos)
            return CLIPConfig(
                embed_dim=_int(meta, "projection_dim", where) if "projection_dim" in meta else 512,
                vision=VisionConfig(**vision),
                text=TextConfig(**text, **pool),
                loss="clip",
                init_logit_scale=logit_scale,
                max_logit_scale=max_scale,
            )
        if v.get("vision_use_head") is not True:
            raise ConfigError(f"{vw}: vision_use_head must be true (vlmkit's SigLIP pools with the head)")
        projection = t.get("projection_size") or text["width"]
        if projection != vision["width"]:
            raise ConfigError(
                f"{tw}: projection_size {projection} must equal vision_config hidden_size {vision['width']}"
            )
        return CLIPConfig(
            embed_dim=vision["width"],
            vision=VisionConfig(
                **vision, pool="attn", class_token=False, ln_pre=False, proj=False, patch_bias=True
            ),
            text=TextConfig(**text, eot_token_id=eos, causal=False, pool="last", proj_bias=True),
            loss="siglip",
            init_logit_scale=logit_scale,
            init_logit_bias=0.0 if logit_bias is None else logit_bias,
            max_logit_scale=max_scale,
        )
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _tower_to_hf(tower: VisionConfig | TextConfig) -> dict:
    return dict(
        hidden_size=tower.width,
        intermediate_size=int(tower.width * tower.mlp_ratio),  # as vlmkit's MLP sizes its hidden layer
        num_hidden_layers=tower.layers,
        num_attention_heads=tower.heads,
        hidden_act=ACTS_TO_HF[tower.act],
        layer_norm_eps=tower.norm_eps,
    )


def vision_config_to_hf(v: VisionConfig) -> dict:
    """The `vision_config` fields CLIP and SigLIP share (the caller adds model_type and its own keys)."""
    return dict(num_channels=3, image_size=v.image_size, patch_size=v.patch_size, **_tower_to_hf(v))


def config_to_hf(cfg: CLIPConfig, tokenizer: Tokenizer, logit_scale: float) -> dict:
    """The Hugging Face `config.json` dict for a vlmkit config (see `layout_of` for what can be exported).

    `tokenizer` gives the special token ids; its end token must be the one the text tower pools at.
    """
    layout = layout_of(cfg)
    v, t = cfg.vision, cfg.text
    vision = vision_config_to_hf(v)
    text = dict(
        vocab_size=t.vocab_size,
        max_position_embeddings=t.context_length,
        bos_token_id=tokenizer.sot_token_id,
        eos_token_id=tokenizer.eot_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_tower_to_hf(t),
    )
    if layout == "siglip":
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "text_config": {"model_type": "siglip_text_model", **text, "projection_size": cfg.embed_dim},
            "vision_config": {"model_type": "siglip_vision_model", **vision, "vision_use_head": True},
        }
    if t.pool == "argmax":
        text["eos_token_id"] = 2  # what makes transformers pool at input_ids.argmax(-1)
    elif tokenizer.eot_token_id == 2:  # transformers would read 2 as the legacy argmax flag; see save_hf
        raise ConfigError("renumber the end-of-text token away from id 2 before export (save_hf does)")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": {"model_type": "clip_text_model", **text, "projection_dim": cfg.embed_dim},
        "vision_config": {"model_type": "clip_vision_model", **vision, "projection_dim": cfg.embed_dim},
    }


# ----------------------------------------------------------------------------------------------
# weights


Rules = list[tuple[tuple[str, ...], tuple[str, ...]]]


def _same(rules: Rules, ours: str, theirs: str, params=("weight", "bias")) -> None:
    rules.extend(((f"{ours}.{p}",), (f"{theirs}.{p}",)) for p in params)


def _blocks(rules: Rules, ours: str, theirs: str, layers: int) -> None:
    for i in range(layers):
        o, h = f"{ours}.transformer.blocks.{i}", f"{theirs}.encoder.layers.{i}"
        for p in ("weight", "bias"):  # vlmkit's fused qkv rows are q, k, v
            rules.append(((f"{o}.attn.qkv.{p}",), tuple(f"{h}.self_attn.{x}_proj.{p}" for x in "qkv")))
        _same(rules, f"{o}.attn.proj", f"{h}.self_attn.out_proj")
        _same(rules, f"{o}.ln_1", f"{h}.layer_norm1")
        _same(rules, f"{o}.ln_2", f"{h}.layer_norm2")
        _same(rules, f"{o}.mlp.fc1", f"{h}.mlp.fc1")
        _same(rules, f"{o}.mlp.fc2", f"{h}.mlp.fc2")


def vision_rules(v: VisionConfig, layout: str, ours: str = "visual", theirs: str = "vision_model") -> Rules:
    """Rules for a CLIP / SigLIP vision tower without its projection (CLIPVisionModel / SiglipVisionModel);
    `ours` / `theirs` are the tower's prefixes on each side."""
    rules: Rules = []
    rules.append(((f"{ours}.patch_embed.proj.weight",), (f"{theirs}.embeddings.patch_embedding.weight",)))
    rules.append(((f"{ours}.positional_embedding",), (f"{theirs}.embeddings.position_embedding.weight",)))
    _blocks(rules, ours, theirs, v.layers)
    _same(rules, f"{ours}.ln_post", f"{theirs}.post_layernorm")
    if layout == "clip":
        rules.append(((f"{ours}.class_embedding",), (f"{theirs}.embeddings.class_embedding",)))
        _same(rules, f"{ours}.ln_pre", f"{theirs}.pre_layrnorm")  # sic: transformers' name
        return rules
    rules.append(((f"{ours}.patch_embed.proj.bias",), (f"{theirs}.embeddings.patch_embedding.bias",)))
    if v.pool != "attn":  # a SigLIP tower without its head (vision_use_head false)
        return rules
    rules.append(((f"{ours}.attn_pool.query",), (f"{theirs}.head.probe",)))
    for p in ("weight", "bias"):  # nn.MultiheadAttention's in_proj rows are q, k, v = vlmkit's q, then kv
        rules.append(
            (
                (f"{ours}.attn_pool.q.{p}", f"{ours}.attn_pool.kv.{p}"),
                (f"{theirs}.head.attention.in_proj_{p}",),
            )
        )
    _same(rules, f"{ours}.attn_pool.proj", f"{theirs}.head.attention.out_proj")
    _same(rules, f"{ours}.attn_pool.norm", f"{theirs}.head.layernorm")
    _same(rules, f"{ours}.attn_pool.mlp.fc1", f"{theirs}.head.mlp.fc1")
    _same(rules, f"{ours}.attn_pool.mlp.fc2", f"{theirs}.head.mlp.fc2")
    return rules


def _rules(cfg: CLIPConfig, layout: str) -> Rules:
    """(vlmkit names, Hugging Face names): each side's tensors, concatenated along dim 0, are equal."""
    rules: Rules = []
    rules.append((("text.token_embedding.weight",), ("text_model.embeddings.token_embedding.weight",)))
    rules.append((("text.positional_embedding",), ("text_model.embeddings.position_embedding.weight",)))
    _blocks(rules, "text", "text_model", cfg.text.layers)
    _same(rules, "text.ln_final", "text_model.final_layer_norm")
    rules += vision_rules(cfg.vision, layout)
    rules.append((("logit_scale",), ("logit_scale",)))
    if layout == "clip":
        rules.append((("visual.proj.weight",), ("visual_projection.weight",)))
        rules.append((("text.proj.weight",), ("text_projection.weight",)))
        return rules
    _same(rules, "text.proj", "text_model.head")
    rules.append((("logit_bias",), ("logit_bias",)))
    return rules


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def state_dict_from_hf(state: dict[str, torch.Tensor], model: CLIP, where: str) -> dict[str, torch.Tensor]:
    """Map a Hugging Face CLIPModel/SiglipModel state dict onto `model`'s names and layouts.

    ConfigError names the missing keys, the unexpected keys, or the first tensor whose shape does not fit
    the config.
    """
    return convert_state_from_hf(state, model.state_dict(), _rules(model.cfg, layout_of(model.cfg)), where)


def convert_state_from_hf(
    state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], rules: Rules, where: str
) -> dict[str, torch.Tensor]:
    """Apply `rules` to a Hugging Face state dict: tensors under the names (and shapes, dtypes) of `ours`.

    `state` must hold exactly the rules' Hugging Face keys (ConfigError names the missing and unexpected
    ones, or the first tensor whose shape does not fit).
    """
    used = {h for _, theirs in rules for h in theirs}
    # position_ids are non-persistent buffers that older transformers versions saved
    unexpected = sorted(k for k in state if k not in used and not k.endswith(".position_ids"))
    missing = sorted(h for h in used if h not in state)
    if missing or unexpected:
        parts = [
            f"missing keys {_few(missing)}" if missing else "",
            f"unexpected keys {_few(unexpected)}" if unexpected else "",
        ]
        raise ConfigError(f"{where} does not fit its config.json: {'; '.join(p for p in parts if p)}")
    out = {}
    for names, theirs in rules:
        targets = [ours[n] for n in names]
        rows = sum(t.shape[0] if t.ndim else 1 for t in targets)
        rest = targets[0].shape[1:]
        for h in theirs:  # each Hugging Face part holds an equal share of the rows
            expected = (rows // len(theirs), *rest) if targets[0].ndim else (1,)
            got = state[h]
            if tuple(got.shape) != tuple(expected) and not (targets[0].ndim == 0 and got.numel() == 1):
                raise ConfigError(
                    f"{where}: {h} has shape {_shape(got)} but config.json gives {'x'.join(map(str, expected))}"
                )
        joined = torch.cat([state[h].reshape(-1, *rest) for h in theirs])
        sizes = [t.shape[0] if t.ndim else 1 for t in targets]
        for n, part, target in zip(names, joined.split(sizes), targets):
            out[n] = part.reshape(target.shape).to(target.dtype)
    return out


def convert_state_to_hf(state: dict[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    """Apply `rules` to a vlmkit state dict: contiguous tensors under Hugging Face names, no shared storage."""
    out = {}
    for names, theirs in rules:
        joined = torch.cat([state[n].reshape(-1, *state[n].shape[1:]) for n in names])
        for h, part in zip(theirs, joined.chunk(len(theirs))):
            out[h] = part.clone().contiguous()
    return out


def state_dict_to_hf(model: CLIP, layout: str) -> dict[str, torch.Tensor]:
    """`model`'s weights under Hugging Face names and layouts (contiguous float tensors, no shared storage).

    Parts Hugging Face always has and this model leaves out are filled in exactly: an identity projection
    for a tower without one, zero biases, a zero logit bias.
    """
    cfg = model.cfg
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # vlmkit clamps the scale where it uses it, Hugging Face does not: export the value vlmkit uses
    state["logit_scale"] = state["logit_scale"].clamp(max=cfg.max_logit_scale)
    for tower, name in ((cfg.vision, "visual"), (cfg.text, "text")):
        if f"{name}.proj.weight" not in state and (layout == "clip" or name == "text"):
            state[f"{name}.proj.weight"] = torch.eye(tower.width)
    if layout == "siglip":
        state.setdefault("text.proj.bias", torch.zeros(cfg.embed_dim))
        state.setdefault("visual.patch_embed.proj.bias", torch.zeros(cfg.vision.width))
        state.setdefault("logit_bias", torch.zeros(()))
    out = convert_state_to_hf(state, _rules(cfg, layout))
    for k in ("logit_scale", "logit_bias"):
        if k in out:  # CLIPModel's logit_scale is a scalar; SigLIP's are shape (1,)
            out[k] = out[k].reshape(()) if layout == "clip" else out[k].reshape(1)
    return out


def _few(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a Hugging Face folder: model.safetensors, a sharded index, or pytorch_model.bin.

    `.bin` files are read with `torch.load(weights_only=True)`: tensors only, never arbitrary objects.
    """
    path = Path(path)
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            index = load_json(file)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConfigError(f'{file}: no "weight_map" object; is this a sharded checkpoint index?')
            shards = sorted(set(weight_map.values()))
            lost = [s for s in shards if not (path / s).is_file()]
            if lost:
                raise ConfigError(
                    f"{file} lists shard {lost[0]}, which is not in {path}; download all shards"
                )
            state = {}
            for shard in shards:
                state.update(_read_file(path / shard))
            return state
        return _read_file(file)
    raise ConfigError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except Exception as e:  # safetensors raises SafetensorError on bad headers
            raise ConfigError(f"{file} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{file} holds more than tensors, and vlmkit never unpickles objects (torch.load weights_only=True); "
            "convert it to model.safetensors with a tool you trust"
        ) from None
    except Exception as e:
        raise ConfigError(f"{file} is not a readable PyTorch weights file: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{file} is not a state dict of tensors")
    return state


# ----------------------------------------------------------------------------------------------
# loading


def _load_tokenizer(path: Path, cfg: CLIPConfig) -> Tokenizer | None:
    """The folder's tokenizer.json (special tokens from tokenizer_config.json), checked against the model."""
    file = path / TOKENIZER
    if not file.is_file():
        if (path / "spiece.model").is_file():
            raise ConfigError(
                f"{path} has only a sentencepiece tokenizer (spiece.model); vlmkit needs a tokenizer.json "
                "(Hugging Face `tokenizers` format) in the folder"
            )
        return None
    tok = Tokenizer.from_file(file, context_length=cfg.text.context_length)
    if tok.vocab_size > cfg.text.vocab_size:
        raise ConfigError(
            f"{file} has {tok.vocab_size} tokens but {path / CONFIG} gives the model {cfg.text.vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    t = cfg.text
    if t.pool == "eot" and tok.eot_token_id != t.eot_token_id:
        raise ConfigError(
            f"{file}: end token {tok.special_tokens['eos_token']!r} has id {tok.eot_token_id} but {path / CONFIG} "
            f"text_config.eos_token_id is {t.eot_token_id}; use the tokenizer the model was trained with"
        )
    if t.pool == "argmax" and tok.eot_token_id != max(tok.backend.get_vocab().values()):
        raise ConfigError(
            f"{file}: the model pools at the largest token id (text_config.eos_token_id 2), but the end token "
            f"{tok.special_tokens['eos_token']!r} is not the largest id; use the tokenizer the model was trained with"
        )
    return tok


def load_hf(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a Hugging Face CLIP / SigLIP folder as a vlmkit model (eval mode), tokenizer and preprocessing.
    A LLaVA folder ("model_type": "llava") goes to `vlmkit.convert.llava.load_hf_llava`."""
    path = Path(path)
    where = str(path / CONFIG)
    meta = load_json(path / CONFIG)
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if meta.get("model_type") == "llava":
        from vlmkit.convert.llava import load_hf_llava

        return load_hf_llava(path, device)
    if meta.get("model_type") == "blip":
        from vlmkit.convert.blip import load_hf_blip

        return load_hf_blip(path, device)
    if meta.get("model_type") == "idefics":
        from vlmkit.convert.idefics import load_hf_idefics

        return load_hf_idefics(path, device)
    _model_type(meta, where)  # before reading possibly large weights
    state = read_hf_weights(path)
    scale, bias = state.get("logit_scale"), state.get("logit_bias")
    cfg = config_from_hf(
        meta,
        where,
        float(scale.reshape(-1)[0]) if scale is not None and scale.numel() == 1 else math.log(1 / 0.07),
        float(bias.reshape(-1)[0]) if bias is not None and bias.numel() == 1 else None,
    )
    tokenizer = _load_tokenizer(path, cfg)
    if tokenizer is not None:  # what the trainer would record for this tokenizer
        text = dataclasses.replace(cfg.text, pad_token_id=tokenizer.pad_token_id)
        if text.pool != "argmax":
            text = dataclasses.replace(text, eot_token_id=tokenizer.eot_token_id)
        cfg = dataclasses.replace(cfg, text=text)
    model = CLIP(cfg)
    weights = next(path / f for f in WEIGHT_FILES if (path / f).is_file())
    model.load_state_dict(state_dict_from_hf(state, model, str(weights)))
    model.to(device).eval()
    if (path / PREPROCESSOR).is_file():
        preprocess = preprocess_from_hf(load_json(path / PREPROCESSOR), str(path / PREPROCESSOR))
    elif meta["model_type"] == "siglip":
        preprocess = PreprocessConfig(
            image_size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash"
        )
    else:  # CLIPImageProcessor's defaults
        preprocess = PreprocessConfig(image_size=cfg.vision.image_size, resize_then_crop=True)
    return Pretrained(model, tokenizer, preprocess, meta.get("_name_or_path") or path.name)


# ----------------------------------------------------------------------------------------------
# saving


def save_hf(
    model: CLIP,
    out_dir: str | Path,
    tokenizer: Tokenizer | None,
    preprocess: PreprocessConfig | None = None,
    *,
    name: str = "",
    source_dir: str | Path | None = None,
    audits: list[dict] | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder that `transformers.CLIPModel` / `SiglipModel.from_pretrained`,
    `AutoTokenizer` and the CLIP / SigLIP image processor load, with a model card (README.md).

    `source_dir` (a vlmkit run folder) supplies the card's training data (train_config.json) and results
    (eval/*.json). Raises ConfigError, before writing anything, for a model Hugging Face cannot represent.
    Returns the folder.

    CLIP models pool text at their first end-of-text token, which transformers does for any end token id
    but 2 (it reads 2 as a legacy flag for `input_ids.argmax(-1)`). vlmkit's own tokenizers have the end
    token at id 2, so the export gives it the tokenizer's last id instead, and that token id 2: the written
    tokenizer and the token embedding rows are renumbered together, and the outputs stay the same.
    """
    model = unwrap(model)
    cfg = model.cfg
    layout = layout_of(cfg, str(source_dir or "model"))  # refuses what has no Hugging Face equivalent
    if tokenizer is None:
        raise ConfigError(
            "export needs the model's tokenizer: put the tokenizer.json it was trained with in the model folder"
        )
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {cfg.text.vocab_size}"
        )
    if cfg.text.pool == "eot" and tokenizer.eot_token_id != cfg.text.eot_token_id:
        raise ConfigError(
            f"the tokenizer's end token has id {tokenizer.eot_token_id} but the model pools at "
            f"text.eot_token_id {cfg.text.eot_token_id}; export with the tokenizer the model was trained with"
        )
    if cfg.text.pool == "argmax" and tokenizer.eot_token_id != max(tokenizer.backend.get_vocab().values()):
        raise ConfigError(
            "the model pools at the largest token id, but the tokenizer's end token is not the largest"
        )
    tokenizer = tokenizer.with_context_length(cfg.text.context_length)
    state = state_dict_to_hf(model, layout)
    if layout == "clip" and cfg.text.pool == "eot" and tokenizer.eot_token_id == 2:
        last = tokenizer.vocab_size - 1
        tokenizer = tokenizer.with_swapped_ids(2, last)
        emb = state["text_model.embeddings.token_embedding.weight"]  # (V, C)
        emb[[2, last]] = emb[[last, 2]]
    logit_scale = float(model.logit_scale.detach().clamp(max=cfg.max_logit_scale))
    hf_config = config_to_hf(cfg, tokenizer, logit_scale)
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(state, out / SAFETENSORS)
    atomic_write_text(out / CONFIG, json.dumps(hf_config, indent=2) + "\n")
    tokenizer.save_hf(out)
    atomic_write_text(out / PREPROCESSOR, json.dumps(preprocess_to_hf(preprocess, layout), indent=2) + "\n")
    from vlmkit.convert.card import model_card

    card = model_card(name or out.resolve().name, cfg, layout, tokenizer, source_dir, audits)
    atomic_write_text(out / MODEL_CARD, card)
    return out


# ----------------------------------------------------------------------------------------------
# command line
