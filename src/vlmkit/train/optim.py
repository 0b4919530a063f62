"""AdamW with parameter groups, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.clip import no_weight_decay_names
from vlmkit.nn.lora import compile_regex


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float] | None = None
) -> list[dict]:
    """Split parameters into groups: no weight decay on gains, biases, embeddings and the logit scale.

    `lr_scale` maps regular expressions over parameter names (re.search) to learning-rate multipliers
    (the first match wins; a multiplier of 0 freezes the parameter). A pattern that matches no
    parameter name at all is a ConfigError: it is almost always a typo. Parameters with
    requires_grad False are left out of every group.
    """
    no_decay = no_weight_decay_names(model)
    scales = [(compile_regex(pattern, "lr_scale"), float(s)) for pattern, s in (lr_scale or {}).items()]
    names = [name for name, _ in model.named_parameters()]
    for (regex, _), pattern in zip(scales, lr_scale or {}):
        if not any(regex.search(name) for name in names):
            raise ConfigError(
                f"lr_scale {pattern!r} matches no parameter name; names look like "
                f"{names[0]!r} (see model.named_parameters())"
            )
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for regex, s in scales if regex.search(name)), 1.0)
        if scale == 0:
            p.requires_grad_(False)
            continue
        wd = 0.0 if name in no_decay else weight_decay
        groups.setdefault((wd, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
        for (wd, scale), ps in groups.items()
    ]


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    lr_scale: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, lr, lr_scale)
    if not groups:
        raise ConfigError(
            "nothing left to train: every parameter is frozen (freeze, lock_image or lr_scale 0)"
        )
    # The fused implementation updates every parameter in one kernel per group (about 9x faster on CPU).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


class WarmupCosine:
    """lr multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio`.

    `total` may be changed while training (the time budget re-estimates how many steps fit);
    the multiplier is a pure function of (step, warmup, total), so resuming reproduces it exactly.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        # A time budget can shrink `total` far below the configured warmup: keep warmup <= 20% of it.
        warmup = max(1, min(self.warmup, self.total // 5))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupCosine
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
