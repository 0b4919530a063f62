"""Hugging Face Idefics folders (`IdeficsForVisionText2Text`, the Flamingo architecture) -> vlmkit `Flamingo`.

Idefics is Flamingo as transformers holds it: a CLIP-style vision tower whose last hidden states (before its
final norm) go through an optional Perceiver resampler (LayerNorm/ReLU MLPs, no time embeddings), and a
Llama decoder with a gated cross-attention block before every `cross_layer_interval`-th layer (RMSNorm,
SwiGLU, tanh gates `alpha_cross_attn` / `alpha_dense`, scalar or per channel). Its extra tokens live in
`additional_embedding` / `additional_fc` beside the main vocabulary; vlmkit concatenates them into one
vocabulary of `vocab_size + additional_vocab_size` rows, the layout their ids already assume.

Which image a token sees: transformers takes an explicit `image_attention_mask` (B, T, images), which its
processor fills with "the latest image" and clears after an end-of-text token. vlmkit derives it from the
ids (`media_attention="previous"`: the latest <image> before each token), so the two agree wherever a
prompt has no end-of-text token between an image and its text. The <image> id comes from the folder's
tokenizer.json ("<image>"), else from Idefics' own layout (the second additional token).
This module does not import transformers: the tests use it as the independent reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.config import load_json
from vlmkit.convert.clip import (
    CONFIG,
    PREPROCESSOR,
    TOKENIZER,
    WEIGHT_FILES,
    convert_state_from_hf,
    read_hf_weights,
    vision_config_from_hf,
    vision_rules,
)
from vlmkit.convert.llama import decoder_config_from_hf, decoder_state_from_hf
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.models.flamingo import Flamingo, FlamingoConfig, PerceiverConfig
from vlmkit.models.pretrained import Pretrained

VISION, PERCEIVER, GATED = "model.vision_model", "model.perceiver_resampler", "model.gated_cross_attn_layers"
_VISION_DEFAULTS = dict(
    embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
    num_attention_heads=16, hidden_act="gelu", layer_norm_eps=1e-5,
)  # fmt: skip
_PERCEIVER_DEFAULTS = dict(
    resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
    qk_layer_norms_perceiver=False,
)  # fmt: skip
_TEXT_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "pad_token_id", "bos_token_id",
    "eos_token_id", "rope_parameters", "rope_theta",
)  # fmt: skip


def _section(meta: dict, key: str, defaults: dict, where: str) -> dict:
    value = meta.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be an object, got {type(value).__name__}")
    return {**defaults, **value}


def _token_ids(path: Path | None, meta: dict, vocab: int) -> tuple[int, int]:
    """(<image>, end of chunk) ids: from tokenizer.json's added tokens, else Idefics' layout."""
    eos = meta.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    added = {}
    if path is not None and (path / TOKENIZER).is_file():
        data = load_json(path / TOKENIZER)
        if isinstance(data, dict):
            added = {
                t.get("content"): t.get("id") for t in data.get("added_tokens", []) if isinstance(t, dict)
            }
    image = added.get("<image>")
    if image is None:
        if meta.get("additional_vocab_size", 0) < 2:
            raise ConfigError(
                f"{path}: no tokenizer.json with an '<image>' token, and no additional vocabulary to find "
                "Idefics' <image> in; add the tokenizer files to the folder"
            )
        image = meta.get("vocab_size", 32000) + 1  # Idefics: <fake_token_around_image>, then <image>
    chunk = added.get("<end_of_utterance>", eos)
    if not isinstance(image, int) or not 0 <= image < vocab:
        raise ConfigError(f"{path}: the <image> id {image!r} is outside the vocabulary of {vocab}")
    return image, chunk


def config_from_hf_idefics(meta: dict, where: str, path: Path | None = None) -> FlamingoConfig:
    """A FlamingoConfig from an Idefics `config.json` dict; ConfigError names what vlmkit cannot represent."""
    if meta.get("model_type") != "idefics":
        raise ConfigError(f"{where}: model_type {meta.get('model_type')!r} is not 'idefics'")
    for key in ("qk_layer_norms",):
        if meta.get(key):
            raise ConfigError(
                f"{where}: {key} = true (norms on the cross-attention's q and k) is not supported"
            )
    v = _section(meta, "vision_config", _VISION_DEFAULTS, where)
    clip_like = dict(
        hidden_size=v["embed_dim"], intermediate_size=v["intermediate_size"], num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"],
    )  # fmt: skip
    vision = vision_config_from_hf(clip_like, "clip", f"{where} vision_config")
    additional = int(meta.get("additional_vocab_size", 0) or 0)
    text = {k: meta[k] for k in _TEXT_KEYS if k in meta}
    text["vocab_size"] = int(meta.get("vocab_size", 32000)) + additional
    try:
        decoder = decoder_config_from_hf({"model_type": "llama", **text})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    perceiver = None
    if meta.get("use_resampler", False):
        p = _section(meta, "perceiver_config", _PERCEIVER_DEFAULTS, where)
        if p.get("qk_layer_norms_perceiver"):
            raise ConfigError(f"{where}: perceiver_config.qk_layer_norms_perceiver = true is not supported")
        perceiver = PerceiverConfig(
            latents=p["resampler_n_latents"], depth=p["resampler_depth"], heads=p["resampler_n_heads"],
            head_dim=p["resampler_head_dim"], mlp_ratio=4.0, act="relu", max_frames=0, norm_eps=1e-5,
        )  # fmt: skip
    interval = int(meta.get("cross_layer_interval", 1))
    if interval < 1 or decoder.layers % interval:
        raise ConfigError(
            f"{where}: cross_layer_interval {interval} does not divide num_hidden_layers {decoder.layers}"
        )
    alpha = meta.get("alpha_type", "float")
    if alpha not in ("float", "vector"):
        raise ConfigError(f"{where}: alpha_type {alpha!r} is not 'float' or 'vector'")
    image, chunk = _token_ids(path, meta, decoder.vocab_size)
    try:
        return FlamingoConfig(
            vision=vision, decoder=decoder, perceiver=perceiver, vision_feature_layer=-1, cross_every=interval,
            media_attention="previous", gate_shape="scalar" if alpha == "float" else "vector",
            cross_mlp_hidden=decoder.mlp_hidden, image_token_id=image, chunk_token_id=chunk,
        )  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _rules(cfg: FlamingoConfig):
    """(vlmkit names, Hugging Face names) of the vision tower, the resampler and the gated blocks."""
    rules = vision_rules(cfg.vision, "clip", ours="vision_model", theirs=VISION)
    if cfg.perceiver is not None:
        rules.append((("perceiver.latents",), (f"{PERCEIVER}.latents",)))
        for p in ("weight", "bias"):
            rules.append(((f"perceiver.layer_norm.{p}",), (f"{PERCEIVER}.layer_norm.{p}",)))
        for i in range(cfg.perceiver.depth):
            ours, theirs = f"perceiver.blocks.{i}", f"{PERCEIVER}.blocks.{i}"
            for norm in ("context_layer_norm", "latents_layer_norm"):
                for p in ("weight", "bias"):
                    rules.append(((f"{ours}.attn.{norm}.{p}",), (f"{theirs}.0.{norm}.{p}",)))
            for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
                rules.append(((f"{ours}.attn.{proj}.weight",), (f"{theirs}.0.{proj}.weight",)))
            for p in ("weight", "bias"):
                rules.append(((f"{ours}.mlp.ln.{p}",), (f"{theirs}.1.ln.{p}",)))
            for proj in ("fc", "c_proj"):
                rules.append(((f"{ours}.mlp.{proj}.weight",), (f"{theirs}.1.{proj}.weight",)))
    for i in range(cfg.num_cross_layers):
        names = [f"cross_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        names += [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "alpha_cross_attn",
            "alpha_dense",
        ]
        rules += [((f"gated_cross_attn_layers.{i}.{n}",), (f"{GATED}.{i}.{n}",)) for n in names]
    return rules


def _hub_name(key: str) -> str:
    """transformers 5 may save the whole model under `model.` already; older saves too: one naming."""
    return key[len("idefics.") :] if key.startswith("idefics.") else key


def state_dict_from_hf_idefics(state: dict[str, torch.Tensor], model: Flamingo, where: str) -> dict:
    """`model`'s state dict from an IdeficsForVisionText2Text one (extra vocabulary rows concatenated)."""
    state = {_hub_name(k): v for k, v in state.items()}
    embed = state.pop("model.embed_tokens.weight", None)
    extra_embed = state.pop("model.embed_tokens.additional_embedding.weight", None)
    head = state.pop("lm_head.weight", None)
    extra_head = state.pop("lm_head.additional_fc.weight", None)
    if embed is None:
        raise ConfigError(f"{where}: no model.embed_tokens.weight: is this an Idefics checkpoint?")
    if extra_embed is not None:
        embed = torch.cat([embed, extra_embed])
    if head is not None and extra_head is not None:
        head = torch.cat([head, extra_head])
    language = {k: v for k, v in state.items() if k.startswith(("model.layers.", "model.norm."))}
    language["model.embed_tokens.weight"] = embed
    if head is not None:
        language["lm_head.weight"] = head
    rest = {k: v for k, v in state.items() if k not in language}
    out = convert_state_from_hf(rest, model.state_dict(), _rules(model.cfg), where)
    try:
        decoder = decoder_state_from_hf(language, prefix="model.", lm_head="lm_head.weight")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    out.update({f"language_model.{k}": v for k, v in decoder.items()})
    ids = torch.tensor(model.cfg.new_token_ids)
    out["new_token_embeds"] = decoder["embed_tokens.weight"][ids].clone()
    out["new_token_head"] = decoder["lm_head.weight"][ids].clone()
    return out


