"""The HTML report of a curation run: `report.html` beside the kept data, PNGs under `plots/`.

Sections: counts per filter (table and bar chart), a histogram per scoring filter with its threshold
line (kept and removed samples stacked), and per filter a grid of removed examples with their captions
and the reason each was removed. Figures are drawn like the run report's (`vlmkit.eval.report`).
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

import numpy as np

from vlmkit.data.transforms import ImageDecodeError
from vlmkit.eval.report import THUMBNAIL_SIZE, _figure, _table, new_figure, save_figure, write_page

MAX_EXAMPLES = 16  # removed examples shown per filter
GRID_COLUMNS = 4
PLOTS = "plots"


def _label(n: int, name: str) -> str:
    return f"{n}. {name}"


def plot_removed_counts(steps, path: Path) -> Path:
    """Horizontal bars: how many samples each filter removed, in pipeline order."""
    labels = [_label(n, s.name) for n, s in enumerate(steps, start=1)]
    counts = [len(s.removed) for s in steps]
    fig = new_figure(6.5, 0.45 * len(steps) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(steps))
    ax.barh(y, counts, color="tab:red", alpha=0.8)
    for yi, c, s in zip(y, counts, steps):
        ax.text(c, yi, f" {c} of {s.input}", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # first filter on top
    ax.set_xlabel("samples removed")
    ax.set_xlim(0, max(counts + [1]) * 1.3)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_score_histogram(step, title: str, path: Path) -> Path:
    """Histogram of a filter's per-sample scores, kept and removed stacked, with the threshold line."""
    removed = set(step.removed)
    kept_scores = [v for i, v in step.scores.items() if i not in removed]
    removed_scores = [v for i, v in step.scores.items() if i in removed]
    values = np.asarray(kept_scores + removed_scores)
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
    fig = new_figure(6.5, 3.4)
    ax = fig.add_subplot()
    ax.hist(
        [kept_scores, removed_scores],
        bins=bins,
        stacked=True,
        color=["tab:blue", "tab:red"],
        label=["kept", "removed"],
    )
    if step.threshold is not None:
        ax.axvline(
            step.threshold,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"threshold {step.threshold:.4f}",
        )
    ax.set_xlabel(step.score_name or "score")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _examples(removed: list[int]) -> list[int]:
    """Up to MAX_EXAMPLES removed samples spread evenly over the input order (not just the first few)."""
    if len(removed) <= MAX_EXAMPLES:
        return list(removed)
    picks = np.linspace(0, len(removed) - 1, MAX_EXAMPLES).round().astype(int)
    return [removed[p] for p in dict.fromkeys(picks.tolist())]


def plot_removed_examples(pool, step, path: Path) -> Path:
    """A grid of removed samples: thumbnail, caption (wrapped, shortened) and the reason."""
    items = _examples(step.removed)
    rows = -(-len(items) // GRID_COLUMNS)
    cols = min(GRID_COLUMNS, len(items))
    fig = new_figure(2.6 * cols, 2.9 * rows)
    for n, i in enumerate(items):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        try:
            image = pool.load_image(i)
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            ax.imshow(np.asarray(image))
        except ImageDecodeError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        s = pool.samples[i]
        caption = textwrap.shorten(s.caption, 90, placeholder="...")
        lines = textwrap.wrap(caption, 30)[:3]
        reason = textwrap.wrap(f"[{textwrap.shorten(step.reasons[i], 64, placeholder='...')}]", 34)
        ax.set_title("\n".join([*lines, *reason]), fontsize=7)
    return save_figure(fig, path, dpi=90)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "-"


def write_curation_report(result, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` (and `out_dir/plots/*.png`) for a `CurationResult`; returns its path."""
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS
    pool, steps = result.pool, result.steps
    sections = []

    rows = [["source", pool.source], ["format", pool.kind], ["samples", len(pool)]]
    rows += [[f"skipped on input: {reason}", n] for reason, n in sorted(pool.skipped.items())]
    rows += [["kept", f"{len(result.kept)} ({100 * len(result.kept) / max(len(pool), 1):.1f}%)"]]
    sections.append("<h2>Input and output</h2>" + _table(["", "samples"], rows))

    if steps:
        table = [
            [
                _label(n, s.name),
                _params_text(s.params),
                s.input,
                len(s.removed),
                s.unreadable,
                s.input - len(s.removed),
                s.threshold,
            ]
            for n, s in enumerate(steps, start=1)
        ]
        header = ["filter", "settings", "input", "removed", "unreadable", "kept", "threshold"]
        png = plot_removed_counts(steps, plots / "removed_per_filter.png")
        sections.append("<h2>Filters, in order</h2>" + _table(header, table) + _figure(png, out_dir))

    for n, s in enumerate(steps, start=1):
        label = _label(n, s.name)
        parts = [f"<h2>{html.escape(label)}</h2>", f"<p>removed {len(s.removed)} of {s.input}</p>"]
        if s.stats:
            stats = []
            for k, v in s.stats.items():  # nested dicts (score statistics) as one row per entry
                stats += [[f"{k} {sk}", sv] for sk, sv in v.items()] if isinstance(v, dict) else [[k, v]]
            parts.append(_table(["statistic", "value"], stats))
        if s.scores:
            png = plot_score_histogram(s, label, plots / f"scores_{n:02d}_{s.name}.png")
            parts.append(_figure(png, out_dir))
        if s.removed:
            png = plot_removed_examples(pool, s, plots / f"removed_{n:02d}_{s.name}.png")
            parts.append(_figure(png, out_dir))
        sections.append("\n".join(parts))

    return write_page(out_dir / "report.html", f"vlmkit curation: {Path(pool.source).name}", sections)
