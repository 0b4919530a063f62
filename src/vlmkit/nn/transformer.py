"""Transformer blocks shared by the image and text towers and the fusion encoder: Block -> Transformer.

A block is `x + attn(ln(x))`, then `x + mlp(ln(x))` (pre-norm, CLIP and ViT), with the fused-qkv `Attention`
(nn/attention.py) and the GELU `MLP` (nn/mlp.py). Options for fusion encoders: `post_norm` (`ln(x + f(x))`,
BERT's layout and BLIP's text encoder), a cross-attention sublayer to other tokens between the two
(`cross_dim`: ALBEF/BLIP's fusion layers), and a second, causal self-attention that a decoder sharing
everything else with the encoder uses (`causal_attn`: BLIP's image-grounded text decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.nn.attention import Attention, CrossAttention, attention
from vlmkit.nn.mlp import MLP
from vlmkit.nn.packing import Packing


class Block(nn.Module):
    """Residual block: self-attention, optionally cross-attention to `context` tokens, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        eps: float = 1e-5,
        *,
        post_norm: bool = False,
        cross_dim: int | None = None,
        causal_attn: bool = False,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        if cross_dim:  # queries from these tokens, keys and values from `context` (B, N, cross_dim)
            self.ln_cross = nn.LayerNorm(dim, eps=eps)
            self.cross_attn = CrossAttention(dim, num_heads, num_heads, cross_dim, bias=True)
        else:
            self.ln_cross = self.cross_attn = None
        if causal_attn:  # the decoder's own self-attention (and its norm); all else is shared
            self.ln_causal = nn.LayerNorm(dim, eps=eps)
            self.attn_causal = Attention(dim, num_heads)
        else:
            self.ln_causal = self.attn_causal = None
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        packing: Packing | None = None,
        index: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        decoder: bool = False,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `index` (B,), the output at one token per row (see `forward_one`).
        Both go through this forward, so that module hooks (FSDP's gathering of the weights) see them.

        `context` (B, N, cross_dim): the tokens the cross-attention reads (a block without one skips it);
        `context_mask` a boolean (B, 1, 1 or T, N) mask of them. `decoder`: self-attention through
        `attn_causal` (pass `is_causal` or a causal `attn_mask` with it)."""
        if index is not None:
            if self.post_norm or context is not None or decoder:
                raise ValueError("forward_one is for pre-norm self-attention blocks")
            return self.forward_one(x, index, attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        ln, attn = (self.ln_causal, self.attn_causal) if decoder else (self.ln_1, self.attn)
        if attn is None:
            raise ValueError("this block has no causal self-attention: build it with causal_attn=True")
        cross = context is not None and self.cross_attn is not None
        if self.post_norm:
            x = ln(x + attn(x, attn_mask=attn_mask, is_causal=is_causal, packing=packing))
            if cross:
                x = self.ln_cross(x + self.cross_attn(x, context, context_mask, None, 0))
            return self.ln_2(x + self.mlp(x))
        x = x + attn(ln(x), attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        if cross:
            x = x + self.cross_attn(self.ln_cross(x), context, context_mask, None, 0)
        return x + self.mlp(self.ln_2(x))

    def forward_one(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """The block's output at one token per row, `x[b, index[b]]`: (B, T, C) -> (B, C).

        Keys and values still come from every token, but the query, output projection and MLP run for the
        one token only. A tower pooled at one token calls this for its last block: the same result as
        `forward(x)[arange(B), index]` for about 1/12 of the block's matmul FLOPs on the other tokens.
        With `packing`, x is the packed tokens (N, C) and `index[b]` must be row b's last real token.
        """
        attn = self.attn
        C = x.shape[-1]
        nh, hs = attn.num_heads, C // attn.num_heads
        h = self.ln_1(x)  # (B, T, C), or (N, C) packed
        w, b = attn.qkv.weight, attn.qkv.bias  # rows [0, C) make q, [C, 3C) make k and v
        kv = F.linear(h, w[C:], b[C:])
        if packing is None:
            B, T = x.shape[:2]
            rows = torch.arange(B, device=x.device)
            x_one, h_one = x[rows, index], h[rows, index]  # (B, C) each
        else:
            B, T = packing.B, packing.T
            x_one, h_one = x[packing.last], h[packing.last]
            kv = packing.unpack(kv)  # (N, 2C) -> (B, T, 2C)
        q = F.linear(h_one, w[:C], b[:C]).view(B, nh, 1, hs)
        k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in kv.split(C, dim=-1))  # (B, nh, T, hs) each
        if attn_mask is not None:  # the mask's row for each query: (B or 1, 1, T, T) -> (B, 1, 1, T)
            rows = torch.arange(B, device=x.device)
            mask = attn_mask.expand(B, -1, T, T)[rows, :, index][:, :, None, :]
        elif is_causal:  # the query at position i attends to keys 0..i
            mask = (torch.arange(T, device=x.device)[None, :] <= index[:, None])[:, None, None, :]
        else:
            mask = None
        y = attention(q, k, v, attn_mask=mask).reshape(B, C)  # (B, C)
        y = x_one + attn.proj(y)
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    """A stack of pre-norm blocks. Masks: `is_causal` and/or a boolean `attn_mask` (True = attend)."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act, eps) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        index: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `index` (B,), only the output at token `index[b]` of each row: (B, C).

        With `packing` the input is the packed tokens (N, C) (see `Packing`), and so is the output without
        `index`.
        """
        blocks = self.blocks if index is None else self.blocks[:-1]
        for block in blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, attn_mask, is_causal, packing, use_reentrant=False
                )
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        if index is not None:
            if not len(self.blocks):
                return (
                    x[packing.last]
                    if packing is not None
                    else x[torch.arange(x.shape[0], device=x.device), index]
                )
            return self.blocks[-1](x, attn_mask=attn_mask, is_causal=is_causal, packing=packing, index=index)
        return x


def padding_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Turn a (B, T) 1/0 key-padding mask into a boolean (B, 1, T, T) SDPA mask (True = attend).

    Padded queries still attend to themselves so no row is all-False (that would give NaN).
    """
    B, T = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    mask = keep.expand(B, 1, T, T)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return mask | eye  # (B, 1, T, T)