def _preprocess(path: Path, cfg: FlamingoConfig) -> PreprocessConfig:
    """IdeficsImageProcessor: a square resize (bicubic) and CLIP's mean and std, or the file's."""
    d = load_json(path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else {}
    d = d if isinstance(d, dict) else {}
    kw = {k: tuple(d[f"image_{k}"]) for k in ("mean", "std") if isinstance(d.get(f"image_{k}"), list)}
    return PreprocessConfig(image_size=cfg.vision.image_size, resize_mode="squash", **kw)


def load_hf_idefics(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a Hugging Face Idefics folder: the vlmkit Flamingo (eval mode), its tokenizer (None without a
    tokenizer.json) and image preprocessing."""
    path = Path(path)
    where = str(path / CONFIG)
    meta = load_json(path / CONFIG)
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    cfg = config_from_hf_idefics(meta, where, path)
    state = read_hf_weights(path)
    model = Flamingo(cfg)
    weights = str(next(path / f for f in WEIGHT_FILES if (path / f).is_file()))
    try:
        model.load_state_dict(state_dict_from_hf_idefics(state, model, weights))
    except RuntimeError as e:
        raise ConfigError(f"{weights} does not fit {where}: {str(e).splitlines()[-1].strip()}") from None
    model.to(device).eval()
    tokenizer = None
    if (path / TOKENIZER).is_file():
        tokenizer = Tokenizer.from_file(
            path / TOKENIZER, context_length=cfg.decoder.max_seq_len, for_generation=True
        )
    return Pretrained(model, tokenizer, _preprocess(path, cfg), meta.get("_name_or_path") or path.name)


__all__ = ["config_from_hf_idefics", "load_hf_idefics", "state_dict_from_hf_idefics"]
