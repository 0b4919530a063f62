"""VQA and captioning evaluation of any generative model, through a function that answers or captions.

The model is hidden behind a plain function, so one evaluation serves LLaVA, CoCa or an imported model:

    answer_fn(image_paths: list[Path], questions: list[str]) -> list[str]
    caption_fn(image_paths: list[Path]) -> list[str]

VQA is exact match after VQA-style answer normalisation, overall, by question type and on counting
questions; captioning is BLEU-1..4 and CIDEr-D as the COCO evaluation computes them (eval/captioning.py).
Results are CLIP_benchmark-style dicts (see eval/features.py); with `out_dir` they are saved as
`vqa.json` / `captioning.json` with every prediction in `*_predictions.jsonl`, and `report.html` shows
the metrics, plots and a grid of examples of whichever of the two evaluations the folder holds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlmkit.data.chat import IMAGE_TOKEN, normalize_conversation
from vlmkit.data.manifest import read_manifest
from vlmkit.data.transforms import ImageDecodeError, load_image
from vlmkit.data.vqa import QUESTION_TYPES, read_conversations
from vlmkit.errors import DataError
from vlmkit.eval.captioning import caption_scores
from vlmkit.eval.features import result_dict, save_results
from vlmkit.eval.report import _figure, _table, new_figure, save_figure, write_page

AnswerFn = Callable[[list[Path], list[str]], list[str]]
CaptionFn = Callable[[list[Path]], list[str]]

NUM_EXAMPLES = 24  # example cards in report.html per evaluation
EXAMPLE_SIZE = 128  # pixels; the thumbnails are embedded in the page, so it stays one portable file

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"  # as the VQA evaluation
_ARTICLES = {"a", "an", "the"}
_SPELLING = {"center": "centre", "color": "colour", "gray": "grey"}
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]")  # any punctuation except a decimal point


def normalize_answer(answer: str) -> str:
    """VQA-style normalisation before exact match: lower case, punctuation and articles removed, number
    words as digits ("Two." -> "2", "the top-left" -> "top left"), British spelling of our vocabulary."""
    text = _PUNCTUATION.sub(" ", answer.lower())
    words = [_SPELLING.get(w, _NUMBERS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _as_number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def vqa_accuracy(preds: Sequence[str], answers: Sequence[str], types: Sequence[str]) -> dict:
    """Exact-match accuracy of normalised answers: overall, by question type, and on counting.

    Counting covers every question whose answer is a number (count questions and "how many ... are left
    of ..."); `counting_within_one` also accepts a count off by one. Returns {"accuracy", "num_questions",
    "counting_accuracy", "counting_within_one", "num_counting", "accuracy_by_type", "num_by_type"};
    accuracies of empty groups are None.
    """
    if not len(preds) == len(answers) == len(types):
        raise ValueError(f"got {len(preds)} predictions, {len(answers)} answers and {len(types)} types")
    if not preds:
        raise ValueError("no questions to score")
    pred_norm = [normalize_answer(p) for p in preds]
    gold_norm = [normalize_answer(a) for a in answers]
    correct = np.array([p == g for p, g in zip(pred_norm, gold_norm)])
    order = [t for t in QUESTION_TYPES if t in types] + sorted(set(types) - set(QUESTION_TYPES))
    by_type = {t: float(correct[[x == t for x in types]].mean()) for t in order}
    counting = [i for i, g in enumerate(gold_norm) if _as_number(g) is not None]
    near = [(n := _as_number(pred_norm[i])) is not None and abs(n - int(gold_norm[i])) <= 1 for i in counting]
    return {
        "accuracy": float(correct.mean()),
        "num_questions": len(preds),
        "counting_accuracy": float(correct[counting].mean()) if counting else None,
        "counting_within_one": float(np.mean(near)) if counting else None,
        "num_counting": len(counting),
        "accuracy_by_type": by_type,
        "num_by_type": {t: sum(x == t for x in types) for t in order},
    }


# ---------------------------------------------------------------------------------------------- data


def _first_turns(row: dict) -> tuple[str, str]:
    """(question without the image marker, answer) of a conversation row's first exchange."""
    where = f"row {row.get('id', row.get('line'))}"
    turns = normalize_conversation(row.get("conversations"), where)
    question = next((text for role, text in turns if role == "user"), None)
    answer = next((text for role, text in turns if role == "assistant"), None)
    if question is None or answer is None:
        raise DataError(f"{where}: the conversation needs a human and a gpt turn")
    return question.replace(IMAGE_TOKEN, "").strip(), answer.strip()


