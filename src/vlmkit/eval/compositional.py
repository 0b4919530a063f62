"""Compositional benchmark: does a model prefer an image's true caption to captions that differ in one way?

Each row of the data (JSONL, image paths relative to the file, as `vlmkit data tasks` writes
`val_compositional.jsonl`) holds `image`, `caption`, `foils` (a list of {"text", "type"}) and optionally
`type`. A row is right when the true caption scores above every foil (a tie is wrong); the accuracy is
reported overall and by foil type. Every family that can score an image-text pair is scored the way it can:

- dual encoders (CLIP, SigLIP, FLIP) by the cosine of the two embeddings;
- fusion models by ITM, the log-odds of "match" (or, with `scorer="itc"`, by their ITC cosine);
- generative models (CoCa, LLaVA) by the caption's log-likelihood given the image.

A dual encoder sees a caption almost as a bag of words: on attribute swaps ("a red circle and a blue star"
against "a blue circle and a red star") it sits near chance, 0.5.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from vlmkit.data.manifest import read_jsonl
from vlmkit.data.transforms import ImageDecodeError, load_image
from vlmkit.errors import DataError
from vlmkit.eval.features import result_dict, save_results
from vlmkit.eval.report import _table, write_page

ScoreFn = Callable[[list[Path], list[str]], list[float]]  # (image per pair, text per pair) -> score per pair

NUM_EXAMPLES = 24


def read_rows(path: str | Path) -> list[dict]:
    """The benchmark's rows, image paths resolved; a malformed row is an error naming its line."""
    path = Path(path)
    rows = []
    for line_no, row in read_jsonl(path, "write it with `vlmkit data tasks DATA_DIR`"):
        foils = row.get("foils")
        if not row.get("image") or not row.get("caption") or not foils:
            raise DataError(f"{path}:{line_no}: a row needs 'image', 'caption' and a non-empty 'foils' list")
        for foil in foils:
            if not isinstance(foil, dict) or not isinstance(foil.get("text"), str):
                raise DataError(f"{path}:{line_no}: each foil is an object with a 'text'")
        rows.append({**row, "image": path.parent / row["image"], "line": line_no})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def compositional_accuracy(
    rows: Sequence[dict], score_fn: ScoreFn, batch_size: int = 64
) -> tuple[dict, list[dict]]:
    """Score every row's caption and foils; returns (metrics, per-row predictions)."""
    pairs = [(r["image"], text) for r in rows for text in [r["caption"]] + [f["text"] for f in r["foils"]]]
    scores: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="pairs", disable=len(pairs) < 2000):
        chunk = pairs[start : start + batch_size]
        scores += score_fn([p for p, _ in chunk], [t for _, t in chunk])
    predictions, by_type, k = [], defaultdict(list), 0
    for r in rows:
        n = 1 + len(r["foils"])
        true, foils = scores[k], scores[k + 1 : k + n]
        k += n
        right = all(true > f for f in foils)
        kind = r.get("type") or r["foils"][0].get("type") or "foil"
        by_type[kind].append(right)
        predictions.append(
            {
                "image": str(r["image"]),
                "caption": r["caption"],
                "caption_score": true,
                "type": kind,
                "correct": right,
                "foils": [{**f, "score": s} for f, s in zip(r["foils"], foils, strict=True)],
            }
        )
    correct = [p["correct"] for p in predictions]
    metrics = {
        "accuracy": sum(correct) / len(correct),
        "num_rows": len(correct),
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "num_by_type": {t: len(v) for t, v in sorted(by_type.items())},
    }
    return metrics, predictions


def evaluate_compositional(
    score_fn: ScoreFn,
    data: str | Path,
    out_dir: str | Path | None = None,
    scorer: str = "",
    model_name: str = "",
    batch_size: int = 64,
) -> dict:
    """The benchmark on `data` (see the module docstring) with `score_fn` (for a loaded model:
    `vlmkit.inference.score.pair_scorer`; `scorer` names it in the results); with `out_dir`,
    compositional.json, every row's scores in compositional_predictions.jsonl and report.html with examples."""
    rows = read_rows(data)
    for r in rows[:1]:  # a missing or broken image is an error before any scoring
        try:
            load_image(r["image"])
        except ImageDecodeError as e:
            raise DataError(f"{data}:{r['line']}: {e}") from None
    metrics, predictions = compositional_accuracy(rows, score_fn, batch_size)
    metrics["scorer"] = scorer
    results = result_dict("compositional", Path(data).stem, model_name, metrics)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_results(results, out / "compositional.json")
        (out / "compositional_predictions.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in predictions)
        )
        write_compositional_report(out, results, predictions)
    return results


def write_compositional_report(out: Path, results: dict, predictions: list[dict]) -> Path:
    from vlmkit.eval.vqa import _thumbnail

    m = results["metrics"]
    table = _table(
        ["foil type", "rows", "accuracy"],
        [["all", m["num_rows"], f"{m['accuracy']:.3f}"]]
        + [[t, m["num_by_type"][t], f"{a:.3f}"] for t, a in m["accuracy_by_type"].items()],
    )
    cards = []
    per_type = defaultdict(list)
    for p in predictions:
        per_type[p["type"]].append(p)
    shown = [p for kind in per_type.values() for p in kind[: max(1, NUM_EXAMPLES // len(per_type))]]
    for p in shown:
        foils = "".join(
            f"<div class='foil'>{html.escape(f['text'])} <small>({f['score']:.2f})</small></div>"
            for f in p["foils"]
        )
        mark = "right" if p["correct"] else "wrong"
        cards.append(
            f"<div class='card {mark}'>{_thumbnail(p['image'])}<div class='true'>"
            f"{html.escape(p['caption'])} <small>({p['caption_score']:.2f})</small></div>{foils}"
            f"<div class='kind'>{html.escape(p['type'])}: {mark}</div></div>"
        )
    css = (
        ".cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:220px;border:2px solid #ccc;padding:6px;"
        "font-size:13px}.card.right{border-color:#3a3}.card.wrong{border-color:#c33}.card img{width:128px;"
        "image-rendering:pixelated}.true{color:#063}.foil{color:#700}.kind{color:#555}"
    )
    sections = [
        f"<h2>Accuracy ({html.escape(m['scorer'])} scorer)</h2>"
        "<p>A row is right when the true caption (green) scores above every foil (red).</p>" + table,
        "<h2>Examples</h2><div class='cards'>" + "".join(cards) + "</div>",
    ]
    return write_page(out / "report.html", f"Compositional benchmark: {results['dataset']}", sections, css)


__all__ = ["compositional_accuracy", "evaluate_compositional", "read_rows"]
