"""Hugging Face LLaVA folders (`LlavaForConditionalGeneration`) <-> vlmkit `Llava`.

A folder holds `config.json` ("model_type": "llava", with a CLIP or SigLIP `vision_config` and a Llama
`text_config`), weights (single or sharded safetensors, or `pytorch_model.bin` read with
`torch.load(weights_only=True)`), and usually `tokenizer.json` and `preprocessor_config.json`.

The vision tower converts with vlmkit.convert.clip's CLIP / SigLIP rules, the language model with
vlmkit.convert.llama's, and the projector's `linear_1` / `linear_2` map one to one. Checkpoints name
the parts in one of several ways: transformers 4.x and the Hub use `language_model.model.*`,
`language_model.lm_head.weight`, `multi_modal_projector.*`, `vision_tower.vision_model.*`; transformers
5 holds `model.language_model.*`, `lm_head.weight`, `model.multi_modal_projector.*`,
`model.vision_tower.*` in memory and saves the vision tower without `vision_model.`. All are read;
`save_hf_llava` writes the Hub's names, which every transformers version loads.
This module does not import transformers: the tests use it as the independent reference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vlmkit.config import atomic_write_text, load_json
from vlmkit.convert.clip import (
    ACTS_FROM_HF,
    ACTS_TO_HF,
    CONFIG,
    PREPROCESSOR,
    SAFETENSORS,
    TOKENIZER,
    WEIGHT_FILES,
    convert_state_from_hf,
    convert_state_to_hf,
    hf_model_type,
    read_hf_weights,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_rules,
)
from vlmkit.convert.llama import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    decoder_state_from_hf,
    decoder_state_to_hf,
)
from vlmkit.convert.preprocess import preprocess_from_hf, preprocess_to_hf
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.models.llava import Llava, LlavaConfig
from vlmkit.models.pretrained import Pretrained, save_tensors, unwrap
from vlmkit.models.vit import VisionConfig

# LlavaConfig's default vision tower (llava-1.5's CLIP ViT-L/14 at 336), for a config.json without one
_DEFAULT_VISION = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14,
)  # fmt: skip
_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# other spellings of a weight name -> the Hub's (transformers 4.x) names
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
)
VISION, PROJECTOR, LANGUAGE = "vision_tower.vision_model", "multi_modal_projector", "language_model.model."
LM_HEAD = "language_model.lm_head.weight"


def is_hf_llava_dir(path: str | Path) -> bool:
    """True for a folder with weights and a `config.json` whose model_type is "llava"."""
    return hf_model_type(path) == "llava"


# ----------------------------------------------------------------------------------------------
# configs


def _vision_kind(v: dict, where: str) -> str:
    kind = _VISION_TYPES.get(v.get("model_type"))
    if kind is None:
        raise ConfigError(
            f"{where}: vision_config.model_type {v.get('model_type')!r} is not supported; "
            f"vlmkit reads {' and '.join(_VISION_TYPES)} towers"
        )
    return kind


def _section(meta: dict, key: str, default: dict, where: str) -> dict:
    value = meta.get(key)
    if value is None:
        return dict(default)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be an object, got {type(value).__name__}")
    return value


def config_from_hf_llava(meta: dict, where: str) -> LlavaConfig:
    """A LlavaConfig from a Hugging Face LLaVA `config.json` dict; ConfigError names a key vlmkit cannot
    represent (a list of vision feature layers, an unknown activation, a non-Llama text model, ...)."""
    if meta.get("model_type") != "llava":
        raise ConfigError(f"{where}: model_type {meta.get('model_type')!r} is not 'llava'")
    v = _section(meta, "vision_config", _DEFAULT_VISION, where)
    kind = _vision_kind(v, where)
    vision = vision_config_from_hf(v, kind, f"{where} vision_config")
    t = _section(meta, "text_config", {}, where)
    try:
        decoder = decoder_config_from_hf(t)
    except ConfigError as e:
        raise ConfigError(f"{where} text_config: {e}") from None
    if meta.get("tie_word_embeddings"):  # transformers 5 keeps the flag at the top level
        decoder = dataclasses.replace(decoder, tie_embeddings=True)
    if t.get("pad_token_id") is None and isinstance(meta.get("pad_token_id"), int):
        decoder = dataclasses.replace(decoder, pad_token_id=meta["pad_token_id"])

    layer = meta.get("vision_feature_layer", -2)
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(
            f"{where}: vision_feature_layer must be a layer index or a list of them, got {layer!r}"
        )
    strategy = meta.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    if strategy == "default" and not vision.class_token:
        raise ConfigError(
            f"{where}: vision_feature_select_strategy 'default' drops the first token, but a SigLIP tower has no "
            "class token (Hugging Face would drop a patch); vlmkit supports 'full' for SigLIP towers"
        )
    act = meta.get("projector_hidden_act", "gelu")
    if act not in ACTS_FROM_HF:
        raise ConfigError(
            f"{where}: projector_hidden_act {act!r} is not supported; vlmkit has {sorted(ACTS_FROM_HF)}"
        )
    image_token = meta.get("image_token_index", meta.get("image_token_id", 32000))
    if not isinstance(image_token, int) or isinstance(image_token, bool):
        raise ConfigError(f"{where}: image_token_index must be an integer, got {image_token!r}")
    bias = meta.get("multimodal_projector_bias", True)
    try:
        return LlavaConfig(
            vision=vision,
            decoder=decoder,
            vision_feature_layer=layer,
            vision_feature_select="patch" if strategy == "default" else "full",
            projector="mlp2x_gelu",
            projector_act=ACTS_FROM_HF[act],
            projector_bias=bool(bias),
            image_token_id=image_token,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _vision_layout(v: VisionConfig, where: str) -> str:
    """ "clip" or "siglip": the Hugging Face vision tower a vlmkit one exports to (ConfigError if none)."""
    if v.stem != "patch":
        raise ConfigError(
            f"{where}: vision.stem={v.stem!r} (a convolutional stem) has no Hugging Face equivalent"
        )
    if v.act not in ACTS_TO_HF:
        raise ConfigError(f"{where}: vision.act={v.act!r} has no Hugging Face equivalent")
    if v.class_token and v.ln_pre and not v.patch_bias and v.pool != "attn":
        return "clip"
    if not v.class_token and not v.ln_pre:
        return "siglip"
    raise ConfigError(
        f"{where}: a vision tower with class_token={v.class_token}, ln_pre={v.ln_pre}, patch_bias={v.patch_bias}, "
        f"pool={v.pool!r} is neither Hugging Face's CLIP nor its SigLIP vision tower"
    )


def config_to_hf_llava(cfg: LlavaConfig, where: str = "model") -> dict:
    """The Hugging Face `config.json` dict for a LlavaConfig; ConfigError names what LLaVA cannot hold."""
    if cfg.projector != "mlp2x_gelu":
        raise ConfigError(
            f"{where}: projector={cfg.projector!r}; Hugging Face's LLaVA has only the 2-layer MLP"
        )
    if cfg.pixel_shuffle != 1:
        raise ConfigError(
            f"{where}: pixel_shuffle={cfg.pixel_shuffle}; Hugging Face's LLaVA has no pixel shuffle"
        )
    if cfg.projector_act not in ACTS_TO_HF:
        raise ConfigError(f"{where}: projector_act={cfg.projector_act!r} has no Hugging Face equivalent")
    if cfg.max_frames:
        raise ConfigError(
            f"{where}: max_frames={cfg.max_frames} (learned frame positions for video); Hugging Face's LLaVA has none"
        )
    layout = _vision_layout(cfg.vision, where)
    vision = {"model_type": f"{layout}_vision_model", **vision_config_to_hf(cfg.vision)}
    if layout == "siglip":
        vision["vision_use_head"] = cfg.vision.pool == "attn"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": decoder_config_to_hf(cfg.decoder),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.num_image_tokens,
        "projector_hidden_act": ACTS_TO_HF[cfg.projector_act],
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": list(cfg.feature_layers)
        if len(cfg.feature_layers) > 1
        else cfg.feature_layers[0],
        "vision_feature_select_strategy": "default" if cfg.vision_feature_select == "patch" else "full",
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
    }


# ----------------------------------------------------------------------------------------------
# weights


def _rules(cfg: LlavaConfig, layout: str):
    """Vision tower and projector rules: (vlmkit names, Hugging Face names), as in vlmkit.convert.clip."""
    rules = vision_rules(cfg.vision, layout, ours="vision_tower", theirs=VISION)
    params = ("weight", "bias") if cfg.projector_bias else ("weight",)
    for i in (1, 2):
        rules += [((f"projector.linear_{i}.{p}",), (f"{PROJECTOR}.linear_{i}.{p}",)) for p in params]
    return rules


def _hub_name(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if key.startswith("vision_tower.") and not key.startswith(VISION + "."):
        key = VISION + key[len("vision_tower") :]  # transformers 5 saves the tower without "vision_model."
    return key


def state_dict_from_hf_llava(
    state: dict[str, torch.Tensor], model: Llava, where: str
) -> dict[str, torch.Tensor]:
    """`model`'s state dict from a Hugging Face LLaVA one (any of the namings in the module docstring)."""
    state = {_hub_name(k): v for k, v in state.items()}
    language = {k: v for k, v in state.items() if k.startswith(LANGUAGE) or k == LM_HEAD}
    rest = {k: v for k, v in state.items() if k not in language}
    out = convert_state_from_hf(
        rest, model.state_dict(), _rules(model.cfg, _vision_layout(model.cfg.vision, where)), where
    )
    try:
        decoder = decoder_state_from_hf(language, prefix=LANGUAGE, lm_head=LM_HEAD)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    out.update({f"language_model.{k}": v for k, v in decoder.items()})
    return out


