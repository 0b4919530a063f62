"""Attention: one `attention` function (SDPA, or explicit matmuls where those are faster), the fused-qkv
multi-head self-attention of the ViT and text towers, and grouped-query self- and cross-attention with
separate q/k/v projections (Llama's layout, and CoCa's cross-attention to image tokens).

`attention` is `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CPU and GPU), except bf16
training on CPU on short sequences, where two batched matmuls and a float32 softmax are much faster.

The attention weights of every call, in call order, are there for the asking (saliency, rollout):

    with record_attention() as maps:          # retain_grad=True keeps their gradients too (Chefer et al.)
        model.encode_image(pixels)
    maps[0]                                   # (B, nh, T, S) float32, rows summing to 1

Recording computes attention explicitly (the output equals SDPA's to rounding); it costs nothing when off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.nn.kv_cache import KVCache
from vlmkit.nn.packing import Packing
from vlmkit.nn.rope import apply_rotary

# Longest key sequence for which `attention` trains in bf16 on CPU with explicit matmuls rather than the
# flash kernel: measured faster up to 257 tokens (ViT-L/14 at 224), slower at 577 (ViT-L/14 at 336).
EXPLICIT_ATTENTION_MAX_LEN = 320


class AttentionMaps(list):
    """The attention weights recorded by `record_attention`, one (B, nh, T, S) tensor per call."""

    def __init__(self, retain_grad: bool):
        super().__init__()
        self.retain_grad = retain_grad


_RECORDERS: list[AttentionMaps] = []


@contextlib.contextmanager
def record_attention(retain_grad: bool = False) -> Iterator[AttentionMaps]:
    """Record the softmax weights of every `attention` call inside the block (see the module docstring); with
    `retain_grad`, weights that are part of an autograd graph keep their `.grad` after a backward pass."""
    maps = AttentionMaps(retain_grad)
    _RECORDERS.append(maps)
    try:
        yield maps
    finally:
        _RECORDERS.remove(maps)


def _explicit_weights(q, k, attn_mask, is_causal) -> torch.Tensor:
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, nh, T, S), scaled in float32
    if is_causal:  # adding a -inf triangle is cheaper than a masked fill
        att = att + torch.full((T, S), float("-inf"), device=q.device).triu(1)
    elif attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else att + attn_mask
    return att.softmax(dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) v for (B, nh, T, hs) inputs; a boolean `attn_mask` is True = attend.

    This is `F.scaled_dot_product_attention`, except when training in bf16/fp16 on CPU on short sequences:
    there the backward of its flash kernel is ~4x slower than two batched matmuls and a float32 softmax.
    `enable_gqa`: k and v have fewer heads (B, nkv, S, hs), each shared by nh // nkv query heads.
    """
    explicit = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad
    recording = bool(_RECORDERS)
    if not recording and (not explicit or k.shape[-2] > EXPLICIT_ATTENTION_MAX_LEN):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa
        )
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    weights = _explicit_weights(q, k, attn_mask, is_causal)
    for maps in _RECORDERS:
        if maps.retain_grad and weights.requires_grad:
            weights.retain_grad()
        maps.append(weights)
    return weights.to(v.dtype) @ v  # (B, nh, T, hs)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `packing`, packed tokens (N, C) -> (N, C)."""
        qkv = self.qkv(x)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (N, 3C) -> (B, T, 3C)
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        hs = C // self.num_heads
        # Three views of one matmul's output; in bf16 training split's backward beat unbind's on the text tower.
        q, k, v = (t.view(B, T, self.num_heads, hs).transpose(1, 2) for t in qkv.split(C, dim=-1))
        y = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        if packing is not None:
            y = packing.pack(y)  # (N, C)
        return self.proj(y)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention: nh query heads share nkv key/value heads (nh // nkv queries per kv head)."""

    def __init__(self, width: int, heads: int, kv_heads: int, kv_dim: int, bias: bool = False):
        super().__init__()
        self.nh, self.nkv, self.hs = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, self.nh * self.hs, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.nkv * self.hs, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.nkv * self.hs, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.hs, width, bias=bias)

    def split(self, x: Tensor, n: int, packing: Packing | None = None) -> Tensor:
        """(B, T, n * hs), or packed tokens (N, n * hs) with `packing`, -> (B, n, T, hs)"""
        if packing is not None:
            x = packing.unpack(x)
        B, T, _ = x.shape
        return x.view(B, T, n, self.hs).transpose(1, 2)  # (B, n, T, hs)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        is_causal: bool = False,
        packing: Packing | None = None,
    ) -> Tensor:
        if self.nkv != self.nh and mask is not None:
            # SDPA's own GQA path has no masked kernel on GPU; repeating k/v keeps the fast one (as HF does).
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        # SDPA, or in bf16 training on CPU two matmuls and a float32 softmax (`attention` above)
        y = attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.nkv != self.nh and mask is None
        )  # (B, nh, T, hs)
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
        return self.o_proj(packing.pack(y) if packing is not None else y)  # (B, T, C) or packed (N, C)


class SelfAttention(GroupedQueryAttention):
    def __init__(self, width: int, heads: int, kv_heads: int, bias: bool = False):
        super().__init__(width, heads, kv_heads, width, bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
        packing: Packing | None = None,
    ) -> Tensor:
        q = apply_rotary(self.split(self.q_proj(x), self.nh, packing), *rope)  # (B, nh, T, hs)
        k = apply_rotary(self.split(self.k_proj(x), self.nkv, packing), *rope)  # (B, nkv, T, hs)
        v = self.split(self.v_proj(x), self.nkv, packing)  # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): cached tokens + these
        return self.attend(q, k, v, mask, is_causal, packing)


class CrossAttention(GroupedQueryAttention):
    """Queries from the text, keys and values from `encoder_states` (no positions: image tokens are a set)."""

    def forward(
        self,
        x: Tensor,
        encoder_states: Tensor | None,
        encoder_mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        packing: Packing | None = None,
    ) -> Tensor:
        q = self.split(self.q_proj(x), self.nh, packing)  # (B, nh, T, hs)
        if cache is not None and layer in cache.cross:
            k, v = cache.cross[layer]  # the encoder does not change while decoding: project it once
        else:
            k = self.split(self.k_proj(encoder_states), self.nkv)  # (B, nkv, N, hs)
            v = self.split(self.v_proj(encoder_states), self.nkv)
            if cache is not None:
                cache.cross[layer] = (k, v)
        return self.attend(q, k, v, encoder_mask, packing=packing)
