"""The trainer: exact resume, bad data, time budget, checkpoints, one process vs two (torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import train
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.config import make_config


def tiny_cfg(shapes_dir: Path, out: Path, **kw):
    cfg = smoke(get_recipe("clip-tiny", train_data=str(shapes_dir / "train.jsonl"), out=str(out)))
    kw = {"precision": "fp32", "eval_every": 0, **kw}
    from vlmkit.train.config import configure

    return configure(cfg, kw)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_is_exact(shapes_dir, tmp_path):
    n = 4
    # 2N steps without a break (8 pairs a step, 64 pairs: an epoch boundary falls inside, at step 8).
    full = tiny_cfg(shapes_dir, tmp_path / "full", max_steps=2 * n + 2, save_every=0)
    train(full)
    # N steps, an interruption (the same path SIGINT takes), then a resume and the rest.
    part = tiny_cfg(shapes_dir, tmp_path / "part", max_steps=2 * n + 2, save_every=0)

    def interrupt(trainer):
        if trainer.step == n:
            trainer.request_stop("test interruption")

    summary = train(part, callbacks=[interrupt])
    assert summary["step"] == n and summary["stopped_early"]
    assert [p.name for p in list_checkpoints(part.out)] == [f"step_{n:08d}"]
    from vlmkit.train.config import configure

    train(configure(part, {"resume": True}))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 3))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), f"step {step}: {a[step]} != {b[step]}"
    # The final weights agree too.
    from safetensors.torch import load_file

    wa, wb = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "part" / "model.safetensors")),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_run_folder_is_a_model_and_keeps_last_checkpoints(shapes_dir, tmp_path):
    cfg = tiny_cfg(
        shapes_dir,
        tmp_path / "run",
        max_steps=6,
        save_every=2,
        keep_last=2,
        val_data=str(shapes_dir / "val.jsonl"),
        zeroshot_data=str(shapes_dir / "classification" / "val"),
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    for f in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "preprocess.json",
        "train_config.json",
        "report.html",
        "eval/zeroshot.json",
        "eval/retrieval.json",
    ):
        assert (run / f).is_file(), f
    ckpt = list_checkpoints(run)[-1]
    for f in (
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
        "train_config.json",
        "config.json",
    ):
        assert (ckpt / f).is_file(), f
    cfg_json = json.loads((ckpt / "train_config.json").read_text())
    assert cfg_json["model"]["text"]["vocab_size"] > 0 and cfg_json["train"]["max_steps"] == 6
    # the trainer's in-memory evaluation and the file-based final one agree on the final model
    final = json.loads((run / "eval" / "zeroshot.json").read_text())["metrics"]
    assert summary["val/zeroshot_acc1"] == pytest.approx(final["acc1"], abs=1e-6)
    from vlmkit.convert import load_pretrained

    pt = load_pretrained(run)
    img = torch.randn(2, 3, 32, 32)
    assert pt.model.encode_image(img).shape == (2, 32)
    assert pt.tokenizer(["a red circle"]).shape == (1, 16)


def test_interrupted_checkpoint_write_is_ignored(shapes_dir, tmp_path):
    cfg = tiny_cfg(shapes_dir, tmp_path / "run", max_steps=2, save_every=0)
    train(cfg)
    # A half-written checkpoint (as if the machine died mid-save) must not be picked up.
    junk = tmp_path / "run" / "checkpoints" / ".step_00000009.tmp"
    junk.mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def _bad_manifest(shapes_dir: Path, tmp_path: Path, n_bad: int) -> Path:
    rows = [json.loads(line) for line in (shapes_dir / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(shapes_dir / r["image"])
    (tmp_path / "empty.png").write_bytes(b"")
    for i in range(n_bad):
        rows[i]["image"] = str(tmp_path / "empty.png")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_too_many_bad_rows_stop_training_with_a_clear_message(shapes_dir, tmp_path):
    manifest = _bad_manifest(shapes_dir, tmp_path, n_bad=4)  # 4 of 64 = 6% > 1%
    cfg = tiny_cfg(shapes_dir, tmp_path / "run", train_data=str(manifest))
    with pytest.raises(DataError, match=r"4 of 64 rows"):
        train(cfg)


def test_a_few_bad_rows_are_skipped_and_logged(shapes_dir, tmp_path):
    manifest = _bad_manifest(shapes_dir, tmp_path, n_bad=2)
    cfg = tiny_cfg(shapes_dir, tmp_path / "run", train_data=str(manifest), max_bad_fraction=0.05, max_steps=1)
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"{manifest}:1" in log and f"{manifest}:2" in log and "skipped" in log


def test_time_budget_stops_and_still_saves_and_evaluates(shapes_dir, tmp_path):
    cfg = tiny_cfg(
        shapes_dir,
        tmp_path / "run",
        max_steps=100_000,
        save_every=0,
        time_budget=0.1,
        val_data=str(shapes_dir / "val.jsonl"),
    )
    summary = train(cfg)
    assert 0 < summary["step"] < 100_000
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "val/text_retrieval_recall@1" in summary
    state = json.loads((list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json").read_text())
    assert state["total_steps"] < 100_000  # the schedule was fitted to the budget


@pytest.mark.parametrize("recipe", ["clip-tiny", "siglip-tiny"])
def test_torchrun_two_processes_match_one(shapes_dir, tmp_path, recipe):
    """`torchrun --nproc_per_node 2 -m vlmkit train` on CPU (gloo) follows the one-process loss curve."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun not installed beside python"
    args = [
        "-m",
        "vlmkit",
        "train",
        "--recipe",
        recipe,
        "--smoke",
        "--train-data",
        str(shapes_dir / "train.jsonl"),
        "--set",
        "precision=fp32",
        "--set",
        "max_steps=4",
        "--set",
        "eval_every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the ranks' own output precedes torchrun's traceback: keep enough of it to see which rank failed where
    assert two.returncode == 0, two.stderr[-8000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_grayscale_and_rgba_training_images_work(tmp_path):
    """Every image mode goes through the same pipeline (L, RGBA, P, CMYK, I;16)."""
    modes = ["L", "RGBA", "P", "CMYK", "I;16", "LA", "RGB", "1"]
    rows = []
    for i in range(16):
        mode = modes[i % len(modes)]
        img = (
            Image.new("RGB", (40, 30), (i * 10, 100, 200))
            .convert(mode if mode != "I;16" else "I")
            .convert(mode)
        )
        path = tmp_path / f"{i}.png" if mode != "CMYK" else tmp_path / f"{i}.jpg"
        img.save(path)
        rows.append({"image": path.name, "caption": f"picture number {i} in mode {mode}"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = smoke(get_recipe("clip-tiny", train_data=str(tmp_path / "m.jsonl"), out=str(tmp_path / "run")))
    from vlmkit.train.config import configure

    summary = train(configure(cfg, {"max_steps": 2, "eval_every": 0}))
    assert summary["step"] == 2
    # no row was skipped: all 16 images of every mode were read, and the model trained on them
    assert "skipped" not in (tmp_path / "run" / "train.log").read_text()
    from safetensors.torch import load_file

    from vlmkit.models import create_model

    torch.manual_seed(cfg.seed)  # the run's initial weights (same seed, same config)
    start = create_model(
        cfg.model.name, **json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    )
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert not torch.equal(
        final["visual.patch_embed.proj.0.weight"], start.state_dict()["visual.patch_embed.proj.0.weight"]
    )


def test_auto_precision_trains_and_records_its_choice(shapes_dir, tmp_path, caplog):
    # The default everywhere: bf16 autocast only where this CPU runs it fast. On a CPU that emulates bf16
    # (100-400x slower than fp32) this must pick fp32, so no run, CI included, waits hours.
    from vlmkit.runtime import cpu_matmul_speeds, resolve_precision

    cfg = tiny_cfg(shapes_dir, tmp_path / "auto", precision="auto", max_steps=3, save_every=0)
    with caplog.at_level("INFO", logger="vlmkit"):
        summary = train(cfg)
    assert summary["step"] == 3
    recorded = json.loads((tmp_path / "auto" / "train_config.json").read_text())["precision"]
    expected = resolve_precision("auto", "cpu")
    assert recorded == {"name": expected.name, "requested": "auto", "reason": expected.reason}
    bf16, fp32 = cpu_matmul_speeds()
    assert recorded["name"] == ("bf16" if bf16 >= 0.5 * fp32 else "fp32")
    assert "intra-op threads on" in caplog.text


def test_busy_machine_is_reported_once_in_log_and_bar(shapes_dir, tmp_path, monkeypatch, caplog):
    # Another process sharing the cores shows as this process getting little CPU time per wall second;
    # simulate it with a CPU clock that advances at a tenth of the wall clock.
    import time as _time

    from vlmkit import runtime

    start = _time.perf_counter()
    monkeypatch.setattr(runtime.time, "process_time", lambda: (_time.perf_counter() - start) * 0.1)
    bar_lines = []
    monkeypatch.setattr("vlmkit.train.trainer.tqdm.write", lambda self, s, *a, **k: bar_lines.append(s))
    cfg = tiny_cfg(shapes_dir, tmp_path / "busy", max_steps=12, save_every=0, time_budget=5.0)
    import functools

    from vlmkit.runtime import SpeedCheck

    monkeypatch.setattr("vlmkit.train.trainer.SpeedCheck", functools.partial(SpeedCheck, min_seconds=0.0))
    with caplog.at_level("WARNING", logger="vlmkit.train"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "looks busy" in r.getMessage()]
    assert len(warnings) == 1 and "samples/s" in warnings[0] and "of the CPU time" in warnings[0]
    assert "The time budget now fits 12 steps" in warnings[0]
    assert len(bar_lines) == 1 and "looks busy" in bar_lines[0]


def test_flip_recipe_trains_masked_then_unmasked(shapes_dir, tmp_path):
    """flip-tiny: a masked stage, then an unmasked one that starts from it; every loss is logged by name."""
    from vlmkit.train.config import configure

    cfg = configure(
        smoke(get_recipe("flip-tiny")), {"train_data": str(shapes_dir / "train.jsonl"), "out": str(tmp_path)}
    )
    summary = train(cfg)
    assert list(summary["stages"]) == ["masked", "unmasked"]
    masked = json.loads((tmp_path / "stage1-masked" / "config.json").read_text())["model"]
    final = json.loads((tmp_path / "config.json").read_text())["model"]
    assert masked["vision"]["patch_dropout"] == 0.5 and final["vision"]["patch_dropout"] == 0.0
    assert {**masked, "vision": {}} == {**final, "vision": {}}  # nothing else changed
    # the unmasked stage started from the masked stage's weights and tokenizer, at its own learning rate
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        tmp_path / "stage1-masked" / "tokenizer.json"
    ).read_bytes()
    run = json.loads((tmp_path / "train_config.json").read_text())["train"]
    assert run["transfer"]["init_from"] == str(tmp_path / "stage1-masked") and run["optim"]["lr"] == 2e-4
    rows = [
        json.loads(line) for line in (tmp_path / "stage1-masked" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in rows if "train/loss" in r]
    assert logged and all(r["train/loss/clip"] == r["train/loss"] for r in logged)


def test_init_overrides_that_change_the_weights_are_refused(shapes_dir, tmp_path):
    from vlmkit.errors import ConfigError
    from vlmkit.train.config import configure

    base = configure(
        smoke(get_recipe("clip-tiny")), {"train_data": str(shapes_dir / "train.jsonl"), "max_steps": 1}
    )
    train(configure(base, {"out": str(tmp_path / "a")}))
    with pytest.raises(ConfigError, match="changes the weights"):
        train(
            configure(
                base,
                {
                    "out": str(tmp_path / "b"),
                    "init_from": str(tmp_path / "a"),
                    "init_overrides": {"vision.layers": 3},
                },
            )
        )


@pytest.mark.parametrize("compiled", [False, True])
def test_time_budget_is_fitted_to_the_pace_after_warm_up(compiled):
    """Compiling makes the first steps minutes long; the fit must not take them for the pace (a compiled
    stage was once cut to 8 steps), and a spent budget ends the run."""
    from types import SimpleNamespace

    from vlmkit.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = make_config(time_budget=10.0, epochs=100, compile=compiled)
    t.info = SimpleNamespace(world_size=1)
    t.steps_per_epoch, t.total_steps = 100, 10_000
    t.schedule = SimpleNamespace(total=10_000)
    clock = {"elapsed": 0.0}
    t.elapsed = lambda: clock["elapsed"]
    times = [65.0, 65.0, 2.0, 2.0, 2.0, 2.0] if compiled else [5.0, 2.0, 2.0, 2.0]
    for step, seconds in enumerate(times, start=1):
        t.step = step
        clock["elapsed"] += seconds
        t._maybe_fit_budget(times[:step])
    left = 600 - clock["elapsed"]
    assert t.total_steps == pytest.approx(len(times) + left / 2.0 * 0.98, abs=2)
    assert t.schedule.total == t.total_steps
    clock["elapsed"] = 600.0  # the budget is spent: the next fit ends the run at this step
    t.step = 200
    t._maybe_fit_budget(times + [2.0] * 10)
    assert t.total_steps == 200
