"""Training and evaluation streaming from shards: a short run, exact resume, retrieval = manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from vlmkit.recipes import get_recipe, smoke
from vlmkit.train import train
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.config import configure


def write_shards(manifest: Path, out: Path, per_shard: int, bad: dict[int, dict] | None = None) -> str:
    """The manifest's pairs as shards in the writer's layout (image, .txt, .json with "source", and
    a _stats.json per shard); `bad` puts extra raw samples before the given row indices."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    samples = []
    for i, row in enumerate(rows):
        path = (manifest.parent / row["image"]).resolve()
        if bad and i in bad:
            samples.append(bad[i])
        samples.append(
            {
                "__key__": f"{i:06d}",
                path.suffix[1:]: path.read_bytes(),
                "txt": row["caption"].encode(),
                "json": json.dumps(
                    {"key": f"{i:06d}", "caption": row["caption"], "source": str(path)}
                ).encode(),
            }
        )
    out.mkdir(parents=True)
    for k in range(0, len(samples), per_shard):
        chunk = samples[k : k + per_shard]
        with wds.TarWriter(str(out / f"{k // per_shard:05d}.tar"), encoder=False) as w:
            for s in chunk:
                w.write(s)
        stats = {
            "shard": f"{k // per_shard:05d}.tar",
            "count": len(chunk),
            "successes": len(chunk),
            "failed": 0,
        }
        (out / f"{k // per_shard:05d}_stats.json").write_text(json.dumps(stats))
    return f"{out}/{{00000..{(len(samples) - 1) // per_shard:05d}}}.tar"


NOT_UTF8 = {"__key__": "bad", "png": b"", "txt": b"\xff\xfe not a caption"}


def tiny_cfg(train_data: str, out: Path, **kw):
    cfg = smoke(get_recipe("clip-tiny", train_data=train_data, out=str(out)))
    return configure(cfg, {"precision": "fp32", "eval_every": 0, "save_every": 0, **kw})


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def shard_data(shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = write_shards(shapes_dir / "train.jsonl", root / "train", per_shard=13, bad={20: NOT_UTF8})
    val = write_shards(shapes_dir / "val.jsonl", root / "val", per_shard=6)
    return train, val


def test_training_streams_from_shards_and_reports_skips(shard_data, tmp_path):
    train_spec, val_spec = shard_data
    # 65 samples in the stats (64 pairs + 1 bad one): 8 steps of 8 make an epoch
    cfg = tiny_cfg(train_spec, tmp_path / "run", max_steps=8, val_data=val_spec)
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["step"] == 8
    assert summary["data_skipped"] == {"caption_not_utf8": 1}
    assert "train/00001.tar:bad: caption_not_utf8" in (run / "train.log").read_text()
    assert json.loads((run / "summary.json").read_text())["data_skipped"] == {"caption_not_utf8": 1}
    retrieval = json.loads((run / "eval" / "retrieval.json").read_text())
    # the in-memory evaluation on the shards and the final one agree on the final model
    for key in ("text_retrieval_recall@1", "image_retrieval_recall@1"):
        assert summary[f"val/{key}"] == pytest.approx(retrieval["metrics"][key], abs=1e-6)
    assert retrieval["dataset"] == "val" and retrieval["metrics"]["num_captions"] == 16
    assert (run / "eval" / "retrieval_examples.png").is_file()
    # the tokenizer was trained on the shards' captions
    from vlmkit.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(run / "tokenizer.json")
    assert tok.decode(tok(["a red circle"])[0]).strip() == "a red circle"


def test_resume_on_shards_is_exact_with_workers(shard_data, tmp_path):
    train_spec, _ = shard_data
    n, total = 3, 11  # stop after 3 steps (an odd batch count: the other worker is next); cross epoch 8
    kw = dict(max_steps=total, num_workers=2, shuffle_buffer=20)
    train(tiny_cfg(train_spec, tmp_path / "full", **kw))
    part = tiny_cfg(train_spec, tmp_path / "part", **kw)

    def interrupt(trainer):
        if trainer.step == n:
            trainer.request_stop("test interruption")

    assert train(part, callbacks=[interrupt])["step"] == n
    state = json.loads((list_checkpoints(part.out)[-1] / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 0 and state["data"]["num_workers"] == 2
    assert sum(state["data"]["consumed"][0]) >= n * 8  # items used by the two workers so far
    summary = train(configure(part, {"resume": True}))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, total + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), f"step {step}: {a[step]} != {b[step]}"
    wa, wb = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "part" / "model.safetensors")),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["data_skipped"] == full_summary["data_skipped"]  # counted once across the resume


