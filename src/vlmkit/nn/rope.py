"""Rotary position embeddings in Llama's layout (channel i rotates with channel i + hs/2)."""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles for (B, T) positions: two (B, 1, T, hs) tensors.

    Angles are computed in float32 on every call (cheap) rather than read from a buffer, so casting the model
    to bf16 cannot round the frequencies.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / theta**exponent  # (hs/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hs/2)
    # Llama's layout: channel i rotates with channel i + hs/2 (rotate_half), not with its neighbour i + 1.
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # In x's dtype: under bf16 autocast the projections give bf16 q and k, and float32 angles would promote
    # them (a slower rotation, and attention inputs of mixed dtypes).
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)  # (B, nh, T, hs)
