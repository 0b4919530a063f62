"""Text-to-image by flow matching: a small FiLM-conditioned UNet in pixel space, trained as a rectified flow.

    x_t = (1 - t) x_0 + t x_1      x_0 ~ N(0, I) noise, x_1 an image (normalised), t ~ sigmoid(N(0, 1))
    loss = | v(x_t, t, c) - (x_1 - x_0) |^2

(Liu et al. 2022's rectified flow with the logit-normal time sampling of Esser et al. 2024.) The condition c is a
caption's embedding from a frozen text tower (a vlmkit CLIP's `encode_text`), replaced by a learned null
embedding for `cond_drop` of the batch, so one network gives both the conditional and the unconditional
velocity; sampling integrates dx/dt = v_u + s (v_c - v_u) from noise at t = 0 to an image at t = 1 with Euler
steps (classifier-free guidance, scale s). Two networks compute v (`FlowConfig.arch`):

- `unet`: a UNet whose every residual block takes time and condition as a FiLM scale and shift of its
  normalised features; with `context_dim`, its lowest resolution also cross-attends to the caption's token
  states (masked; a learned null token is always readable, and is all a dropped caption leaves), and two
  coordinate channels join its input (Stable Diffusion conditions on a CLIP's tokens the same way);
- `dit`: a patch transformer (Peebles & Xie's DiT): patches of `patch` pixels as tokens with learned positions,
  blocks whose layer norms are modulated by the embedding and whose residual branches are gated by it, the
  gates starting at zero (adaLN-Zero).

`build_flow_model(cfg)` builds the one `arch` names; both take (x_t, t, c) and return the velocity.

`FlowModel` (the registry's `flow` family) is the whole text-to-image model: a CLIP text tower (frozen; its
weights come from a trained CLIP folder), the velocity network, and an exponential moving average of the
network's weights (torch.optim.swa_utils.AveragedModel, updated after every optimizer step), which sampling
uses by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError
from vlmkit.models.text import TextConfig, TextTransformer
from vlmkit.nn.attention import Attention
from vlmkit.nn.mlp import MLP


@dataclass
class FlowConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)  # one resolution each: 32 -> 16 -> 8
    cond_dim: int = 128  # the text tower's embedding size
    embed_dim: int = 128  # time + condition embedding inside the network
    cond_drop: float = 0.1
    arch: str = "unet"  # or "dit"
    patch: int = 4  # dit: pixels per patch side
    width: int = 128  # dit
    layers: int = 4  # dit
    heads: int = 4  # dit; unet: cross-attention heads
    # unet: > 0 adds cross-attention from the lowest resolution's features to the caption's token states (of
    # this width), and two coordinate channels to the input, so that words of place can find their pixels
    context_dim: int = 0

    def __post_init__(self):
        if self.arch not in ("unet", "dit"):
            raise ConfigError(f"arch must be 'unet' or 'dit', not {self.arch!r}")
        if self.arch == "dit" and self.context_dim:
            raise ConfigError("context_dim (cross-attention to the caption's tokens) is for arch 'unet'")
        if self.arch == "dit" and self.image_size % self.patch:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of patch {self.patch}")
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


class _Conditioned(nn.Module):
    """What both networks share: the embedding of time and condition, the null condition, condition dropout."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_proj = nn.Linear(cfg.cond_dim, e)
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))

    def embedding(self, t: Tensor, cond: Tensor | None, batch: int) -> Tensor:
        if cond is None:
            cond = self.null_cond.expand(batch, -1)
        return F.silu(self.time_mlp(time_embedding(t, self.cfg.embed_dim)) + self.cond_proj(cond))

    def drop_condition(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`cond` with `cond_drop` of its rows replaced by the null embedding (training)."""
        drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < self.cfg.cond_drop
        return torch.where(drop[:, None], self.null_cond.to(cond.dtype).expand_as(cond), cond)


class CrossAttention(nn.Module):
    """h + out(attention(q(norm(h)), k(context), v(context))) over the spatial positions of h (B, C, H, W);
    `mask` (B, T) marks the context tokens to read; the output projection starts at zero."""

    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, C, H, W = h.shape
        n = self.heads
        q = self.q(self.norm(h).flatten(2).transpose(1, 2))  # (B, HW, C)
        k, v = self.kv(context).chunk(2, dim=-1)  # (B, T, C) each
        q, k, v = (z.view(B, -1, n, C // n).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        o = self.out(o.transpose(1, 2).reshape(B, H * W, C))
        return h + o.transpose(1, 2).view(B, C, H, W)


class FlowUNet(_Conditioned):
    """v(x_t, t, c): images (B, 3, S, S), times (B,), condition embeddings (B, cond_dim) or None (the null
    condition) -> velocities (B, 3, S, S)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        ch, e = cfg.channels, cfg.embed_dim
        ctx = cfg.context_dim
        self.stem = nn.Conv2d(3 + (2 if ctx else 0), ch[0], 3, padding=1)
        self.down = nn.ModuleList(FiLMBlock(ch[max(i - 1, 0)], c, e) for i, c in enumerate(ch))
        self.mid = FiLMBlock(ch[-1], ch[-1], e)
        self.up = nn.ModuleList(
            FiLMBlock(2 * c, ch[max(i - 1, 0)], e) for i, c in reversed(list(enumerate(ch)))
        )
        self.out = nn.Sequential(nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1))
        if ctx:  # after the lowest resolution's down block, the middle block and its up block
            self.cross = nn.ModuleList(CrossAttention(c, ctx, cfg.heads) for c in (ch[-1], ch[-1], ch[-2]))
            self.null_context = nn.Parameter(
                torch.zeros(1, ctx)
            )  # always readable: the empty caption's token

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """`context` (B, T, context_dim): the caption's token states, `context_mask` (B, T) the ones to read
        (none: the null caption); used when the network was built with context_dim."""
        B = x.shape[0]
        e = self.embedding(t, cond, B)
        if self.cfg.context_dim:
            S = x.shape[-1]
            grid = torch.linspace(-1, 1, S, device=x.device, dtype=x.dtype)
            coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).expand(B, 2, S, S)
            x = torch.cat([x, coords], dim=1)
            null = self.null_context.to(x.dtype).expand(B, 1, -1)
            ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
            if context is None:
                context, context_mask = null, ones
            else:
                context = torch.cat([null, context.to(x.dtype)], dim=1)
                context_mask = torch.cat([ones, context_mask.bool()], dim=1)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            if i == len(self.down) - 1 and self.cfg.context_dim:
                h = self.cross[0](h, context, context_mask)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, e)
        if self.cfg.context_dim:
            h = self.cross[1](h, context, context_mask)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), e)
            if i == 0 and self.cfg.context_dim:
                h = self.cross[2](h, context, context_mask)
        return self.out(h)


