"""VQA accuracy and the model-agnostic VQA / captioning evaluations, with oracle and broken "models"."""

import json
from collections import Counter
from pathlib import Path

import pytest

from vlmkit.data.synthetic import generate
from vlmkit.data.vqa import write_tasks
from vlmkit.errors import DataError
from vlmkit.eval.captioning import caption_metrics
from vlmkit.eval.vqa import evaluate_captioning, evaluate_vqa, normalize_answer, vqa_accuracy


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes_eval")
    generate(
        out,
        num_train=0,
        num_val=40,
        image_size=32,
        seed=1,
        num_per_class_train=0,
        num_per_class_val=0,
        progress=False,
        num_workers=0,
    )
    write_tasks(out, splits=("val",))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def oracle(data_dir: Path, style=lambda a: a):
    """An answer_fn that looks each (image, question) up in the task file, styled by `style`."""
    truth = {}
    for row in read_jsonl(data_dir / "val_vqa.jsonl"):
        question = row["conversations"][0]["value"].removeprefix("<image>\n")
        truth[(str((data_dir / row["image"]).resolve()), question)] = row["answer"]
    calls = []

    def answer_fn(paths: list[Path], questions: list[str]) -> list[str]:
        calls.append(len(paths))
        return [style(truth[(str(Path(p).resolve()), q)]) for p, q in zip(paths, questions)]

    answer_fn.calls = calls
    return answer_fn


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Two.", "2"),
        ("  YES! ", "yes"),
        ("the top-left", "top left"),
        ("A Red", "red"),
        ("none", "0"),
        ("3.5", "3.5"),
        ("center", "centre"),
        ("an orange, circle", "orange circle"),
        ("Four", "4"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_hand_checked():
    preds = ["red", "Blue", "2", "three", "yes", "no", "top left", "1", "square"]
    answers = ["red", "green", "2", "2", "yes", "yes", "top left", "0", "square"]
    types = ["colour", "colour", "count", "count", "exists", "exists", "position", "relation", "shape"]
    m = vqa_accuracy(preds, answers, types)
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["accuracy_by_type"] == {
        "colour": 0.5,
        "shape": 1.0,
        "count": 0.5,
        "position": 1.0,
        "exists": 0.5,
        "relation": 0.0,
    }
    assert m["num_by_type"] == {
        "colour": 2,
        "shape": 1,
        "count": 2,
        "position": 1,
        "exists": 2,
        "relation": 1,
    }
    # counting = every numeric answer: "2" (right), "2" vs "three" (off by one), "0" vs "1" (off by one)
    assert m["num_counting"] == 3
    assert m["counting_accuracy"] == pytest.approx(1 / 3)
    assert m["counting_within_one"] == 1.0
    assert vqa_accuracy(["x"], ["yes"], ["exists"])["counting_accuracy"] is None
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], ["a", "b"], ["colour"])


