"""Patch embedding, learned position embeddings that resample to a new image size, attention pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.nn.transformer import MLP


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to `width` (a strided conv)."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubically resize a learned (N_prefix + H*W, C) position table to a new (H', W') patch grid.

    Prefix rows (the class token) are kept as they are; the grid rows are treated as an image.
    """
    prefix, grid = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[0]))
    assert old * old == grid.shape[0], "position table is not a square grid"
    if (old, old) == tuple(new_grid):
        return pos_embed
    C = grid.shape[-1]
    grid = grid.reshape(1, old, old, C).permute(0, 3, 1, 2).float()  # (1, C, H, W)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, C).to(pos_embed.dtype)  # (H'*W', C)
    return torch.cat([prefix, grid], dim=0)


class AttentionPool(nn.Module):
    """Multi-head attention pooling (SigLIP's MAP head): a learned probe attends over all tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu_tanh", eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.num_heads
        q = self.q(self.probe.expand(B, -1, -1)).view(B, 1, self.num_heads, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k, v = self.kv(x).view(B, T, 2, self.num_heads, hs).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, C)
