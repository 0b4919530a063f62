"""Atomic, pickle-free training checkpoints.

`<run>/checkpoints/step_00000100/` holds a loadable model folder (model.safetensors, config.json,
tokenizer.json, preprocess.json) plus what resuming needs: optimizer.safetensors + optimizer.json,
rng.safetensors (and rng_rank<r>.safetensors for the other processes), trainer_state.json (step, epoch,
position in the epoch, scheduler, time used) and train_config.json. A sharded (FSDP) run keeps its model
and optimizer state as every process wrote it, with `torch.distributed.checkpoint`, in dcp/ instead of
optimizer.*; model.safetensors is still the whole model. A checkpoint is written to a temporary folder and
renamed into place, so an interruption mid-write never leaves a half checkpoint that `--resume` would
pick up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmkit.config import load_json, save_json
from vlmkit.errors import VlmkitError
from vlmkit.models.pretrained import save_pretrained, unwrap

PREFIX = "step_"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, pstate in state["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(idx)][key] = value
    return tensors, meta


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(temporary, final) folder of checkpoint `step`."""
    final = Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"
    return final.with_name(f".{final.name}.tmp"), final


def prepare_checkpoint(run_dir: str | Path, step: int) -> Path:
    """An empty temporary folder for checkpoint `step` (rank 0 makes it; then every process may write)."""
    tmp, _ = checkpoint_dirs(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng_rank{rank}.safetensors"


def save_rng(folder: Path, rank: int = 0) -> None:
    """This process's random number generators' states, in `folder`."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / _rng_file(rank)))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict,
    train_config: object,
    tokenizer=None,
    preprocess=None,
    keep_last: int = 2,
    model_name: str = "",
    prepared: bool = False,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`.

    `prepared`: other processes have already written their part into `prepare_checkpoint`'s folder (their
    RNG states; a sharded run's dcp/, whose optimizer state replaces optimizer.*: `optimizer` None).
    `model_state`: the weights to save, when `model`'s own are sharded."""
    tmp, final = checkpoint_dirs(run_dir, step)
    if not prepared:
        prepare_checkpoint(run_dir, step)
    save_pretrained(
        unwrap(model), tmp, tokenizer=tokenizer, preprocess=preprocess, name=model_name, state=model_state
    )
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_rng(tmp)
    sched = scheduler.state_dict()  # LambdaLR keeps a callable object's fields: JSON-able here
    save_json({**trainer_state, "step": step, "scheduler": sched}, tmp / "trainer_state.json")
    save_json(train_config, tmp / "train_config.json")
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(
    ckpt: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    sharded: bool = False,
) -> dict:
    """Restore model, optimizer, scheduler and this process's RNG in place; returns the trainer state dict.
    `sharded`: from dcp/ into an FSDP-sharded model and its optimizer (every process calls it)."""
    ckpt = Path(ckpt)
    try:
        if sharded:
            load_sharded(ckpt / "dcp", model, optimizer)
        else:
            unwrap(model).load_state_dict(load_file(str(ckpt / "model.safetensors")))
            optimizer.load_state_dict(
                _optimizer_from_files(
                    load_file(str(ckpt / "optimizer.safetensors")),
                    json.loads((ckpt / "optimizer.json").read_text()),
                )
            )
        state = load_json(ckpt / "trainer_state.json")
        own = ckpt / _rng_file(rank)
        rng = load_file(str(own if own.is_file() else ckpt / "rng.safetensors"))
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        raise VlmkitError(
            f"cannot resume from {ckpt}: {e}; delete that checkpoint folder to use an older one"
        ) from e
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An FSDP model's and optimizer's shards, as each process holds them, with torch.distributed.checkpoint
    (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """`save_sharded`'s inverse, in place (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} (a sharded run resumes from its dcp/ folder)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole state dict on rank 0 (on the CPU), {} elsewhere (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