def _vqa_items(data: str | Path | Sequence[dict]) -> tuple[list[dict], int]:
    """[{"id", "image", "question", "answer", "type"}] and the number of bad rows skipped."""
    rows = read_conversations(data) if isinstance(data, str | Path) else list(data)
    items = []
    for row in rows:
        question, answer = _first_turns(row)
        items.append(
            {
                "id": row.get("id", row.get("line")),
                "image": Path(row["image"]),
                "question": question,
                "answer": str(row.get("answer", answer)),
                "type": row.get("type", "unknown"),
            }
        )
    return items, len(getattr(rows, "bad_rows", []))


def _caption_references(data: str | Path) -> tuple[dict[Path, list[str]], int]:
    """{image: [reference captions]} in order of first appearance, and the number of bad rows.

    Reads conversation files (the gpt turn is the caption) and image-caption manifests (see read_manifest).
    """
    path = Path(data)
    first = ""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
    references: dict[Path, list[str]] = {}
    if first.lstrip().startswith("[") or '"conversations"' in first:
        rows = read_conversations(path)
        for row in rows:
            references.setdefault(Path(row["image"]), []).append(_first_turns(row)[1])
        return references, len(rows.bad_rows)
    samples, bad = read_manifest(path)
    if not samples:
        raise DataError(f"no usable image-caption rows in {path} ({len(bad)} bad rows; see the log)")
    for sample in samples:
        references.setdefault(Path(sample.image), []).append(sample.caption)
    return references, len(bad)


