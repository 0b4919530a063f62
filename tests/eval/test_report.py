import json
import math

import pytest
import torch
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.eval.features import result_dict, save_results
from vlmkit.eval.report import write_report
from vlmkit.eval.zeroshot import plot_confusion_matrix


def make_run(run_dir) -> None:
    lines = []
    for step in range(1, 121):
        record = {
            "step": step,
            "train/loss": 4.0 * math.exp(-step / 40),
            "train/lr": 1e-3 * min(1, step / 10),
        }
        record["train/pairs_per_s"] = 900.0 + step
        if step % 40 == 0:
            record["val/loss"] = 3.0 - step / 100
            record["val/zeroshot_acc1"] = step / 200
        lines.append(json.dumps(record))
    lines.append('{"step": 121, "train/lo')  # cut short by a crash mid-write
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = {
        "acc1": 0.8125,
        "acc5": 0.96875,
        "mean_per_class_recall": 0.790123,
        "per_class_accuracy": {"cat": 0.75, "dog": 0.875},
        "num_images": 32,
        "num_skipped": 0,
    }
    save_results(
        result_dict("zeroshot_classification", "pets", "tiny-clip", metrics), run_dir / "eval" / "pets.json"
    )
    retrieval = {"image_retrieval_recall@1": 0.4321, "text_retrieval_recall@1": 0.5678, "num_images": 10}
    save_results(
        result_dict("zeroshot_retrieval", "captions", "tiny-clip", retrieval),
        run_dir / "eval" / "captions.json",
    )
    plot_confusion_matrix(
        torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], run_dir / "eval" / "confusion_matrix.png"
    )
    (run_dir / "config.json").write_text(json.dumps({"model": "tiny-clip", "lr": 0.001, "note": "<b>&"}))


def test_report_from_a_fake_run(tmp_path):
    run = tmp_path / "run1"
    run.mkdir()
    make_run(run)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    for png in ("train.png", "val.png"):
        with Image.open(run / "plots" / png) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert 'src="plots/train.png"' in page and 'src="plots/val.png"' in page
    assert 'src="eval/confusion_matrix.png"' in page
    # final metrics, formatted, in per-task tables; per-class accuracy only in a details block
    for value in ("0.8125", "0.9688", "0.7901", "0.4321", "0.5678", "pets", "captions", "tiny-clip"):
        assert value in page
    assert "image_retrieval_recall@1" in page and "zeroshot_classification" in page
    details = page[page.index("<details>") :]
    assert "per_class_accuracy" in details and "0.8750" in details
    assert "0.8750" not in page[: page.index("<details>")]
    # config pretty-printed and escaped
    assert "&quot;lr&quot;: 0.001" in page and "&lt;b&gt;&amp;" in page and "<b>&" not in page


def test_report_with_missing_parts_and_out_elsewhere(tmp_path):
    run = tmp_path / "run2"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n')
    out = write_report(run, tmp_path / "site" / "run2.html")
    page = out.read_text()
    assert 'src="../run2/plots/train.png"' in page
    assert not (run / "plots" / "val.png").exists()  # no val/ keys: no val plot
    assert "Evaluation" not in page and "Config" not in page

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Nothing to show" in write_report(empty).read_text()
    with pytest.raises(DataError, match="not found"):
        write_report(tmp_path / "missing")


def test_save_results_is_atomic_json(tmp_path):
    path = tmp_path / "deep" / "res.json"
    result = result_dict("linear_probe", "d", "m", {"acc1": 0.5})
    save_results(result, path)
    save_results({**result, "metrics": {"acc1": 0.75}}, path)  # replaces the old file
    assert json.loads(path.read_text())["metrics"]["acc1"] == 0.75
    assert path.read_text().startswith('{\n  "dataset"')
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]  # no temp file left behind
