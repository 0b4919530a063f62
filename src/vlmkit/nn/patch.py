"""Patch embedding, patch dropout, learned position embeddings that resample to a new image size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to `width`.

    The weight is a strided conv's, (width, in_chans, p, p), but the forward is a reshape and one matmul:
    on CPU that is faster than the convolution forward and backward, and it gives the same result.
    """

    def __init__(self, patch_size: int, width: int, in_chans: int = 3, bias: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        B, C, H, W = x.shape
        gh, gw = H // p, W // p  # like the conv, drop edge pixels that do not fill a patch
        x = x[:, :, : gh * p, : gw * p].reshape(B, C, gh, p, gw, p)  # (B, C, gh, p, gw, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)  # (B, N, C*p*p), row-major patches
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, width)


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection: a drop-in PatchEmbed.

    Early convolutions give the transformer local edges and corners to start from, which makes it learn
    far faster from little data than a single linear patch projection (Xiao et al., 2021). The patch size
    must be a power of two; each stage halves the resolution and doubles the channels up to `width`.
    """

    def __init__(self, patch_size: int, width: int, in_chans: int = 3):
        super().__init__()
        stages = patch_size.bit_length() - 1
        assert 2**stages == patch_size, f"a conv stem needs a power-of-two patch size, not {patch_size}"
        self.patch_size = patch_size
        layers, chans = [], in_chans
        for i in range(stages):
            out = width // 2 ** (stages - i)  # width/8, width/4, width/2 for patch 8
            layers += [
                nn.Conv2d(chans, out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, out),
                nn.GELU(),
            ]
            chans = out
        layers.append(nn.Conv2d(chans, width, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C)


class PatchDropout(nn.Module):
    """FLIP's patch dropout: while training, keep a random `1 - prob` of each sample's patch tokens.

    Applied after the position embeddings, so every kept token still knows where it came from. Prefix tokens
    (the class token) are always kept; every sample keeps the same number of patches, so the batch stays one
    tensor. Nothing is dropped in eval mode: masking is a training speed-up, not an inference one.

    The noise comes from `generator` when one is set (on the input's device), else from the device's global
    generator, which `torch.manual_seed` seeds and training checkpoints save: runs are reproducible and
    resume exactly.
    """

    def __init__(self, prob: float, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout probability must be in [0, 1), not {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.generator: torch.Generator | None = None

    def num_kept(self, num_patches: int) -> int:
        return max(1, int(num_patches * (1 - self.prob)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, C) -> (B, prefix + K, C) in training, K = max(1, int(N * (1 - prob))); else x."""
        if not self.training or self.prob == 0.0:
            return x
        B, T, C = x.shape
        p = self.num_prefix_tokens
        keep = self.num_kept(T - p)
        noise = torch.rand(B, T - p, device=x.device, generator=self.generator)  # (B, N)
        index = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K), kept in raster order
        patches = x[:, p:].gather(1, index[:, :, None].expand(-1, -1, C))  # (B, K, C)
        return torch.cat([x[:, :p], patches], dim=1)  # (B, prefix + K, C)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


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
