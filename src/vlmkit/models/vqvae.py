"""A VQ-VAE image tokenizer: images <-> a grid of discrete codes, for DALL-E-style text-to-image models.

    pixels (B, 3, S, S) --conv encoder, S/f per side--> z_e (B, D, h, w) --nearest code--> indices (B, h, w)
    codebook[indices] = z_q (B, D, h, w) --conv decoder--> pixels (B, 3, S, S)

`f = 2 ** len(channels)`: 64 px with three stages gives an 8x8 grid, 64 tokens. The quantizer (van den Oord et
al. 2017, with the EMA codebook of their appendix):

- straight-through: the decoder reads z_e + (z_q - z_e).detach(), so the reconstruction's gradient reaches the
  encoder as if quantization were the identity; the commitment loss beta * |z_e - sg(z_q)|^2 keeps the encoder
  near its codes;
- the codebook is not trained by gradients: in training mode each code moves to an exponential moving average
  of the encoder outputs assigned to it (counts and sums with `decay`, Laplace-smoothed counts);
- dead codes: a code whose average usage falls under `restart_threshold` assignments per step is moved onto a
  random encoder output of the batch (Dhariwal et al. 2020's restarts), so the codebook stays in use.

The loss is the mean squared reconstruction error plus the commitment term: flat-colour scenes need no
perceptual or adversarial loss. `encode` / `decode` are the tokenize / detokenize pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError


@dataclass
class VQVAEConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 stage each: 64 px -> 8x8 codes
    codebook_size: int = 512
    code_dim: int = 64
    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # codebook EMA
    restart_threshold: float = 0.03  # a code averaging fewer assignments per step is restarted

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if any(c % 8 for c in self.channels):
            raise ConfigError(f"channels {self.channels} must be multiples of 8 (group norm of 8 groups)")
        f = 2 ** len(self.channels)
        if self.image_size % f:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of {f} (2 ** len(channels))")

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    @property
    def num_tokens(self) -> int:
        return self.grid**2


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                   nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Quantizer(nn.Module):
    """Nearest-code quantization with an EMA codebook and dead-code restarts (see the module docstring)."""

    def __init__(
        self, codebook_size: int, dim: int, decay: float, restart_threshold: float, eps: float = 1e-5
    ):
        super().__init__()
        self.decay, self.restart_threshold, self.eps = decay, restart_threshold, eps
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())

    def indices(self, z: Tensor) -> Tensor:
        """Encoder outputs (N, D) -> the nearest code of each (N,), squared Euclidean distance."""
        distances = (
            z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        )
        return distances.argmin(dim=1)

    @torch.no_grad()
    def update(self, z: Tensor, idx: Tensor) -> int:
        """One EMA step of the codebook towards the outputs `z` (N, D) assigned `idx` (N,); then restart the
        dead codes on random rows of `z`. Returns how many codes were restarted."""
        K = self.codebook.shape[0]
        onehot = F.one_hot(idx, K).to(z.dtype)  # (N, K)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.ema_count.sum()
        count = (self.ema_count + self.eps) / (n + K * self.eps) * n  # Laplace smoothing: no division by 0
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = (self.ema_count < self.restart_threshold).nonzero().squeeze(1)
        if len(dead):
            rows = z[torch.randint(0, z.shape[0], (len(dead),), device=z.device)]
            self.codebook[dead] = rows
            self.ema_sum[dead] = rows
            self.ema_count[dead] = 1.0
        return len(dead)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, D, h, w) -> (straight-through z_q (B, D, h, w), indices (B, h, w), commitment |z - sg(z_q)|^2)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
        idx = self.indices(flat.detach())
        if self.training:
            self.update(flat.detach().float(), idx)
        q = self.codebook[idx].to(z.dtype)  # (N, D), after the update: as the EMA formulation does
        commitment = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()  # straight-through
        return q.view(B, h, w, D).permute(0, 3, 1, 2), idx.view(B, h, w), commitment


@dataclass
class VQVAEOutput:
    reconstruction: Tensor  # (B, 3, S, S)
    indices: Tensor  # (B, h, w)
    loss: Tensor
    reconstruction_loss: Tensor
    commitment_loss: Tensor


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            enc += [nn.Conv2d(ch[max(i - 1, 0)], c, 4, stride=2, padding=1), _Res(c)]
        enc += [nn.GroupNorm(8, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.restart_threshold)
        dec: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)]
        for i in reversed(range(len(ch))):
            dec += [_Res(ch[i]), nn.ConvTranspose2d(ch[i], ch[max(i - 1, 0)], 4, stride=2, padding=1)]
        dec += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def forward(self, pixels: Tensor) -> VQVAEOutput:
        """Normalised images (B, 3, S, S) -> reconstruction, codes and losses (EMA step in training mode)."""
        q, idx, commitment = self.quantizer(self.encoder(pixels))
        out = self.decoder(q)
        recon = F.mse_loss(out, pixels)
        return VQVAEOutput(out, idx, recon + self.cfg.beta * commitment, recon, commitment)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> code indices (B, h, w): the image tokens."""
        z = self.encoder(pixels)
        B, D, h, w = z.shape
        return self.quantizer.indices(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h, w)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> images (B, 3, S, S), normalised as the inputs were."""
        q = self.quantizer.codebook[indices]  # (B, h, w, D)
        return self.decoder(q.permute(0, 3, 1, 2))
