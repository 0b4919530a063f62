"""Pre-norm transformer blocks shared by every tower: MLP -> Attention -> Block -> Transformer.

Attention is `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CPU and GPU), except
bf16 training on CPU, where two batched matmuls and a softmax are much faster (see `attention`).
q, k and v come from one fused projection: one large matmul is faster than three small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that OpenAI's CLIP was trained with.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        from vlmkit.errors import ConfigError

        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.act_name = act
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# Longest key sequence for which `attention` trains in bf16 on CPU with explicit matmuls rather than the
# flash kernel: measured faster up to 257 tokens (ViT-L/14 at 224), slower at 577 (ViT-L/14 at 336).
EXPLICIT_ATTENTION_MAX_LEN = 320


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
    if not explicit or k.shape[-2] > EXPLICIT_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa
        )
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, nh, T, S), scaled in float32
    if is_causal:  # adding a -inf triangle is cheaper than a masked fill
        att = att + torch.full((T, S), float("-inf"), device=q.device).triu(1)
    elif attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else att + attn_mask
    return att.softmax(dim=-1).to(v.dtype) @ v  # (B, nh, T, hs)


class Packing:
    """Rows of different lengths packed into one (N, C) tensor of their N real tokens, without padding.

    Row b holds tokens 0 .. lengths[b]-1 of a (B, T) batch. The per-token layers (norms, projections, MLP)
    run on the packed tokens; only attention, which needs each row's sequence, unpacks them to (B, T, .)
    and back. A causal tower read out at each row's last real token (CLIP's end-of-text) computes nothing
    for the padding after it, which no real token can see.
    """

    def __init__(self, lengths: torch.Tensor, T: int):
        B = lengths.shape[0]
        self.B, self.T = B, T
        keep = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = keep.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened (B * T)
        self.last = lengths.cumsum(0) - 1  # (B,) each row's last token in the packed (N,)

    @classmethod
    def maybe(cls, lengths: torch.Tensor, T: int, min_saving: float = 0.15) -> Packing | None:
        """A packing when it removes at least `min_saving` of the B x T tokens (else None: not worth it)."""
        return cls(lengths, T) if int(lengths.sum()) <= (1 - min_saving) * lengths.shape[0] * T else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D) with zeros at the padding."""
        out = x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.B, self.T, -1)


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


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-5
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        packing: Packing | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `index` (B,), the output at one token per row (see `forward_one`).
        Both go through this forward, so that module hooks (FSDP's gathering of the weights) see them."""
        if index is not None:
            return self.forward_one(x, index, attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, packing=packing)
        x = x + self.mlp(self.ln_2(x))
        return x

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