def test_retrieval_on_shards_equals_retrieval_on_the_manifest(shapes_dir, tmp_path):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.eval.retrieval import evaluate_retrieval
    from vlmkit.models.clip import CLIP
    from vlmkit.models.registry import get_model_config

    rows = [json.loads(line) for line in (shapes_dir / "val.jsonl").read_text().splitlines()]
    rows.insert(3, {**rows[0], "caption": "a second caption of the first image"})  # two captions, one image
    manifest = shapes_dir / "val_two_captions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write_shards(manifest, tmp_path / "val", per_shard=5)

    torch.manual_seed(0)
    tok = Tokenizer.train([r["caption"] for r in rows], vocab_size=300, context_length=16)
    small = smoke(get_recipe("clip-tiny")).model.overrides
    model = CLIP(
        get_model_config(
            "clip-tiny", **small, **{"text.vocab_size": tok.vocab_size, "text.eot_token_id": tok.eot_token_id}
        )
    ).eval()
    pre = PreprocessConfig(image_size=32)
    ref = evaluate_retrieval(model, tok, pre, manifest, batch_size=4)
    got = evaluate_retrieval(model, tok, pre, spec, batch_size=3, num_workers=2, out_dir=tmp_path / "eval")
    assert got["metrics"]["num_images"] == ref["metrics"]["num_images"] == 16
    assert got["metrics"]["num_captions"] == ref["metrics"]["num_captions"] == 17
    assert got["metrics"] == pytest.approx(ref["metrics"], abs=1e-9)
    assert 0 < ref["metrics"]["text_retrieval_recall@10"] < 1  # a random model: neither 0 nor perfect
    assert (tmp_path / "eval" / "retrieval_examples.png").is_file()


def test_torchrun_two_processes_read_their_own_shards_without_hanging(shard_data, tmp_path):
    """Two processes (gloo, CPU) with shares of different sizes: same step count, skips and positions
    gathered from both into the checkpoint and the summary."""
    import os
    import shutil
    import subprocess
    import sys

    train_spec, _ = shard_data  # 5 shards: 3 for rank 0, 2 for rank 1; the bad sample is in shard 1
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun not installed beside python"
    out = tmp_path / "two"
    args = ["--standalone", "--nproc_per_node", "2", "-m", "vlmkit", "train", "--smoke"]
    args += ["--train-data", train_spec, "--out", str(out)]
    for kv in ("precision=fp32", "max_steps=9", "eval_every=0", "save_every=4", "shuffle_buffer=4"):
        args += ["--set", kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 10))
    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["data"]["world_size"] == 2
    # 8 steps make an epoch: step 9 is the first batch (4 pairs per process) of epoch 1
    data = state["data"]
    assert data["epoch"] == 1 and len(data["consumed"]) == 2 and all(c[0] >= 4 for c in data["consumed"])
    # the bad sample (in one process's shards) was met in epoch 0 and maybe again in epoch 1; the
    # summary holds the counts of both processes, as the final checkpoint does
    from vlmkit.data.shards import SKIP_REASONS

    summary = json.loads((out / "summary.json").read_text())
    per_reason = [sum(rows) for rows in zip(*data["skipped"])]
    assert summary["data_skipped"] == {r: n for r, n in zip(SKIP_REASONS, per_reason) if n}
    assert set(summary["data_skipped"]) == {"caption_not_utf8"}