def _batches(n: int, batch_size: int, desc: str, progress: bool):
    with tqdm(total=n, desc=desc, unit="img" if desc == "captions" else "q", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            yield start, min(start + batch_size, n)
            bar.update(min(start + batch_size, n) - start)


def _check_outputs(outputs: list, expected: int, name: str) -> list[str]:
    outputs = list(outputs)
    if len(outputs) != expected:
        raise ValueError(f"{name} returned {len(outputs)} outputs for a batch of {expected}")
    return [str(o) for o in outputs]


# ---------------------------------------------------------------------------------------------- evaluations


def evaluate_vqa(
    answer_fn: AnswerFn,
    data: str | Path | Sequence[dict],
    *,
    batch_size: int = 64,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    model_name: str = "",
    dataset_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Ask every question of `data` (a `*_vqa.jsonl` conversation file, or rows from `read_conversations`)
    through `answer_fn`, in batches; score with `vqa_accuracy`.

    The ground truth is a row's "answer" key, else its first gpt turn; the type its "type" ("unknown"
    when absent). `limit` keeps the first questions only. With `out_dir`, writes vqa.json,
    vqa_predictions.jsonl, vqa_accuracy_by_type.png and report.html. Returns the result dict.
    """
    items, num_bad = _vqa_items(data)
    items = items[:limit] if limit is not None else items
    preds: list[str] = []
    for start, stop in _batches(len(items), batch_size, "questions", progress):
        batch = items[start:stop]
        answers = answer_fn([it["image"] for it in batch], [it["question"] for it in batch])
        preds += _check_outputs(answers, len(batch), "answer_fn")
    metrics = vqa_accuracy(preds, [it["answer"] for it in items], [it["type"] for it in items])
    metrics["num_skipped"] = num_bad
    name = dataset_name or (Path(data).stem if isinstance(data, str | Path) else "vqa")
    result = result_dict("vqa", name, model_name, metrics)
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_results(result, out_dir / "vqa.json")
        records = [
            {
                **it,
                "image": str(it["image"]),
                "prediction": p,
                "correct": normalize_answer(p) == normalize_answer(it["answer"]),
            }
            for it, p in zip(items, preds)
        ]
        _write_jsonl(out_dir / "vqa_predictions.jsonl", records)
        plot_accuracy_by_type(metrics, out_dir / "vqa_accuracy_by_type.png")
        write_eval_report(out_dir)
    return result


def evaluate_captioning(
    caption_fn: CaptionFn,
    data: str | Path,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    model_name: str = "",
    dataset_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Caption every distinct image of `data` with `caption_fn` and score BLEU-1..4 and CIDEr-D.

    `data` is a captions conversation file (`*_captions.jsonl`) or an image-caption manifest; an image
    named by several rows has several references. `limit` keeps the first images only. With `out_dir`,
    writes captioning.json, captioning_predictions.jsonl, captioning_cider.png and report.html.
    """
    references, num_bad = _caption_references(data)
    images = list(references)[:limit] if limit is not None else list(references)
    captions: list[str] = []
    for start, stop in _batches(len(images), batch_size, "captions", progress):
        captions += _check_outputs(caption_fn(images[start:stop]), stop - start, "caption_fn")
    metrics, per_image = caption_scores([references[p] for p in images], captions)
    metrics["num_references"] = sum(len(references[p]) for p in images)
    metrics["mean_caption_words"] = float(np.mean([len(c.split()) for c in captions]))
    metrics["num_skipped"] = num_bad
    result = result_dict("captioning", dataset_name or Path(data).stem, model_name, metrics)
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_results(result, out_dir / "captioning.json")
        records = [
            {
                "image": str(p),
                "prediction": c,
                "references": references[p],
                "cider": float(per_image["cider"][i]),
                "bleu_4": float(per_image["bleu_4"][i]),
            }
            for i, (p, c) in enumerate(zip(images, captions))
        ]
        _write_jsonl(out_dir / "captioning_predictions.jsonl", records)
        plot_cider_histogram(per_image["cider"], out_dir / "captioning_cider.png")
        write_eval_report(out_dir)
    return result


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- plots


def plot_accuracy_by_type(metrics: dict, path: str | Path) -> Path:
    """Bars of accuracy per question type (with the number of questions), and the overall accuracy."""
    types = list(metrics["accuracy_by_type"])
    values = [metrics["accuracy_by_type"][t] for t in types]
    fig = new_figure(1.2 + 0.9 * len(types), 3.4)
    ax = fig.add_subplot()
    bars = ax.bar(types, values, color="tab:blue")
    for bar, t in zip(bars, types):
        label = f"{metrics['accuracy_by_type'][t]:.2f}\nn={metrics['num_by_type'][t]}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, label, ha="center", fontsize=8)
    ax.axhline(
        metrics["accuracy"],
        color="tab:gray",
        linestyle="--",
        linewidth=1,
        label=f"overall {metrics['accuracy']:.2f}",
    )
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("VQA accuracy by question type")
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


def plot_cider_histogram(scores: np.ndarray, path: str | Path) -> Path:
    """Histogram of per-image CIDEr-D, with the mean marked."""
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    ax.hist(scores, bins=30, color="tab:blue")
    ax.axvline(float(np.mean(scores)), color="tab:red", linestyle="--", label=f"mean {np.mean(scores):.3f}")
    ax.set_xlabel("CIDEr-D per image")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- report

_REPORT_CSS = """
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .8em; }
.card { border: 3px solid #ccc; border-radius: 6px; padding: .4em; font-size: .85em; }
.card img { width: 100%; image-rendering: pixelated; border: none; }
.card.right { border-color: #2ca02c; } .card.wrong { border-color: #d62728; }
.card p { margin: .2em 0; text-align: left; } .muted { color: #666; }
"""


def _thumbnail(path: str) -> str:
    """An <img> with the image inlined as a PNG data URI, or a note when it cannot be read."""
    try:
        image = load_image(path)
    except ImageDecodeError as e:
        return f'<p class="muted">({html.escape(e.reason)})</p>'
    image.thumbnail((EXAMPLE_SIZE, EXAMPLE_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _spread(records: list[dict], key: str | None, n: int) -> list[dict]:
    """Up to n records spread evenly over the list, taking the groups of `key` in turn (every question
    type shows up)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get(key, "") if key else "", []).append(r)
    per_group = {g: rs[:: max(1, math.ceil(len(rs) / n))] for g, rs in groups.items()}
    picked: list[dict] = []
    for i in range(n):
        for rs in per_group.values():
            if i < len(rs) and len(picked) < n:
                picked.append(rs[i])
    return picked


def _vqa_section(out_dir: Path) -> str:
    result = json.loads((out_dir / "vqa.json").read_text(encoding="utf-8"))
    m = result["metrics"]
    scalars = [[k, v] for k, v in m.items() if not isinstance(v, dict)]
    by_type = [[t, m["accuracy_by_type"][t], m["num_by_type"][t]] for t in m["accuracy_by_type"]]
    parts = [
        f"<h2>VQA: {html.escape(result['dataset'])}</h2>",
        _table(["metric", "value"], scalars),
        _table(["question type", "accuracy", "questions"], by_type),
    ]
    if (out_dir / "vqa_accuracy_by_type.png").is_file():
        parts.append(_figure(out_dir / "vqa_accuracy_by_type.png", out_dir))
    if (out_dir / "vqa_predictions.jsonl").is_file():
        cards = []
        for r in _spread(_read_jsonl(out_dir / "vqa_predictions.jsonl"), "type", NUM_EXAMPLES):
            verdict = "right" if r["correct"] else "wrong"
            cards.append(
                f'<div class="card {verdict}">{_thumbnail(r["image"])}'
                f'<p class="muted">{html.escape(str(r["type"]))}</p>'
                f"<p><b>Q:</b> {html.escape(r['question'])}</p>"
                f"<p><b>predicted:</b> {html.escape(r['prediction'])}</p>"
                f"<p><b>truth:</b> {html.escape(r['answer'])}</p></div>"
            )
        parts.append(
            "<h3>Examples (green: right, red: wrong)</h3>" + f'<div class="grid">{"".join(cards)}</div>'
        )
    return "\n".join(parts)


def _captioning_section(out_dir: Path) -> str:
    result = json.loads((out_dir / "captioning.json").read_text(encoding="utf-8"))
    parts = [
        f"<h2>Captioning: {html.escape(result['dataset'])}</h2>",
        _table(
            ["metric", "value"], [[k, v] for k, v in result["metrics"].items() if not isinstance(v, dict)]
        ),
    ]
    if (out_dir / "captioning_cider.png").is_file():
        parts.append(_figure(out_dir / "captioning_cider.png", out_dir))
    if (out_dir / "captioning_predictions.jsonl").is_file():
        cards = []
        for r in _spread(_read_jsonl(out_dir / "captioning_predictions.jsonl"), None, NUM_EXAMPLES):
            refs = "".join(f"<p class='muted'>&bull; {html.escape(ref)}</p>" for ref in r["references"])
            cards.append(
                f'<div class="card">{_thumbnail(r["image"])}'
                f"<p><b>predicted:</b> {html.escape(r['prediction'])}</p>"
                f"<p><b>references:</b></p>{refs}"
                f"<p class='muted'>CIDEr {r['cider']:.3f}, BLEU-4 {r['bleu_4']:.3f}</p></div>"
            )
        parts.append("<h3>Examples</h3>" + f'<div class="grid">{"".join(cards)}</div>')
    return "\n".join(parts)


def write_eval_report(out_dir: str | Path) -> Path:
    """(Re)write `out_dir/report.html` from the vqa.json and captioning.json results the folder holds
    (metrics tables, plots, example grids); returns its path."""
    out_dir = Path(out_dir)
    sections = []
    if (out_dir / "vqa.json").is_file():
        sections.append(_vqa_section(out_dir))
    if (out_dir / "captioning.json").is_file():
        sections.append(_captioning_section(out_dir))
    if not sections:
        raise DataError(
            f"{out_dir} holds no vqa.json or captioning.json; run an evaluation with out_dir first"
        )
    models = {
        json.loads((out_dir / f).read_text(encoding="utf-8")).get("model", "")
        for f in ("vqa.json", "captioning.json")
        if (out_dir / f).is_file()
    }
    title = "vlmkit evaluation" + (f": {', '.join(sorted(m for m in models if m))}" if any(models) else "")
    return write_page(out_dir / "report.html", title, sections, css=_REPORT_CSS)
