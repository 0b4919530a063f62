"""Plots and the one-page HTML report of a run.

The report is a static page beside the run (`run_dir/report.html`) with relative links to PNGs, so
the folder can be copied or served as is. Every section is optional: a run that crashed before its
first eval still gets a page with its loss curve.

Figures use matplotlib's object API on an Agg canvas (no pyplot), so plotting neither needs a display
nor touches global state of a program that imports vlmkit.
"""

import html
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlmkit.config import atomic_write_text
from vlmkit.data.transforms import load_image
from vlmkit.errors import DataError

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 256  # pixels; example grids show many images and need not be sharp
SMOOTH_POINTS = 50  # longer curves get a moving average over len // SMOOTH_POINTS points


# ---------------------------------------------------------------------------- figure helpers


def new_figure(width: float, height: float) -> Figure:
    """A figure (size in inches) drawn by Agg."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def show_image(ax, path: str | Path, border: str | None = None) -> None:
    """Draw the image at `path` on `ax` as a thumbnail, framed in `border` colour if given."""
    image = load_image(path)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    ax.imshow(np.asarray(image))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(border is not None)
        if border is not None:
            spine.set_edgecolor(border)
            spine.set_linewidth(4)


def plot_curves(records: list[dict], prefix: str, path: str | Path) -> Path | None:
    """One small panel per numeric `prefix*` key of `records`, plotted against "step".

    Returns the PNG path, or None when no record has such a key.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and _is_number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    if not series:
        return None
    keys = sorted(series)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = new_figure(4.2 * cols, 3.0 * rows)
    for n, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, n + 1)
        steps, values = series[key]
        window = len(values) // SMOOTH_POINTS
        if window > 1 and not key.endswith("lr"):  # a schedule is not noisy; never smooth it
            # noisy per-step values: faint raw line under a centred moving average (no lag)
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window // 2 : window // 2 + len(smooth)], smooth, color="tab:blue", linewidth=1.5)
        elif len(values) > SMOOTH_POINTS:
            ax.plot(steps, values, color="tab:blue", linewidth=1.2)
        else:
            ax.plot(steps, values, "o-", color="tab:blue", markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- reading the run


def _read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl that carry a numeric "step"; unreadable lines are logged and skipped
    (the last line of a run killed mid-write is often cut short)."""
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            log.warning("%s:%d: skipping line that is not JSON (%s)", path, lineno, e)
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    return records


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: skipping unreadable JSON (%s)", path, e)
        return None


# ---------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; color: #333; }
h3 { font-size: 1.05em; color: #555; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .7em; text-align: right; }
th { background: #f3f4f6; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0; }
figcaption { color: #666; font-size: .9em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: .85em; }
details { margin: .3em 0 1em; }
summary { cursor: pointer; color: #555; }
"""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "&ndash;" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(png: Path, out_dir: Path) -> str:
    src = html.escape(Path(os.path.relpath(png, out_dir)).as_posix())
    name = html.escape(png.name)
    return f'<figure><img src="{src}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def write_page(path: str | Path, title: str, sections: list[str], css: str = "") -> Path:
    """The one HTML page writer of every vlmkit report: a title, the sections (HTML), the shared style
    (plus `css`); written atomically. `title` is plain text."""
    title = html.escape(title)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}{css}</style></head>\n<body><h1>{title}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    atomic_write_text(path, page)
    return Path(path)


def _results_html(results: list[tuple[Path, dict]]) -> str:
    """One table per task: a row per result, a column per scalar metric; dict-valued metrics
    (per-class accuracy) go in collapsible blocks under the table."""
    by_task: dict[str, list[tuple[Path, dict]]] = {}
    for path, result in results:
        by_task.setdefault(str(result.get("task", "unknown")), []).append((path, result))
    parts = []
    for task, items in by_task.items():
        columns: list[str] = []  # union of scalar metric names in first-seen order
        for _, result in items:
            columns += [
                k for k, v in result["metrics"].items() if not isinstance(v, dict) and k not in columns
            ]
        rows = [
            [result.get("dataset", path.stem), result.get("model", "")]
            + [result["metrics"].get(k) for k in columns]
            for path, result in items
        ]
        parts.append(f"<h3>{html.escape(task)}</h3>" + _table(["dataset", "model", *columns], rows))
        for path, result in items:
            for name, value in result["metrics"].items():
                if isinstance(value, dict):
                    summary = html.escape(f"{name}: {result.get('dataset', path.stem)}")
                    table = _table(["key", "value"], [[k, v] for k, v in value.items()])
                    parts.append(f"<details><summary>{summary}</summary>{table}</details>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write an HTML report of the run in `run_dir` and return its path (default run_dir/report.html).

    Reads whatever exists of `metrics.jsonl` (curves, drawn to run_dir/plots/), `eval/*.json`
    (final metrics in CLIP_benchmark form), `eval/*.png` and `config.json`; missing parts are left out.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found; pass the folder a training run wrote")
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []

    records = _read_metrics(run_dir / "metrics.jsonl")
    for prefix, title in (("train/", "Training"), ("val/", "Validation during training")):
        png = plot_curves(records, prefix, run_dir / "plots" / f"{prefix.rstrip('/')}.png")
        if png is not None:
            sections.append(f"<h2>{title}</h2>{_figure(png, out.parent)}")

    eval_dir = run_dir / "eval"
    results, others = [], []
    for path in sorted(eval_dir.glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            results.append((path, data))
        elif data is not None:
            others.append((path, data))
    if results:
        sections.append("<h2>Evaluation</h2>" + _results_html(results))
    for path, data in others:
        sections.append(
            f"<h3>{html.escape(path.name)}</h3><pre>{html.escape(json.dumps(data, indent=2))}</pre>"
        )
    pngs = sorted(eval_dir.glob("*.png"))
    if pngs:
        sections.append("<h2>Evaluation plots</h2>" + "".join(_figure(p, out.parent) for p in pngs))

    config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    if config is not None:
        sections.append(f"<h2>Config</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>")

    if not sections:
        sections.append(
            "<p>Nothing to show yet: no metrics.jsonl, eval/ results or config.json in this run.</p>"
        )
    return write_page(out, f"vlmkit run: {run_dir.resolve().name}", sections)