def state_dict_to_hf_llava(model: Llava, where: str = "model") -> dict[str, torch.Tensor]:
    """`model`'s weights under the Hub's LLaVA names (contiguous tensors, no shared storage)."""
    cfg = model.cfg
    layout = _vision_layout(cfg.vision, where)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "siglip":  # Hugging Face's SigLIP patch embedding always has a bias
        state.setdefault("vision_tower.patch_embed.proj.bias", torch.zeros(cfg.vision.width))
    out = convert_state_to_hf(state, _rules(cfg, layout))
    decoder = {k[len("language_model.") :]: v for k, v in state.items() if k.startswith("language_model.")}
    language = decoder_state_to_hf(
        decoder, prefix=LANGUAGE, lm_head=LM_HEAD, tie_embeddings=cfg.decoder.tie_embeddings
    )
    out.update({k: v.clone().contiguous() for k, v in language.items()})
    return out


# ----------------------------------------------------------------------------------------------
# loading and saving


def _load_tokenizer(path: Path, cfg: LlavaConfig) -> Tokenizer | None:
    file = path / TOKENIZER
    if not file.is_file():
        return None
    tok = Tokenizer.from_file(file, context_length=cfg.decoder.max_seq_len, for_generation=True)
    if tok.vocab_size > cfg.decoder.vocab_size:
        raise ConfigError(
            f"{file} has {tok.vocab_size} tokens but {path / CONFIG} gives the language model {cfg.decoder.vocab_size}"
        )
    return tok


