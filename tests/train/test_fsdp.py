"""FSDP2 (`parallel=fsdp`) on CPU with gloo: two processes train exactly as one does on the same global batch,
save sharded checkpoints with torch.distributed.checkpoint and resume from them exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 5


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def vlmkit_train(out: Path, shapes_dir: Path, processes: int, *extra: str) -> None:
    args = [
        "-m", "vlmkit", "train", "--recipe", "clip-tiny", "--smoke", "--train-data", str(shapes_dir / "train.jsonl"),
        "--out", str(out), "--set", "precision=fp32", "--set", f"max_steps={STEPS}", "--set", "eval_every=0",
        "--set", "save_every=3", "--set", "keep_last=5", "--zeroshot-data", str(shapes_dir / "classification" / "val"),
        *extra,
    ]  # fmt: skip
    if processes > 1:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        assert torchrun, "torchrun not installed beside python"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(processes), *args, "--set", "parallel=fsdp"]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]


@pytest.fixture(scope="module")
def runs(shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    vlmkit_train(root / "one", shapes_dir, 1)
    vlmkit_train(root / "fsdp", shapes_dir, 2)
    return root


def test_two_fsdp_processes_train_as_one(runs):
    a, b = losses(runs / "one"), losses(runs / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), f"step {step}"
    one, two = (
        load_file(str(runs / "one" / "model.safetensors")),
        load_file(str(runs / "fsdp" / "model.safetensors")),
    )
    assert one.keys() == two.keys()
    start = load_file(str(runs / "fsdp" / "checkpoints" / "step_00000003" / "model.safetensors"))
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
        moved += not torch.equal(start[k], two[k])
    assert (
        moved > len(one) // 2
    )  # the last steps trained most tensors: the comparison is not of still weights


def test_sharded_checkpoints_hold_every_shard_and_a_whole_model(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert (ckpt / "rng.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file()
    assert not (ckpt / "optimizer.safetensors").exists()  # the optimizer state is in dcp/, sharded
    # model.safetensors is the whole model: the one-process run's checkpoint of the same step
    whole = load_file(str(ckpt / "model.safetensors"))
    one = load_file(str(runs / "one" / "checkpoints" / "step_00000003" / "model.safetensors"))
    for k in one:
        assert whole[k].shape == one[k].shape
        torch.testing.assert_close(whole[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_fsdp_resumes_exactly(runs, shapes_dir, tmp_path):
    # the run as it was at step 3: its checkpoint and the metrics so far
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003")
    shutil.copy(runs / "fsdp" / "tokenizer.json", run / "tokenizer.json")
    rows = (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 3))
    vlmkit_train(run, shapes_dir, 2, "--resume")
    a, b = losses(runs / "fsdp"), losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in (4, 5):
        assert b[step] == a[step], f"step {step}"
    want, got = load_file(str(runs / "fsdp" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sharded_evaluation_equals_the_whole_models(runs):
    """The final evaluation runs on every process with the model sharded; it must agree with the final
    file-based evaluation of the gathered whole model and with the one-process run's."""
    fsdp = json.loads((runs / "fsdp" / "summary.json").read_text())
    written = json.loads((runs / "fsdp" / "eval" / "zeroshot.json").read_text())["metrics"]["acc1"]
    one = json.loads((runs / "one" / "summary.json").read_text())
    assert fsdp["val/zeroshot_acc1"] == pytest.approx(written, abs=1e-6)
    assert fsdp["val/zeroshot_acc1"] == pytest.approx(one["val/zeroshot_acc1"], abs=1e-6)
