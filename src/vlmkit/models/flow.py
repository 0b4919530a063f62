"""Text-to-image by flow matching: a small FiLM-conditioned UNet in pixel space, trained as a rectified flow.

    x_t = (1 - t) x_0 + t x_1      x_0 ~ N(0, I) noise, x_1 an image (normalised), t ~ sigmoid(N(0, 1))
    loss = | v(x_t, t, c) - (x_1 - x_0) |^2

(Liu et al. 2022's rectified flow with the logit-normal time sampling of Esser et al. 2024.) The condition c is a
caption's embedding from a frozen text tower (a vlmkit CLIP's `encode_text`), replaced by a learned null
embedding for `cond_drop` of the batch, so one network gives both the conditional and the unconditional
velocity; sampling integrates dx/dt = v_u + s (v_c - v_u) from noise at t = 0 to an image at t = 1 with Euler
steps (classifier-free guidance, scale s). Time and condition enter every residual block as a FiLM scale and
shift of its normalised features.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError


@dataclass
class FlowConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)  # one resolution each: 32 -> 16 -> 8
    cond_dim: int = 128  # the text tower's embedding size
    embed_dim: int = 128  # time + condition embedding inside the network
    cond_drop: float = 0.1

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if any(c % 8 for c in self.channels):
            raise ConfigError(f"channels {self.channels} must be multiples of 8 (group norm of 8 groups)")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(f"image_size {self.image_size} must divide by {2 ** (len(self.channels) - 1)}")


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of t in [0, 1] (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FiLMBlock(nn.Module):
    """x + conv(silu(film(norm(conv(silu(norm(x)))), e))), with a 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class FlowUNet(nn.Module):
    """v(x_t, t, c): images (B, 3, S, S), times (B,), condition embeddings (B, cond_dim) or None (the null
    condition) -> velocities (B, 3, S, S)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        ch, e = cfg.channels, cfg.embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_proj = nn.Linear(cfg.cond_dim, e)
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList(FiLMBlock(ch[max(i - 1, 0)], c, e) for i, c in enumerate(ch))
        self.mid = FiLMBlock(ch[-1], ch[-1], e)
        self.up = nn.ModuleList(
            FiLMBlock(2 * c, ch[max(i - 1, 0)], e) for i, c in reversed(list(enumerate(ch)))
        )
        self.out = nn.Sequential(nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            cond = self.null_cond.expand(x.shape[0], -1)
        e = F.silu(self.time_mlp(time_embedding(t, self.cfg.embed_dim)) + self.cond_proj(cond))
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), e)
        return self.out(h)

    def drop_condition(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`cond` with `cond_drop` of its rows replaced by the null embedding (training)."""
        drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < self.cfg.cond_drop
        return torch.where(drop[:, None], self.null_cond.to(cond.dtype).expand_as(cond), cond)


def flow_loss(
    velocity: Callable[[Tensor, Tensor], Tensor], x1: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Rectified-flow loss of `velocity(x_t, t)` on images x1 (B, ...): noise and logit-normal times drawn
    here."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    t = torch.sigmoid(torch.randn(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype))
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = (1 - tt) * x0 + tt * x1
    return F.mse_loss(velocity(xt, t), x1 - x0)


def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor, steps: int) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (x0) to t = 1 in `steps` equal Euler steps."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    x = x0
    ts = torch.linspace(0, 1, steps + 1, device=x0.device, dtype=x0.dtype)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * velocity(x, t)
    return x


def guided(model: FlowUNet, cond: Tensor, scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The classifier-free guided velocity v_u + scale (v_c - v_u), both halves in one batch."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(x, t, cond)
        null = model.null_cond.to(cond.dtype).expand_as(cond)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        vc, vu = v.chunk(2)
        return vu + scale * (vc - vu)

    return velocity
