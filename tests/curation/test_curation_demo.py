"""The curation demo end to end on a tiny configuration: pool -> shards -> noisy run -> curate -> curated run."""

import json

import pytest

from vlmkit.demos.curation import METRICS, curation_demo, format_table

TINY_DATA = dict(
    num_train=320, num_val=40, image_size=32, background_noise=0.2,
    num_per_class_train=1, num_per_class_val=2, object_weights=(5, 3, 1, 1),
)  # fmt: skip
TINY_RECIPE = {
    "model_overrides": {
        "vision.image_size": 32, "vision.layers": 1, "text.layers": 1, "vision.width": 64, "text.width": 64,
        "vision.heads": 2, "text.heads": 2, "embed_dim": 32,
    },
    "batch_size": 32, "max_steps": 12, "warmup_steps": 2, "eval_every": 0, "vocab_size": 300,
}  # fmt: skip


def test_curation_demo_compares_equal_compute_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    results = curation_demo(
        out, time_budget=None, seed=0, data_args=TINY_DATA, recipe_overrides=TINY_RECIPE, progress=False
    )
    noisy, curated, cur = results["noisy"], results["curated"], results["curation"]
    # equal compute: the curated run takes exactly the noisy run's steps at the same batch
    assert noisy["steps"] == curated["steps"] == 12
    assert noisy["batch_size"] == curated["batch_size"] == 32
    # the size and exact-duplicate filters remove every thumbnail, every blank but one and every copy
    # but one per popular image, so the curated subset is smaller and cleaner than the pool
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert cur["pool"] == len(rows) == 320
    assert cur["noise_in_pool"] == sum(r["corruption"] is not None for r in rows)
    assert cur["kept"] < cur["pool"]
    assert cur["noise_kept"] / cur["kept"] < cur["noise_in_pool"] / cur["pool"]
    assert cur["removed_by_filter"]["image_size"] == sum(r["corruption"] == "tiny" for r in rows)
    # the curated run trained on the curated shards and both were evaluated on the same clean data
    assert (out / "shards" / "curated" / "uids.txt").read_text().split() == sorted(
        (out / "shards" / "curated" / "uids.txt").read_text().split()
    )
    for run in ("noisy", "curated"):
        assert set(results[run]["metrics"]) == set(METRICS)
        zs = json.loads((out / run / "eval" / "zeroshot.json").read_text())
        assert zs["dataset"] == "val"
        # the table's figures are the evaluations the runs wrote
        ret = json.loads((out / run / "eval" / "retrieval.json").read_text())["metrics"]
        written = {**{f"zeroshot_{k}": v for k, v in zs["metrics"].items()}, **ret}
        for key, value in results[run]["metrics"].items():
            assert value == pytest.approx(written[key]), key
    assert json.loads((out / "curation_demo.json").read_text())["curation"] == cur
    assert (out / "curation_demo.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert format_table(results) in printed
    for key in METRICS:
        assert key in printed