class DiTBlock(nn.Module):
    """x + g1 * attn(modulate(norm(x))), then x + g2 * mlp(modulate(norm(x))); shifts, scales and gates from
    the embedding, the gates zero at the start (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, 4 * width, act="gelu_tanh")
        self.modulation = nn.Linear(embed_dim, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        s1, b1, g1, s2, b2, g2 = self.modulation(e)[:, None].chunk(6, dim=-1)  # each (B, 1, C)
        x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class FlowDiT(_Conditioned):
    """The patch transformer of the module docstring; the same call as FlowUNet."""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        p, w = cfg.patch, cfg.width
        self.grid = cfg.image_size // p
        self.patchify = nn.Conv2d(3, w, p, stride=p)
        self.pos = nn.Parameter(torch.randn(1, self.grid**2, w) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(w, cfg.heads, cfg.embed_dim) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(cfg.embed_dim, 2 * w)
        self.head = nn.Linear(w, p * p * 3)
        for layer in (self.final_modulation, self.head):  # the velocity starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None, context=None, context_mask=None) -> Tensor:
        B, p, g = x.shape[0], self.cfg.patch, self.grid
        e = self.embedding(t, cond, B)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # (B, g*g, w)
        for block in self.blocks:
            h = block(h, e)
        scale, shift = self.final_modulation(e)[:, None].chunk(2, dim=-1)
        h = self.head(self.norm(h) * (1 + scale) + shift)  # (B, g*g, p*p*3)
        return h.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


def build_flow_model(cfg: FlowConfig) -> FlowUNet | FlowDiT:
    """The velocity network `cfg.arch` names."""
    return FlowUNet(cfg) if cfg.arch == "unet" else FlowDiT(cfg)


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


def guided(
    model: FlowUNet | FlowDiT,
    cond: Tensor,
    scale: float,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The classifier-free guided velocity v_u + scale (v_c - v_u), both halves in one batch; the
    unconditional half reads the null condition (and no caption token)."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(x, t, cond, context, context_mask)
        null = model.null_cond.to(cond.dtype).expand_as(cond)
        ctx = mask = None
        if context is not None:
            ctx = torch.cat([context, context])
            mask = torch.cat([context_mask.bool(), torch.zeros_like(context_mask, dtype=torch.bool)])
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), ctx, mask)
        vc, vu = v.chunk(2)
        return vu + scale * (vc - vu)

    return velocity


@dataclass
class FlowModelConfig:
    net: FlowConfig = field(default_factory=FlowConfig)
    text: TextConfig = field(
        default_factory=lambda: TextConfig(width=128, layers=2, heads=2, context_length=32)
    )
    embed_dim: int = 128  # the text tower's output (a CLIP's embed_dim); the network's cond_dim
    ema_decay: float = 0.999
    sample_steps: int = 32  # Euler steps
    guidance: float = 3.0  # classifier-free guidance scale sampling uses unless told otherwise
    # the network also reads the caption's token states (cross-attention): a CLIP's pooled embedding hardly
    # tells "at the top left" from "at the bottom right" (cosine 0.99 in clip-tiny). Off in flow-tiny, where
    # it cost a fifth of the steps and did not bring position within a 10-minute run (benchmarks/RESULTS.md)
    cross_attention: bool = False

    def __post_init__(self):
        if isinstance(self.net, dict):
            self.net = FlowConfig(**self.net)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.net.cond_dim = self.embed_dim
        self.net.context_dim = self.text.width if self.cross_attention else 0
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), not {self.ema_decay}")

    @property
    def image_size(self) -> int:
        return self.net.image_size


class FlowModel(nn.Module):
    """Captions' token ids -> images: a frozen text tower's embedding conditions a rectified flow in pixels."""

    def __init__(self, cfg: FlowModelConfig):
        super().__init__()
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.cfg = cfg
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.net = build_flow_model(cfg.net)
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        self.ema.requires_grad_(False)  # moved by update_ema, never by the optimizer

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def encode_text(self, text_ids: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(B, T) ids -> the condition: the tower's unit-norm embedding scaled to unit variance per dimension
        (B, embed_dim), and with cross-attention the token states up to the pooled one (B, T, width) with
        their mask (B, T)."""
        with torch.no_grad():
            pooled = F.normalize(self.text(text_ids).float(), dim=-1) * math.sqrt(self.cfg.embed_dim)
            if not self.cfg.cross_attention:
                return pooled, None, None
            tokens = self.text.forward_tokens(text_ids).float()
            index = self.text.pool_index(text_ids)
            mask = torch.arange(text_ids.shape[1], device=text_ids.device)[None] <= index[:, None]
        return pooled, tokens, mask

    def loss(self, pixels: Tensor, text_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Rectified-flow loss of normalised images (B, 3, S, S) given their captions, the condition (pooled
        and tokens) dropped for `net.cond_drop` of them."""
        cond, tokens, mask = self.encode_text(text_ids)
        keep = torch.rand(len(cond), generator=generator, device=cond.device) >= self.cfg.net.cond_drop
        cond = torch.where(keep[:, None], cond, self.net.null_cond.to(cond.dtype).expand_as(cond))
        if mask is not None:
            mask = mask & keep[:, None]
        return flow_loss(lambda x, t: self.net(x, t, cond, tokens, mask), pixels, generator)

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema.update_parameters(self.net)

    def sampling_net(self, use_ema: bool = True) -> nn.Module:
        """The averaged weights once they have been updated at least once, else the trained ones."""
        return self.ema.module if use_ema and int(self.ema.n_averaged) > 0 else self.net

    @torch.inference_mode()
    def sample(
        self,
        text_ids: Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Images (B, 3, S, S), normalised, for each row of caption ids (B, T): Euler steps from Gaussian
        noise drawn on the CPU with `generator` (one for the batch, or one per row), so that a seed gives the
        same images on every device."""
        cfg = self.cfg
        device = self.text.token_embedding.weight.device
        cond, tokens, mask = self.encode_text(text_ids.to(device))
        S = cfg.image_size
        if isinstance(generator, list):
            x0 = torch.stack([torch.randn((3, S, S), generator=g) for g in generator])
        else:
            x0 = torch.randn((len(text_ids), 3, S, S), generator=generator)
        x0 = x0.to(device)
        scale = cfg.guidance if guidance is None else guidance
        velocity = guided(self.sampling_net(use_ema), cond, scale, tokens, mask)
        return euler_sample(velocity, x0, steps or cfg.sample_steps)
