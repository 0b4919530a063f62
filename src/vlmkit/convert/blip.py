"""Hugging Face BLIP (`BlipForImageTextRetrieval`) <-> vlmkit's fusion model.

BLIP's retrieval model is vlmkit's fusion family in its BLIP layout: a pre-norm ViT with a fused qkv and a
class token, and a post-norm BERT text encoder whose every layer cross-attends to the image tokens
(`text.fusion_start` 0, `text.post_norm`), with ITC projections and a 2-way ITM head. The import has no
decoder, MLM head or temperature (transformers' retrieval model has none): it sets their weights to 0 so the
model scores pairs exactly as transformers does; fine-tuning it with those objectives trains them from
there. transformers leaves BLIP's [ENC] token (put in place of [CLS] for ITM) to the caller; vlmkit puts it,
as BLIP's own code does, when the folder's tokenizer has one (`text.enc_token_id`); without a tokenizer the
ids are scored as given, as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import atomic_write_text, load_json
from vlmkit.convert.clip import (
    CONFIG,
    PREPROCESSOR,
    SAFETENSORS,
    WEIGHT_FILES,
    Rules,
    _same,
    convert_state_from_hf,
    convert_state_to_hf,
    read_hf_weights,
)
from vlmkit.convert.preprocess import preprocess_from_hf
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.models.fusion import Fusion, FusionConfig, FusionTextConfig
from vlmkit.models.pretrained import Pretrained, save_tensors, unwrap
from vlmkit.models.vit import VisionConfig

ARCHITECTURE = "BlipForImageTextRetrieval"
ENC_TOKEN, DEC_TOKEN = "[ENC]", "[DEC]"
# tensors whose Hugging Face shape has leading 1s that vlmkit's lacks
_HF_SHAPES = {
    "vision_model.embeddings.class_embedding": lambda c: (1, 1, c.vision.width),
    "vision_model.embeddings.position_embedding": lambda c: (1, c.vision.grid_size**2 + 1, c.vision.width),
}


def _get(d: dict, key: str, where: str, kind=int):
    if key not in d:
        raise ConfigError(f"{where}: missing {key!r}")
    try:
        return kind(d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key!r} must be a {kind.__name__}, not {d[key]!r}") from None


def config_from_hf(meta: dict, where: str) -> FusionConfig:
    """A FusionConfig from a BlipConfig dict (config.json of a BLIP retrieval folder)."""
    if meta.get("model_type") != "blip":
        raise ConfigError(f"{where}: model_type is {meta.get('model_type')!r}, not 'blip'")
    arch = meta.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in arch:
        raise ConfigError(f"{where}: vlmkit imports {ARCHITECTURE} folders, not {', '.join(arch)}")
    v, t = meta.get("vision_config") or {}, meta.get("text_config") or {}
    for name, section in (("vision_config", v), ("text_config", t)):
        act = section.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(
                f"{where}: {name}.hidden_act {act!r} is not supported (vlmkit's BLIP uses gelu)"
            )
    vw, tw = _get(v, "hidden_size", where), _get(t, "hidden_size", where)
    vision = VisionConfig(
        image_size=_get(v, "image_size", where),
        patch_size=_get(v, "patch_size", where),
        width=vw,
        layers=_get(v, "num_hidden_layers", where),
        heads=_get(v, "num_attention_heads", where),
        mlp_ratio=_get(v, "intermediate_size", where) / vw,
        norm_eps=_get(v, "layer_norm_eps", where, float),
        ln_pre=False,
        proj=False,
        patch_bias=True,
    )
    text = FusionTextConfig(
        vocab_size=_get(t, "vocab_size", where),
        context_length=_get(t, "max_position_embeddings", where),
        width=tw,
        layers=_get(t, "num_hidden_layers", where),
        heads=_get(t, "num_attention_heads", where),
        mlp_ratio=_get(t, "intermediate_size", where) / tw,
        norm_eps=_get(t, "layer_norm_eps", where, float),
        post_norm=True,
        fusion_start=0,
        pad_token_id=int(t.get("pad_token_id", 0)),
        eot_token_id=int(t.get("sep_token_id", 102)),
    )
    return FusionConfig(
        vision=vision,
        text=text,
        embed_dim=_get(meta, "image_text_hidden_size", where),
        text_decoder=False,
        mlm_weight=0.0,
        caption_weight=0.0,
    )


def config_to_hf(cfg: FusionConfig) -> dict:
    """The BlipConfig dict of a fusion model in the BLIP layout; ConfigError for one transformers cannot hold."""
    v, t = cfg.vision, cfg.text
    problems = []
    if cfg.fusion != "cross" or t.fusion_start != 0:
        problems.append("BLIP cross-attends in every text layer (fusion='cross', text.fusion_start=0)")
    if not t.post_norm:
        problems.append("BLIP's text encoder is post-norm (text.post_norm=true)")
    if v.ln_pre or v.proj or not v.patch_bias or not v.class_token or v.stem != "patch":
        problems.append(
            "BLIP's ViT has a class token, a biased patch projection, no pre-norm and no projection"
        )
    if v.act != "gelu" or t.act != "gelu":
        problems.append("BLIP uses gelu")
    if problems:
        raise ConfigError(
            "this fusion model has no BlipForImageTextRetrieval equivalent: " + "; ".join(problems)
        )
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "blip",
        "image_text_hidden_size": cfg.embed_dim,
        "projection_dim": cfg.embed_dim,
        "vision_config": {
            "model_type": "blip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.norm_eps,
            "hidden_act": "gelu",
        },
        "text_config": {
            "model_type": "blip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "encoder_hidden_size": v.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "layer_norm_eps": t.norm_eps,
            "hidden_act": "gelu",
            "pad_token_id": t.pad_token_id,
            "sep_token_id": t.eot_token_id,
            "is_decoder": True,
        },
    }


def rules(cfg: FusionConfig) -> Rules:
    """(vlmkit names, Hugging Face names): each side's tensors, concatenated along dim 0, are equal."""
    r: Rules = []
    v = "vision_model"
    r.append((("visual.class_embedding",), (f"{v}.embeddings.class_embedding",)))
    _same(r, "visual.patch_embed.proj", f"{v}.embeddings.patch_embedding")
    r.append((("visual.positional_embedding",), (f"{v}.embeddings.position_embedding",)))
    for i in range(cfg.vision.layers):
        o, h = f"visual.transformer.blocks.{i}", f"{v}.encoder.layers.{i}"
        _same(r, f"{o}.attn.qkv", f"{h}.self_attn.qkv")
        _same(r, f"{o}.attn.proj", f"{h}.self_attn.projection")
        _same(r, f"{o}.ln_1", f"{h}.layer_norm1")
        _same(r, f"{o}.ln_2", f"{h}.layer_norm2")
        _same(r, f"{o}.mlp.fc1", f"{h}.mlp.fc1")
        _same(r, f"{o}.mlp.fc2", f"{h}.mlp.fc2")
    _same(r, "visual.ln_post", f"{v}.post_layernorm")
    t = "text_encoder"
    r.append((("text.token_embedding.weight",), (f"{t}.embeddings.word_embeddings.weight",)))
    r.append((("text.positional_embedding",), (f"{t}.embeddings.position_embeddings.weight",)))
    _same(r, "text.ln_embed", f"{t}.embeddings.LayerNorm")
    for i in range(cfg.text.layers):
        o, h = f"text.blocks.{i}", f"{t}.encoder.layer.{i}"
        for p in ("weight", "bias"):  # vlmkit's fused qkv rows are q, k, v
            r.append(
                (
                    (f"{o}.attn.qkv.{p}",),
                    tuple(f"{h}.attention.self.{x}.{p}" for x in ("query", "key", "value")),
                )
            )
        _same(r, f"{o}.attn.proj", f"{h}.attention.output.dense")
        _same(r, f"{o}.ln_1", f"{h}.attention.output.LayerNorm")
        _same(r, f"{o}.cross_attn.q_proj", f"{h}.crossattention.self.query")
        _same(r, f"{o}.cross_attn.k_proj", f"{h}.crossattention.self.key")
        _same(r, f"{o}.cross_attn.v_proj", f"{h}.crossattention.self.value")
        _same(r, f"{o}.cross_attn.o_proj", f"{h}.crossattention.output.dense")
        _same(r, f"{o}.ln_cross", f"{h}.crossattention.output.LayerNorm")
        _same(r, f"{o}.mlp.fc1", f"{h}.intermediate.dense")
        _same(r, f"{o}.mlp.fc2", f"{h}.output.dense")
        _same(r, f"{o}.ln_2", f"{h}.output.LayerNorm")
    _same(r, "vision_proj", "vision_proj")
    _same(r, "text_proj", "text_proj")
    _same(r, "itm_head", "itm_head")
    return r


