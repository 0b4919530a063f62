"""Process-group setup for multi-process training launched by torchrun; no-ops in a single process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) for each process.
Without them we run as one process on the best local device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vlmkit.errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or run as one process.

    `backend` defaults to nccl when CUDA is available, else gloo. With CUDA each process uses
    the GPU of its LOCAL_RANK. Calling it again in an initialised process returns the same info.
    """
    cuda = torch.cuda.is_available()
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    rank, world_size, local_rank = (_env_int(name) for name in TORCHRUN_ENV)
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("backend 'nccl' needs CUDA GPUs; use backend 'gloo' on CPU")
    if cuda:
        # Before the process group starts, so NCCL binds each process to its own GPU.
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not _active():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that logs and writes checkpoints."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    if _active():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks, as a new tensor (e.g. to log a loss); `t` when not distributed."""
    if not _active():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled; only within our own trusted process group)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
