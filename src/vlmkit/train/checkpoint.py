"""Atomic, pickle-free training checkpoints.

`<run>/checkpoints/step_00000100/` holds a loadable model folder (model.safetensors, config.json,
tokenizer.json, preprocess.json) plus what resuming needs: optimizer.safetensors + optimizer.json,
rng.safetensors, trainer_state.json (step, epoch, position in the epoch, scheduler, time used) and
train_config.json. A checkpoint is written to a temporary folder and renamed into place, so an
interruption mid-write never leaves a half checkpoint that `--resume` would pick up.
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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict,
    train_config: object,
    tokenizer=None,
    preprocess=None,
    keep_last: int = 2,
    model_name: str = "",
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(unwrap(model), tmp, tokenizer=tokenizer, preprocess=preprocess, name=model_name)
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
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
) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the trainer state dict."""
    ckpt = Path(ckpt)
    try:
        unwrap(model).load_state_dict(load_file(str(ckpt / "model.safetensors")))
        optimizer.load_state_dict(
            _optimizer_from_files(
                load_file(str(ckpt / "optimizer.safetensors")),
                json.loads((ckpt / "optimizer.json").read_text()),
            )
        )
        state = load_json(ckpt / "trainer_state.json")
        rng = load_file(str(ckpt / "rng.safetensors"))
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        raise VlmkitError(
            f"cannot resume from {ckpt}: {e}; delete that checkpoint folder to use an older one"
        ) from e
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
