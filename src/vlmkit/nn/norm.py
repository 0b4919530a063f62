"""RMSNorm (Llama); LayerNorm is torch's."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (a bf16 mean of squares loses precision), scale in the input dtype, as Llama.
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
