"""Hugging Face Llama (`LlamaConfig` dicts, `LlamaForCausalLM` state dicts) <-> vlmkit DecoderConfig / Decoder.

vlmkit's Decoder uses Llama's module names, so a weight maps by adding or removing a prefix: "model." in
LlamaForCausalLM, "model.language_model." in transformers 5's LlavaForConditionalGeneration (convert/llava.py
reuses these functions), and the head is "lm_head.weight" in both. Rotary embeddings use the same rotate_half
layout, so q_proj / k_proj need no permutation. A config vlmkit cannot represent (scaled RoPE, sliding windows,
another activation, a head size other than width / heads, ...) is rejected with a ConfigError naming the key.
This module does not import transformers: the tests use it as the independent reference.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vlmkit.errors import ConfigError
from vlmkit.models.decoder import DecoderConfig

# transformers' LlamaConfig defaults, for the keys a config.json (or LLaVA's text_config) may leave out
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    mlp_bias=False,
    head_dim=None,
)
# Keys whose presence (with a value other than these) means an architecture the Decoder does not have.
_UNSUPPORTED = {
    "sliding_window": (None,),
    "use_sliding_window": (None, False),
    "partial_rotary_factor": (None, 1.0, 1),
    "qk_norm": (None, False),
}
_ROPE_SCALING_OK = (None, "default")


def _rope_theta(cfg: dict) -> float:
    """rope_theta from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    theta = cfg.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"config key {key!r} must be a dict, not {params!r}")
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]  # rope parameters nested by layer type
        kind = params.get("rope_type", params.get("type"))
        if kind not in _ROPE_SCALING_OK:
            raise ConfigError(
                f"config key {key!r} asks for RoPE type {kind!r}; vlmkit's decoder supports only unscaled RoPE"
            )
        theta = params.get("rope_theta", theta)
    return float(theta)


def decoder_config_from_hf(cfg: dict) -> DecoderConfig:
    """A DecoderConfig from a Llama config dict (config.json, or LLaVA's "text_config").

    Keys left out take transformers' LlamaConfig defaults. A list of eos ids keeps its first (generation takes
    the rest from the caller's GenerationConfig); a missing pad id becomes 0.
    """
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"config key 'model_type' is {model_type!r}; only 'llama' decoders can be imported")
    c = {**LLAMA_DEFAULTS, **cfg}
    if c["hidden_act"] != "silu":
        raise ConfigError(
            f"config key 'hidden_act' is {c['hidden_act']!r}; vlmkit's decoder uses SwiGLU ('silu')"
        )
    for key, allowed in _UNSUPPORTED.items():
        if c.get(key) not in allowed:
            raise ConfigError(f"config key {key!r} = {c[key]!r} is not supported by vlmkit's decoder")
    types = c.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        raise ConfigError(
            f"config key 'layer_types' lists {sorted(set(types))}; vlmkit has only full_attention"
        )
    width, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * heads != width:
        raise ConfigError(
            f"config key 'head_dim' is {head_dim} but hidden_size / num_attention_heads is {width // heads}; "
            "vlmkit's decoder needs head_dim = hidden_size / num_attention_heads"
        )
    eos = c["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        if not eos:
            raise ConfigError("config key 'eos_token_id' is an empty list")
        eos = eos[0]
    return DecoderConfig(
        vocab_size=c["vocab_size"],
        width=width,
        layers=c["num_hidden_layers"],
        heads=heads,
        kv_heads=c["num_key_value_heads"] or heads,
        mlp_hidden=c["intermediate_size"],
        max_seq_len=c["max_position_embeddings"],
        rope_theta=_rope_theta(c),
        norm_eps=c["rms_norm_eps"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=bool(c["attention_bias"]),
        mlp_bias=bool(c["mlp_bias"]),
        bos_token_id=c["bos_token_id"],
        eos_token_id=eos if eos is not None else 2,
        pad_token_id=c["pad_token_id"] if c["pad_token_id"] is not None else 0,
    )


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
    """A LlamaConfig dict (as `LlamaConfig(**d)` or config.json takes) for a Decoder without cross-attention."""
    if cfg.cross_attention_start is not None and cfg.cross_attention_start < cfg.layers:
        raise ConfigError(
            "decoder.cross_attention_start: Llama has no cross-attention layers to export them to"
        )
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.attention_bias,
        attention_dropout=0.0,
        mlp_bias=cfg.mlp_bias,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


# Every weight name of a vlmkit Decoder without cross-attention, minus "layers.{i}." and ".weight"/".bias".
_LAYER_NAMES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
}


def _is_llama_body_key(name: str) -> bool:
    if name in ("embed_tokens.weight", "norm.weight"):
        return True
    parts = name.split(".")
    return (
        len(parts) >= 4
        and parts[0] == "layers"
        and parts[1].isdigit()
        and ".".join(parts[2:-1]) in _LAYER_NAMES
        and parts[-1] in ("weight", "bias")
    )


def decoder_state_from_hf(
    state: dict[str, Tensor], prefix: str = "model.", lm_head: str = "lm_head.weight"
) -> dict:
    """The Decoder state dict inside a Hugging Face one: keys under `prefix` lose it, `lm_head` becomes
    "lm_head.weight". Other keys (a vision tower, ...) are ignored. A missing head means tied embeddings
    (as checkpoints saved with tie_word_embeddings omit it): the embedding matrix fills it."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.endswith("rotary_emb.inv_freq"):  # a recomputed buffer some older checkpoints saved
            continue
        if not _is_llama_body_key(name):
            raise ConfigError(f"weight {key!r} has no place in vlmkit's Llama-style decoder")
        out[name] = value
    if "embed_tokens.weight" not in out:
        raise ConfigError(
            f"no weight {prefix}embed_tokens.weight: is {prefix!r} the language model's prefix?"
        )
    out["lm_head.weight"] = state[lm_head] if lm_head in state else out["embed_tokens.weight"]
    return out


def decoder_state_to_hf(
    state: dict[str, Tensor],
    prefix: str = "model.",
    lm_head: str = "lm_head.weight",
    tie_embeddings: bool = False,
) -> dict:
    """A vlmkit Decoder state dict with Hugging Face names: `prefix` + name, the head as `lm_head`. With
    `tie_embeddings` the head is left out, as Hugging Face saves tied checkpoints (safetensors refuses
    shared tensors)."""
    out = {}
    for name, value in state.items():
        if name == "lm_head.weight":
            if not tie_embeddings:
                out[lm_head] = value
            continue
        if not _is_llama_body_key(name):
            raise ConfigError(f"weight {name!r} (cross-attention?) has no Llama equivalent")
        out[prefix + name] = value
    return out