def _preprocess(path: Path, cfg: LlavaConfig) -> PreprocessConfig:
    file = path / PREPROCESSOR
    if file.is_file():
        d = load_json(file)
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        kind = d.get("image_processor_type") or ""
        if kind.startswith("Llava"):  # LlavaImageProcessor: CLIP's processing plus an optional pad to square
            d = {**d, "image_processor_type": "CLIPImageProcessor"}
        return preprocess_from_hf(d, str(file))
    return _default_preprocess(cfg)


def _default_preprocess(cfg: LlavaConfig) -> PreprocessConfig:
    if cfg.vision.class_token:  # CLIPImageProcessor's defaults at the tower's size
        return PreprocessConfig(image_size=cfg.vision.image_size, resize_then_crop=True)
    return PreprocessConfig(
        image_size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash"
    )


def load_hf_llava(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a Hugging Face LLaVA folder: the vlmkit Llava (eval mode), its tokenizer (None without a
    tokenizer.json) and image preprocessing."""
    path = Path(path)
    where = str(path / CONFIG)
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} is not a model folder: no {CONFIG}")
    meta = load_json(path / CONFIG)
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    cfg = config_from_hf_llava(meta, where)  # before reading possibly large weights
    state = read_hf_weights(path)
    model = Llava(cfg)
    weights = str(next(path / f for f in WEIGHT_FILES if (path / f).is_file()))
    converted = state_dict_from_hf_llava(state, model, weights)
    try:
        model.load_state_dict(converted)
    except RuntimeError as e:  # a language-model tensor whose shape does not fit config.json
        raise ConfigError(f"{weights} does not fit {where}: {str(e).splitlines()[-1].strip()}") from None
    model.to(device).eval()
    tokenizer = _load_tokenizer(path, cfg)
    return Pretrained(model, tokenizer, _preprocess(path, cfg), meta.get("_name_or_path") or path.name)


def save_hf_llava(
    model: Llava,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    preprocess: PreprocessConfig | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder that `transformers.LlavaForConditionalGeneration.from_pretrained`
    loads (config.json, model.safetensors, and with them tokenizer files and preprocessor_config.json).

    Raises ConfigError, before writing anything, for a model Hugging Face's LLaVA cannot represent
    (pixel shuffle, a linear projector, a convolutional stem, ...). Returns the folder.
    """
    model = unwrap(model)
    cfg = model.cfg
    hf_config = config_to_hf_llava(cfg)
    if tokenizer is not None and tokenizer.vocab_size > cfg.decoder.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the language model's vocabulary is {cfg.decoder.vocab_size}"
        )
    state = state_dict_to_hf_llava(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(state, out / SAFETENSORS)
    atomic_write_text(out / CONFIG, json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_hf(out)
    preprocess = preprocess or _default_preprocess(cfg)
    layout = _vision_layout(cfg.vision, "model")
    atomic_write_text(out / PREPROCESSOR, json.dumps(preprocess_to_hf(preprocess, layout), indent=2) + "\n")
    return out
