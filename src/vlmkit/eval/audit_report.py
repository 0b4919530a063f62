"""The HTML report of `vlmkit audit` (`vlmkit.eval.audit`): accuracy by group, skew per query and leakage plots,
every number with its interval, the mitigations side by side, and the settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _bars(ax, names, entries, chance=None, colour="#4c72b0"):
    values = [e["value"] for e in entries]
    low = [e["value"] - e["low"] for e in entries]
    high = [e["high"] - e["value"] for e in entries]
    ax.barh(range(len(names)), values, xerr=[low, high], color=colour, capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    if chance is not None:
        ax.axvline(chance, color="#c44e52", linestyle="--", linewidth=1)


def _mitigation_html(result: dict) -> list[str]:
    """Before and after each mitigation, side by side; a bias measure that got worse is marked."""
    from vlmkit.eval.report import _table

    after = result.get("mitigations")
    if not after:
        return []
    names = list(after)
    rows = []
    for key, entry in result["metrics"].items():
        cells = [key, entry["value"]]
        for name in names:
            value = after[name]["metrics"][key]["value"]
            cells.append(f"{value:.4f}" + (" (worse)" if key in after[name]["worse"] else ""))
        rows.append(cells)
    costs = ", ".join(f"{n}: {after[n]['accuracy_cost']:+.4f}" for n in names)
    return [
        "<h2>Mitigation: before and after</h2>",
        f"<p>Same images, seeds and bootstrap draws. Cost in average group accuracy: {costs}. "
        "'(worse)': the interval after lies wholly above the value before.</p>",
        _table(["metric", "before", *names], rows),
    ]


def write_audit_report(result: dict, out_dir: str | Path) -> Path:
    """report.html with per-group accuracy, skew per query and leakage plots, and the settings."""
    import html
    import json

    from vlmkit.eval.report import _table, new_figure, save_figure, write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m, k = result["metrics"], result["settings"]["k"]
    groups = result["per_group"]
    fig = new_figure(6.5, 0.3 * len(groups) + 1.2)
    ax = fig.add_subplot()
    worst = result["worst_group"]
    _bars(ax, list(groups), list(groups.values()))
    for patch, name in zip(ax.patches, groups, strict=True):
        if name == worst:
            patch.set_color("#c44e52")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("zero-shot accuracy (95% interval); red: the worst group")
    save_figure(fig, out / "group_accuracy.png")

    fig = new_figure(6.5, 0.25 * len(result["per_query"]) + 1.2)
    ax = fig.add_subplot()
    names = [q["query"] for q in result["per_query"]]
    y = np.arange(len(names))
    for offset, target, colour in ((-0.2, "uniform", "#4c72b0"), (0.2, "proportional", "#dd8452")):
        ax.barh(
            y + offset,
            [q[f"max_skew/{target}"] for q in result["per_query"]],
            height=0.4,
            color=colour,
            label=target,
        )
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"MaxSkew@{k} per neutral query")
    ax.legend(fontsize=8)
    save_figure(fig, out / "skew_per_query.png")

    fig = new_figure(5.0, 1.8)
    ax = fig.add_subplot()
    sides = [
        (n, key)
        for n, key in (("image embeddings", "leakage/image"), ("caption embeddings", "leakage/text"))
        if key in m
    ]
    _bars(ax, [n for n, _ in sides], [m[key] for _, key in sides], chance=result["chance"]["leakage/image"])
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(f"probe accuracy for {result['attribute']!r} (dashed: chance)")
    save_figure(fig, out / "leakage.png")

    rows = [[name, e["value"], e["low"], e["high"]] for name, e in m.items()]
    sections = [
        f"<p>Model <code>{html.escape(str(result['model']))}</code> (weights SHA-256 "
        f"<code>{html.escape(str(result['model_sha256']))}</code>), data <code>{html.escape(result['dataset'])}</code>, "
        f"attribute <code>{html.escape(result['attribute'])}</code>, k = {k}, {result['counts']['images']} images. "
        f"Worst group: <b>{html.escape(worst)}</b>.</p>",
        "<h2>Accuracy by group</h2>",
        '<img src="group_accuracy.png" alt="accuracy by group">',
        "<h2>Retrieval skew for neutral queries</h2>",
        '<img src="skew_per_query.png" alt="skew per query">',
        "<h2>Attribute leakage</h2>",
        '<img src="leakage.png" alt="leakage">',
        "<h2>Every number, with its 95% interval</h2>",
        _table(["metric", "value", "low", "high"], rows),
        *_mitigation_html(result),
        "<h2>Settings (everything needed to reproduce the numbers)</h2>",
        f"<pre>{html.escape(json.dumps(result['settings'], indent=2))}</pre>",
    ]
    return write_page(out / "report.html", f"Bias audit: {result['attribute']}", sections)


__all__ = ["write_audit_report"]