def state_dict_from_hf(state: dict[str, torch.Tensor], model: Fusion, where: str) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor BLIP has replaced by BLIP's (the rest as initialised)."""
    ours = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    for name in _HF_SHAPES:  # BLIP's leading 1s: (1, 1, C) -> (C,), (1, N, C) -> (N, C)
        if name in state:
            state[name] = state[name].flatten(0, -2) if "position" in name else state[name].flatten()
    return {**ours, **convert_state_from_hf(state, ours, rules(model.cfg), where)}


def state_dict_to_hf(model: Fusion) -> dict[str, torch.Tensor]:
    state = convert_state_to_hf(
        {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, rules(model.cfg)
    )
    for name, shape in _HF_SHAPES.items():
        state[name] = state[name].reshape(shape(model.cfg)).contiguous()
    return state


def load_hf_blip(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """A Hugging Face BLIP retrieval folder as a vlmkit fusion model (eval mode) with its preprocessing;
    its tokenizer when the folder has a tokenizer.json."""
    from vlmkit.data.tokenizer import Tokenizer

    path = Path(path)
    where = str(path / CONFIG)
    cfg = config_from_hf(load_json(path / CONFIG), where)
    model = Fusion(cfg)
    with torch.no_grad():  # no decoder, MLM head or temperature in the retrieval model: see the module
        model.lm_head.bias.zero_()
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), path / SAFETENSORS)
    model.load_state_dict(state_dict_from_hf(read_hf_weights(path), model, str(weights)))
    model.to(device).eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(
            path / "tokenizer.json", context_length=min(cfg.text.context_length, 64)
        )
        # BLIP's tokenizer adds [ENC] (put in place of [CLS] for ITM) and [DEC] (the decoder's first token)
        model.cfg.text.enc_token_id = tokenizer.token_to_id(ENC_TOKEN)
        model.cfg.text.dec_token_id = tokenizer.token_to_id(DEC_TOKEN)
    if (path / PREPROCESSOR).is_file():
        preprocess = preprocess_from_hf(load_json(path / PREPROCESSOR), str(path / PREPROCESSOR))
    else:  # BlipImageProcessor's defaults: squash to the size, OpenAI CLIP's mean and std
        preprocess = PreprocessConfig(image_size=cfg.vision.image_size, resize_mode="squash")
    return Pretrained(model, tokenizer, preprocess, path.name)


def save_hf_blip(model: Fusion, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` as a folder `transformers.BlipForImageTextRetrieval.from_pretrained` loads (weights and
    config; vlmkit-only parts, such as the decoder and the MLM head, are left out), with `tokenizer` as a
    Hugging Face tokenizer folder when given. Returns the folder."""
    model = unwrap(model)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.cfg.text.vocab_size}"
        )
    hf_config = config_to_hf(model.cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(state_dict_to_hf(model), out / SAFETENSORS)
    atomic_write_text(out / CONFIG, json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_hf(out)
    return out


__all__ = ["config_from_hf", "config_to_hf", "load_hf_blip", "save_hf_blip"]
