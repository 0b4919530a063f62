"""LoRA (low-rank adaptation) as a parametrization of `nn.Linear` weights: W -> W + (alpha / r) * B @ A.

    names = add_lora(model, rank=8)          # the blocks' qkv/proj/fc1/fc2 of both towers
    ...train: only lora_A / lora_B have requires_grad...
    plain = merged_state_dict(model)         # ordinary weights, loadable into an un-adapted model

The low-rank update is a `torch.nn.utils.parametrize` parametrization of the weight, not a wrapper
module: every read of `linear.weight` sees the adapted weight, so code that calls
`F.linear(x, linear.weight)` directly (`Block.forward_one`) stays correct, and the module tree, its
forward and its other state dict keys are unchanged. B starts at zero, so an adapted model starts
exactly equal to its base.

There is no LoRA dropout: it drops inputs of the low-rank branch only, which a weight
parametrization cannot express (the adapted weight multiplies the whole input).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from vlmkit.errors import ConfigError

# The attention (fused qkv, output proj) and MLP (fc1, fc2) Linears of every block of both towers.
DEFAULT_TARGETS = r"transformer\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])$"


class LoRA(nn.Module):
    """The parametrization weight (out, in) -> weight + scaling * lora_B (out, r) @ lora_A (r, in)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"lora_rank must be a positive integer, not {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, not {alpha!r}")
        out_features, in_features = weight.shape
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))  # (out, r): zero, a no-op at first
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as in the LoRA paper's code

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)  # (out, in)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def compile_regex(pattern: str, key: str) -> re.Pattern:
    """`re.compile(pattern)`, with a one-line ConfigError naming the config `key` when it is not a regex."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None


def find_targets(model: nn.Module, pattern: str = DEFAULT_TARGETS, key: str = "lora_targets") -> list[str]:
    """Names of the modules of `model` that `pattern` (re.search) matches; each must be an `nn.Linear`."""
    regex = compile_regex(pattern, key)
    names = []
    for name, module in model.named_modules():
        if not name or not regex.search(name) or ".parametrizations" in name:
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{key} {pattern!r} matches {name} ({type(module).__name__}); LoRA adapts nn.Linear layers "
                "only: anchor the pattern on Linear names, e.g. 'attn\\.qkv$'"
            )
        names.append(name)
    if not names:
        raise ConfigError(
            f"{key} {pattern!r} matches no module; Linear names look like "
            "'visual.transformer.blocks.0.attn.qkv' (see model.named_modules())"
        )
    return names


def add_lora(
    model: nn.Module,
    pattern: str = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Adapt the Linears named by `names` (default: those `pattern` matches) in place; returns their names.

    Each adapted weight is frozen (requires_grad False) and gets trainable `lora_A`, `lora_B` with
    scaling `alpha / rank` (alpha defaults to rank: scaling 1). Other parameters are left as they are.
    """
    names = find_targets(model, pattern) if names is None else names
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"LoRA adapts nn.Linear layers only; {name} is {type(linear).__name__}")
        if is_adapted(linear):
            raise ConfigError(f"{name} already has a LoRA adapter")
        lora = LoRA(linear.weight, rank, alpha)  # checks rank and alpha before anything changes
        linear.weight.requires_grad_(False)
        parametrize.register_parametrization(linear, "weight", lora)
    return names


def is_adapted(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, LoRA) for p in module.parametrizations.weight
    )


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> Linear for every LoRA-adapted module, in module order."""
    return {name: m for name, m in model.named_modules() if is_adapted(m)}


def has_lora(model: nn.Module) -> bool:
    return bool(adapted_modules(model))


def _lora_of(module: nn.Module) -> LoRA:
    return next(p for p in module.parametrizations.weight if isinstance(p, LoRA))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: `{module}.lora_A` (r, in) and `{module}.lora_B` (out, r) for each adapted module."""
    state = {}
    for name, module in adapted_modules(model).items():
        lora = _lora_of(module)
        state[f"{name}.lora_A"] = lora.lora_A.detach()
        state[f"{name}.lora_B"] = lora.lora_B.detach()
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str = "LoRA state") -> None:
    """Copy adapters saved by `lora_state_dict` into the (identically adapted) `model`."""
    want = lora_state_dict(model)
    if set(want) != set(state):
        missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        raise ConfigError(
            f"{where} does not fit this model's adapters: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "use the same lora_rank and lora_targets as the run that wrote it"
        )
    for key, tensor in want.items():
        if tensor.shape != state[key].shape:
            raise ConfigError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, the model's adapter {tuple(tensor.shape)}; "
                "use the same lora_rank as the run that wrote it"
            )
        tensor.copy_(state[key])


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each adapted weight merged (W + s * B @ A) under its plain name `{module}.weight`.

    The model is not changed; the result loads into the same architecture without adapters.
    """
    adapted = adapted_modules(model)
    prefixes = tuple(f"{name}.parametrizations.weight." for name in adapted)
    merged = {f"{name}.parametrizations.weight.original": f"{name}.weight" for name in adapted}
    state = {}
    for key, value in model.state_dict().items():
        if key in merged:  # the base weight's slot: put the merged weight there, under the plain name
            name = merged[key].removesuffix(".weight")
            state[merged[key]] = adapted[name].weight.detach().clone()
        elif not key.startswith(prefixes):  # the adapters themselves are folded in above
            state[key] = value
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight in place, leaving plain Linears (frozen as their base was); returns model."""
    for module in adapted_modules(model).values():
        frozen = not module.parametrizations.weight.original.requires_grad
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.requires_grad_(not frozen)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (adapter-free) copy of a model built as `type(model)(model.cfg)`, holding the merged weights.

    Unadapted tensors are shared with `model`, not copied; only the merged weights take new memory.
    """
    with torch.device("meta"):
        plain = type(model)(model.cfg)
    plain.load_state_dict(merged_state_dict(model), assign=True)
    return plain
