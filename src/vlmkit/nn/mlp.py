"""Feed-forward blocks: the GELU MLP of ViT/CLIP towers and Llama's SwiGLU; the activations by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that OpenAI's CLIP was trained with.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,  # Idefics' Perceiver resampler
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


class SwiGLU(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=bias)
        self.up_proj = nn.Linear(width, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