def test_evaluate_vqa_oracle_scores_one(data_dir, tmp_path):
    answer_fn = oracle(data_dir, style=lambda a: {"yes": "Yes.", "2": "two"}.get(a, a.upper()))
    result = evaluate_vqa(
        answer_fn, data_dir / "val_vqa.jsonl", batch_size=16, model_name="oracle", progress=False
    )
    rows = read_jsonl(data_dir / "val_vqa.jsonl")
    assert result["task"] == "vqa" and result["model"] == "oracle" and result["dataset"] == "val_vqa"
    m = result["metrics"]
    assert m["accuracy"] == 1.0 and m["counting_accuracy"] == 1.0 and m["num_questions"] == len(rows)
    assert set(m["accuracy_by_type"].values()) == {1.0}
    assert answer_fn.calls == [16] * (len(rows) // 16) + ([len(rows) % 16] if len(rows) % 16 else [])
    limited = evaluate_vqa(answer_fn, data_dir / "val_vqa.jsonl", limit=5, progress=False)
    assert limited["metrics"]["num_questions"] == 5


def test_evaluate_vqa_wrong_on_counting(data_dir, tmp_path):
    rows = read_jsonl(data_dir / "val_vqa.jsonl")
    numeric = [r for r in rows if r["answer"].isdigit()]
    answer_fn = oracle(data_dir, style=lambda a: str(int(a) + 1) if a.isdigit() else a)
    out = tmp_path / "eval"
    result = evaluate_vqa(answer_fn, data_dir / "val_vqa.jsonl", out_dir=out, model_name="m", progress=False)
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(1 - len(numeric) / len(rows))
    assert m["accuracy_by_type"]["count"] == 0.0
    relations = [r for r in rows if r["type"] == "relation"]
    yes_no = sum(r["answer"] in ("yes", "no") for r in relations)
    assert m["accuracy_by_type"]["relation"] == pytest.approx(yes_no / len(relations))
    assert m["counting_accuracy"] == 0.0 and m["counting_within_one"] == 1.0
    assert m["num_counting"] == len(numeric) and m["num_by_type"] == dict(
        sorted(Counter(r["type"] for r in rows).items(), key=lambda kv: list(m["num_by_type"]).index(kv[0]))
    )
    for t in ("colour", "shape", "position", "exists"):
        assert m["accuracy_by_type"][t] == 1.0

    saved = json.loads((out / "vqa.json").read_text())
    assert saved == json.loads(json.dumps(result))
    predictions = read_jsonl(out / "vqa_predictions.jsonl")
    assert len(predictions) == len(rows)
    assert sum(not p["correct"] for p in predictions) == len(numeric)
    assert (out / "vqa_accuracy_by_type.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count('class="card right"') + page.count('class="card wrong"') == 24
    assert 'class="card wrong"' in page and page.count("data:image/png;base64,") == 24
    assert "vqa_accuracy_by_type.png" in page and "counting_accuracy" in page


def test_evaluate_vqa_checks_answer_fn_and_data(data_dir, tmp_path):
    with pytest.raises(ValueError, match="returned 1 outputs for a batch of 4"):
        evaluate_vqa(lambda p, q: ["x"], data_dir / "val_vqa.jsonl", batch_size=4, progress=False)
    with pytest.raises(DataError, match="not found"):
        evaluate_vqa(lambda p, q: q, tmp_path / "none.jsonl", progress=False)


def test_evaluate_captioning_with_repeated_images(data_dir, tmp_path):
    rows = read_jsonl(data_dir / "val_captions.jsonl")
    # a manifest where every image has its own caption plus a second, different reference
    manifest = tmp_path / "refs.jsonl"
    extra = [
        {"image": str(data_dir / r["image"]), "caption": f"picture {i} of shapes"} for i, r in enumerate(rows)
    ]
    base = [{"image": str(data_dir / r["image"]), "caption": r["caption"]} for r in rows]
    manifest.write_text("".join(json.dumps(r) + "\n" for pair in zip(base, extra) for r in pair))

    first_ref = {str(data_dir / r["image"]): r["caption"] for r in rows}
    seen = []

    def caption_fn(paths):
        seen.extend(paths)
        return [first_ref[str(p)] for p in paths]

    out = tmp_path / "eval"
    result = evaluate_captioning(
        caption_fn, manifest, batch_size=7, out_dir=out, model_name="m", progress=False
    )
    m = result["metrics"]
    assert len(seen) == len(rows) == m["num_images"] and m["num_references"] == 2 * len(rows)
    expected = caption_metrics(
        [[b["caption"], e["caption"]] for b, e in zip(base, extra)], [b["caption"] for b in base]
    )
    for key in ("bleu_1", "bleu_4", "cider"):
        assert m[key] == pytest.approx(expected[key], abs=1e-12)
    assert m["bleu_4"] > 0.9  # each prediction is one of its references

    # the conversation file (one reference per image) works too, and both reports share one page
    conv = evaluate_captioning(
        caption_fn, data_dir / "val_captions.jsonl", out_dir=out, limit=10, progress=False
    )
    assert conv["metrics"]["num_images"] == 10 and conv["metrics"]["num_references"] == 10
    assert conv["dataset"] == "val_captions"
    assert len(read_jsonl(out / "captioning_predictions.jsonl")) == 10
    evaluate_vqa(oracle(data_dir), data_dir / "val_vqa.jsonl", out_dir=out, progress=False)
    page = (out / "report.html").read_text()
    assert "<h2>VQA: val_vqa</h2>" in page and "<h2>Captioning: val_captions</h2>" in page
    assert "captioning_cider.png" in page and (out / "captioning_cider.png").is_file()
    assert page.count('class="card"') == 10  # captioning cards (VQA cards carry right/wrong classes)
