"""Llama-style decoder LM: tokens -> blocks (RoPE attention, SwiGLU MLP, RMSNorm) -> norm -> lm_head.

Reads top to bottom: DecoderConfig -> Block -> Decoder; the blocks' parts (RMSNorm, rotary embeddings,
grouped-query self- and cross-attention, SwiGLU) are the shared ones in `vlmkit.nn`.
Module names, separate q/k/v projections and the rotate_half RoPE layout are those of Hugging Face's
LlamaForCausalLM, so Llama weights load one to one (convert/llama.py). Layers i >= `cross_attention_start`
add a cross-attention sub-block over `encoder_states`: CoCa's multimodal text decoder, whose layers below
that index are the unimodal text encoder. Incremental decoding writes keys and values into a preallocated
KVCache (nn/kv_cache.py); generation itself lives in models/generation.py.

Training batches are right-padded: their real tokens are packed (nn/transformer.py `Packing`), so the
projections, norms and MLPs never run on padding, and only attention sees (B, T) rows. Attention is the
shared `vlmkit.nn.attention.attention` (explicit matmuls for bf16 training on CPU, SDPA otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmkit.errors import ConfigError
from vlmkit.nn.attention import CrossAttention, SelfAttention
from vlmkit.nn.kv_cache import KVCache
from vlmkit.nn.mlp import SwiGLU
from vlmkit.nn.norm import RMSNorm
from vlmkit.nn.packing import Packing
from vlmkit.nn.rope import rotary_cos_sin


def llama_mlp_hidden(width: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU hidden size: 2/3 of 4 * width (same parameters as a 4x GELU MLP), rounded up."""
    hidden = int(2 * 4 * width / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class DecoderConfig:
    vocab_size: int = 32000
    width: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int | None = None  # grouped-query attention; None = heads
    mlp_hidden: int | None = None  # SwiGLU hidden size; None = Llama's rule from width
    max_seq_len: int = (
        2048  # the context trained for (HF's max_position_embeddings); RoPE does not enforce it
    )
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    cross_attention_start: int | None = None  # layers i >= this also cross-attend to encoder_states (CoCa)
    encoder_width: int | None = None  # width of encoder_states; None = width
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.mlp_hidden is None:
            self.mlp_hidden = llama_mlp_hidden(self.width)
        if self.encoder_width is None:
            self.encoder_width = self.width
        for name in (
            "vocab_size",
            "width",
            "heads",
            "kv_heads",
            "mlp_hidden",
            "encoder_width",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"decoder.{name} must be positive, not {getattr(self, name)}")
        if self.layers < 0:
            raise ConfigError(f"decoder.layers must be >= 0, not {self.layers}")
        if self.width % self.heads:
            raise ConfigError(f"decoder.width {self.width} is not divisible by decoder.heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"decoder.heads {self.heads} is not divisible by decoder.kv_heads {self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head size; width/heads is {self.head_dim}")
        if self.cross_attention_start is not None and not 0 <= self.cross_attention_start <= self.layers:
            raise ConfigError(
                f"decoder.cross_attention_start must be in [0, layers={self.layers}], "
                f"not {self.cross_attention_start}"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("decoder.rope_theta and decoder.norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass
class DecoderOutput:
    logits: Tensor | None  # (B, T, V), or (B, 1, V) with logits="last", None with logits="none"
    hidden: Tensor  # (B, T, C) after the final RMSNorm
    unimodal: Tensor | None  # (B, T, C) output of the last layer before cross_attention_start (not normed)


class Block(nn.Module):
    """Pre-norm residual block: x + self_attn(norm(x)) [+ cross_attn(norm(x), enc)], then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig, cross: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg.width, cfg.heads, cfg.kv_heads, cfg.attention_bias)
        self.cross_attn_norm = RMSNorm(cfg.width, cfg.norm_eps) if cross else None
        self.cross_attn = (
            CrossAttention(cfg.width, cfg.heads, cfg.kv_heads, cfg.encoder_width, cfg.attention_bias)
            if cross
            else None
        )
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_hidden, cfg.mlp_bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
        encoder_states: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        packing: Packing | None = None,
    ) -> Tensor:
        """(B, T, C) -> (B, T, C); with `packing` the packed real tokens (N, C) -> (N, C)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, layer, packing)
        if self.cross_attn is not None:
            h = self.cross_attn_norm(x)
            x = x + self.cross_attn(h, encoder_states, encoder_mask, cache, layer, packing)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)


def self_attention_mask(
    attention_mask: Tensor | None, past: int, T: int, device: torch.device
) -> tuple[Tensor | None, bool]:
    """SDPA masking for T new queries after `past` cached keys: (boolean attn_mask or None, is_causal).

    Without padding the common cases need no mask tensor: a prefill is plain causal, and one new token sees
    every cached key. Otherwise the mask is causal (query at position past+i sees keys 0..past+i) and drops
    padded keys. A padded query (left padding) would then see no key at all, and a fully masked softmax row
    is NaN; it attends to itself instead, which is finite and harmless since nothing reads its output.
    """
    if attention_mask is None and past == 0:
        return None, T > 1
    if attention_mask is None and T == 1:
        return None, False
    q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past + T, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos  # (T, S)
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)  # (B, 1, T, S)
    return mask, False


def right_padded_packing(attention_mask: Tensor | None) -> Packing | None:
    """A `Packing` of the real tokens when every row of `attention_mask` (B, T) is real tokens then padding
    and packing saves enough (see `Packing.maybe`); None otherwise (no mask, left padding, little padding)."""
    if attention_mask is None or attention_mask.shape[1] < 2:
        return None
    lengths = attention_mask.sum(dim=1)  # (B,)
    T = attention_mask.shape[1]
    right = torch.arange(T, device=attention_mask.device)[None, :] < lengths[:, None]  # (B, T)
    if not torch.equal(attention_mask.bool(), right):
        return None
    return Packing.maybe(lengths, T)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        start = cfg.cross_attention_start
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(
            [Block(cfg, cross=start is not None and i >= start) for i in range(cfg.layers)]
        )
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * layers) (GPT-2), so the
        residual stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = 0.02 / math.sqrt(2 * max(self.cfg.layers, 1))
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=residual_std)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings: (B, T) -> (B, T, C)."""
        return self.embed_tokens(input_ids)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KVCache for `batch_size` rows of up to `max_len` tokens (prompt + new), on the model's
        device and dtype unless given."""
        w = self.embed_tokens.weight
        cfg = self.cfg
        return KVCache(
            cfg.layers,
            batch_size,
            cfg.kv_heads,
            cfg.head_dim,
            max_len,
            device=device or w.device,
            dtype=dtype or w.dtype,
        )

    def _inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past: int, cache=None):
        """Embeddings, rotary (cos, sin) and the self-attention mask shared by every layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if getattr(cache, "per_row", False):  # SlotKVCache (continuous batching): each row at its own length
            position_ids, mask = cache.positions_and_mask(T)
            is_causal = False
        else:
            if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must cover all {past + T} positions (cached + new) for {B} rows, "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            if position_ids is None:
                if (
                    attention_mask is not None
                ):  # Hugging Face's rule: count real tokens, so left padding starts at 0
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
                else:
                    position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)  # (B, T)
            mask, is_causal = self_attention_mask(attention_mask, past, T, x.device)
        rope = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        return x, rope, mask, is_causal

    def _run_layers(
        self, x, layers, rope, mask, is_causal, cache, encoder_states=None, encoder_mask=None, packing=None
    ):
        for i, block in layers:
            args = (x, rope, mask, is_causal, cache, i, encoder_states, encoder_mask, packing)
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return x  # (B, T, C)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        encoder_states: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        logits: str = "all",
    ) -> DecoderOutput:
        """Run T new tokens (ids (B, T) or embeddings (B, T, C)) after the `cache.length` cached ones.

        attention_mask (B, cache.length + T): 1 = real token, 0 = padding, over all positions so far. With a
        `SlotKVCache` the cache gives each row's positions and mask instead (no attention_mask).
        logits: "all" (B, T, V), "last" (B, 1, V): the last position only (prefill), or "none".
        """
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        past = cache.length if cache is not None else 0
        x, rope, mask, is_causal = self._inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, past, cache
        )
        start = self.cfg.cross_attention_start
        if start is not None and start < self.cfg.layers:
            if encoder_mask is not None:
                encoder_mask = encoder_mask.bool()[:, None, None, :]  # (B, 1, 1, N), True = attend
                if cache is not None:
                    cache.cross_mask = encoder_mask
            elif cache is not None:
                encoder_mask = cache.cross_mask
            if encoder_states is None and not (cache is not None and cache.cross):
                raise ValueError(
                    f"layers >= {start} cross-attend: pass encoder_states (or use forward_unimodal for the "
                    "text-only layers)"
                )
        packing = right_padded_packing(attention_mask) if cache is None else None
        if packing is not None:
            # Right padding (a training batch): the per-token layers run on the real tokens only. A real
            # token's causal keys are all real, so the attention needs no padding mask.
            x, mask, is_causal = packing.pack(x), None, True  # (N, C)
        layers = list(enumerate(self.layers))
        unimodal = None
        if start is not None:
            x = unimodal = self._run_layers(x, layers[:start], rope, mask, is_causal, cache, packing=packing)
            layers = layers[start:]
        x = self._run_layers(x, layers, rope, mask, is_causal, cache, encoder_states, encoder_mask, packing)
        if cache is not None:
            cache.advance(x.shape[1])
        h = self.norm(x)  # (B, T, C), or packed (N, C)
        if packing is not None:  # back to (B, T, C), zeros at the padding
            h = packing.unpack(h)
            unimodal = packing.unpack(unimodal) if unimodal is not None else None
        if logits == "none":
            out = None
        elif logits == "last":
            out = self.lm_head(h[:, -1:])  # (B, 1, V): a prefill needs only the next token's distribution
        else:
            out = self.lm_head(h)  # (B, T, V)
        return DecoderOutput(logits=out, hidden=h, unimodal=unimodal)

    def forward_unimodal(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Only the layers before cross_attention_start (CoCa's text encoder): (B, T) -> (B, T, C), not normed.

        Equal to `forward(...).unimodal` without running (or needing encoder states for) the cross layers.
        """
        start = self.cfg.cross_attention_start
        if start is None:
            raise ValueError("this decoder has no cross-attention layers, so no unimodal part")
        x, rope, mask, is_causal = self._inputs(input_ids, inputs_embeds, attention_mask, None, 0)
        return self._run_layers(x, list(enumerate(self.layers))[:start], rope, mask, is_causal, None)
