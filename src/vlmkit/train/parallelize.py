"""Parallelism as a separate step (as torchtitan does it): the models are single-device and know nothing of
it; `parallelize` applies, in this order,

1. `torch.compile` (`compile`), in place, so that parameter names do not change;
2. activation checkpointing (`grad_checkpointing`): blocks recompute their activations in the backward;
3. with several processes, DDP (`parallel: auto | ddp`) or FSDP2 (`parallel: fsdp`,
   `torch.distributed.fsdp.fully_shard`): each transformer block is one unit of sharding, the rest of the
   model the root unit.

What is wrapped is a `TaskModule`: the model with its task's losses as `forward`, so everything a step needs
(the language model's head in a chunked loss, the contrastive all-gather) runs inside the wrapped forward.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from vlmkit import distributed as dist
from vlmkit.errors import ConfigError

log = logging.getLogger("vlmkit.train")


class TaskModule(nn.Module):
    """The model and its task: `forward(batch)` is the task's losses of one micro-batch."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model = model
        self.task = task  # not a module: holds no parameters of its own

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return self.task.losses(self.model, batch)


class TrainModule:
    """What the trainer steps: the (wrapped) TaskModule, and how to skip gradient sync in accumulation."""

    def __init__(self, module: nn.Module, kind: str):
        self.module = module
        self.kind = kind  # "single", "ddp" or "fsdp"

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across processes: every process must run every forward."""
        return self.kind == "fsdp"

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return self.module(batch)

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool):
        """Within it, a backward reduces gradients across processes only if `sync` (the last micro-batch)."""
        if sync or self.kind == "single":
            yield
        elif self.kind == "ddp":
            with self.module.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def gathered(self):
        """Within it, the model's root parameters are whole on every process (FSDP), so that methods other
        than forward (encode_image, generate) run; each block still gathers its own in its forward."""
        if not self.sharded:
            yield
            return
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every tower and decoder: FSDP's units and activation checkpointing's."""
    from vlmkit.models.decoder import Block as DecoderBlock
    from vlmkit.nn.transformer import Block

    return [m for m in model.modules() if isinstance(m, (Block, DecoderBlock))]


def parallelize(module: TaskModule, cfg, info: dist.DistInfo) -> TrainModule:
    """Compile, checkpoint activations and wrap `module` for `info.world_size` processes, as `cfg` says."""
    model = module.model
    if cfg.parallel.compile:
        # a graph inductor cannot compile (no C++ compiler on this machine, say) runs eagerly, with a
        # warning, instead of ending the run
        torch._dynamo.config.suppress_errors = True
        model.compile()
    if cfg.parallel.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(
                f"{type(model).__name__} has no activation checkpointing; drop grad_checkpointing"
            )
        model.set_grad_checkpointing(True)
    if info.world_size == 1:
        return TrainModule(module, "single")
    if cfg.parallel.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        blocks = transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        # FSDP cannot shard a 0-d tensor (CLIP's logit scale and bias): those stay whole on every process and
        # have their gradients averaged here, as FSDP averages the others.
        scalars = {p for p in module.parameters() if p.ndim == 0}
        fully_shard(module, mesh=mesh, ignored_params=scalars or None)
        for p in scalars:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_average_grad)
        if dist.is_main():
            log.info("FSDP2 over %d processes: %d blocks + the root sharded", info.world_size, len(blocks))
        return TrainModule(module, "fsdp")
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return TrainModule(DDP(module, device_ids=ids), "ddp")


def _average_grad(param: nn.Parameter) -> None:
    """All-reduce a parameter's gradient to its mean over processes (a collective, in the backward).

    Accumulated micro-batches are averaged each time: a mean of (already equal) earlier sums plus new local
    parts is the mean of the whole sum."""
    import torch.distributed as tdist

    tdist.all_reduce(param.grad, op=tdist.ReduceOp.SUM)
    param.grad.div_(tdist.get_world_size())
