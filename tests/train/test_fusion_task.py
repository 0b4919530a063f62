"""Training fusion models: every objective logged by name, two processes train as one, degenerate batches."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.errors import ConfigError
from vlmkit.losses.fusion import ITM_COLLAPSED_LOSS
from vlmkit.recipes import get_recipe, smoke
from vlmkit.tasks.fusion import FusionTask
from vlmkit.train import train
from vlmkit.train.config import configure

STEPS = 3


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_objective_is_logged_and_weighted(shapes_dir, tmp_path):
    cfg = smoke(get_recipe("fusion-tiny"))
    weights = {
        "itc_weight": 1.0,
        "itm_weight": 0.5,
        "mlm_weight": 2.0,
        "caption_weight": 0.3,
        "mim_weight": 0.7,
    }
    overrides = {f"model_overrides.{k}": v for k, v in weights.items()} | {"model_overrides.mim": True}
    cfg = configure(
        cfg,
        {
            **overrides,
            "train_data": str(shapes_dir / "train.jsonl"),
            "val_data": str(shapes_dir / "val.jsonl"),
            "out": str(tmp_path),
            "max_steps": STEPS,
        },
    )
    summary = train(cfg)
    assert summary["step"] == STEPS
    logged = [r for r in rows(tmp_path) if "train/loss" in r]
    assert len(logged) == STEPS
    for r in logged:
        total = sum(
            weights[f"{k}_weight"] * r[f"train/loss/{k}"] for k in ("itc", "itm", "mlm", "caption", "mim")
        )
        assert r["train/loss"] == pytest.approx(total, rel=1e-5)
        assert r["train/loss/mlm"] > 2.0 and r["train/loss/caption"] > 2.0  # untrained: near log(vocab)
        assert 0.3 < r["train/loss/itm"] < 1.5
    ev = json.loads((tmp_path / "eval" / "retrieval_itm.json").read_text())["metrics"]
    assert 0 <= ev["itm_text_retrieval_recall@1"] <= 1 and ev["itm_rerank_k"] == 16
    assert "val/itm_text_retrieval_recall@1" in summary


def test_a_batch_of_one_caption_has_no_itm_negatives_and_still_trains(shapes_dir, tmp_path):
    """Every row shares its caption: no ITM negative exists (they would be false negatives); ITM learns from
    the positives alone, ITC treats every pair as a positive of every other."""
    lines = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()][:16]
    manifest = tmp_path / "same.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": str(shapes_dir / r["image"]), "caption": "a shape"}) + "\n" for r in lines
        )
    )
    cfg = configure(
        smoke(get_recipe("fusion-tiny")),
        {"train_data": str(manifest), "out": str(tmp_path / "run"), "max_steps": 2},
    )
    train(cfg)
    logged = [r for r in rows(tmp_path / "run") if "train/loss" in r]
    assert len(logged) == 2
    for r in logged:  # every column is a positive: the targets are uniform, the loss at least log(batch)
        assert math.log(8) - 1e-4 <= r["train/loss/itc"] < math.log(8) + 1.0
        assert math.isfinite(r["train/loss/itm"])


def test_captions_longer_than_the_context_train_and_a_batch_of_one_is_refused(shapes_dir, tmp_path):
    """Captions of hundreds of words are cut to the context (the end token kept), as in every vlmkit
    tokenizer. A global batch of one has nothing to contrast or mine: refused in one line (the losses
    themselves fall back to no negatives: tests/losses/test_fusion_losses.py)."""
    lines = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()][:4]
    manifest = tmp_path / "long.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": str(shapes_dir / r["image"]), "caption": " ".join([r["caption"]] * 60)})
            + "\n"
            for r in lines
        )
    )
    cfg = configure(
        smoke(get_recipe("fusion-tiny")),
        {"train_data": str(manifest), "out": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4},
    )
    train(cfg)
    logged = [r for r in rows(tmp_path / "run") if "train/loss" in r]
    assert len(logged) == 3
    for r in logged:
        assert all(math.isfinite(r[f"train/loss/{k}"]) for k in ("itc", "itm", "mlm", "caption"))
    from vlmkit.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tmp_path / "run" / "tokenizer.json")
    ids = tok([" ".join([lines[0]["caption"]] * 60)])
    positions = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["text"]["context_length"]
    assert ids.shape[1] == tok.context_length <= positions
    assert ids[0, -1].item() == tok.eot_token_id
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        configure(cfg, {"batch_size": 1})


def test_a_collapsed_itm_head_is_reported_once(caplog):
    task = FusionTask.__new__(FusionTask)
    task.itm_history, task.collapse_warned = [], False
    with caplog.at_level(logging.WARNING, logger="vlmkit.train"):
        for _ in range(49):
            task.watch_itm(ITM_COLLAPSED_LOSS + 0.001)
        assert not caplog.records
        for _ in range(10):
            task.watch_itm(ITM_COLLAPSED_LOSS - 0.002)
    assert len(caplog.records) == 1 and "collapsed" in caplog.records[0].getMessage()
    task = FusionTask.__new__(FusionTask)
    task.itm_history, task.collapse_warned = [], False
    with caplog.at_level(logging.WARNING, logger="vlmkit.train"):
        for i in range(100):
            task.watch_itm(0.5 - i * 0.001)  # a learning head
    assert len(caplog.records) == 1


def vlmkit_train(out: Path, shapes_dir: Path, processes: int) -> None:
    args = [
        "-m", "vlmkit", "train", "--recipe", "fusion-tiny", "--smoke", "--train-data", str(shapes_dir / "train.jsonl"),
        "--out", str(out), "--set", f"max_steps={STEPS}", "--set", "eval_every=0", "--set", "save_every=0",
        "--batch-size", "16",
    ]  # fmt: skip
    if processes > 1:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        assert torchrun, "torchrun not installed beside python"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(processes), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]


def test_two_processes_train_as_one_on_the_same_global_batch(shapes_dir, tmp_path):
    """ITC gathered with gradients, ITM negatives mined from the global batch, MLM masks drawn for the global
    batch, token means over the global batch: 2 DDP processes = 1 process, every loss and weight (fp32)."""
    vlmkit_train(tmp_path / "one", shapes_dir, 1)
    vlmkit_train(tmp_path / "two", shapes_dir, 2)
    a = {r["step"]: r for r in rows(tmp_path / "one") if "train/loss" in r}
    b = {r["step"]: r for r in rows(tmp_path / "two") if "train/loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("train/loss", "train/loss/itc", "train/loss/itm", "train/loss/mlm", "train/loss/caption"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    one, two = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_the_shapes_recipe_runs_its_stages_with_hard_negatives_and_evaluates(tmp_path):
    """Smoke: the contrastive stage, then fusion from its image tower with each scene's (true caption, foil)
    pair as ITM examples, and the final compositional and reranked-retrieval evaluations."""
    cfg = configure(smoke(get_recipe("fusion-tiny-shapes")), {"out": str(tmp_path / "run")})
    cfg = configure(cfg, {"synthetic_data": str(tmp_path / "shapes")})
    summary = train(cfg)
    assert set(summary["stages"]) == {"clip", "fusion"}
    ev = tmp_path / "run" / "eval"
    for name in ("compositional_itm.json", "compositional_itc.json", "retrieval_itm.json"):
        assert (ev / name).is_file(), name
    itm = json.loads((ev / "compositional_itm.json").read_text())["metrics"]
    assert itm["scorer"] == "itm" and itm["num_rows"] > 0
