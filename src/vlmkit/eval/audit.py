"""`vlmkit audit` for dual encoders: how a model's zero-shot accuracy, its retrieval for neutral queries and its
embeddings depend on a sensitive attribute, each number with a bootstrap 95% interval, everything needed to
reproduce it recorded beside it (templates, queries, k, targets, seed, the weights' SHA-256), and an HTML
report with plots. The metrics are `vlmkit.eval.fairness`'s.

Data: a manifest (JSONL/CSV) whose rows carry the label and the attribute as columns, as `vlmkit data synth
--bias` writes them (`{"image", "caption", "label": "circle", "background": "warm"}`); rows without either are
skipped and counted.

- zero-shot: the labels are the class names (sorted, recorded), each embedded through every template;
- neutral queries: by default every template with every class name ("a picture of a circle."), which names
  the class and not the attribute; each ranks the whole gallery, and skew is measured in its top k against a
  uniform and a gallery-proportional target;
- leakage: a linear probe for the attribute on the image embeddings and on the caption embeddings
  (5-fold cross-validated), against chance (the majority value's share).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from vlmkit.data.manifest import read_manifest
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.fairness import (
    bootstrap,
    group_accuracy,
    leakage_probe,
    parity_differences,
    parity_fast,
    retrieval_skew,
    target_distribution,
)
from vlmkit.eval.features import extract_image_features, extract_text_features
from vlmkit.eval.zeroshot import build_zeroshot_classifier

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a picture of a {}.", "a photo of a {}.", "an image of a {}.")
TARGETS = ("uniform", "proportional")


def weights_sha256(model_dir: str | Path) -> str | None:
    """SHA-256 of a model folder's weights file (None when there is none to hash)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = Path(model_dir) / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
    return None


def audit_dual_encoder(
    model: torch.nn.Module,
    tokenizer,
    preprocess: PreprocessConfig,
    data: str | Path,
    attribute: str,
    k: int,
    label_key: str = "label",
    templates: list[str] | None = None,
    queries: list[str] | None = None,
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    model_name: str = "",
    model_sha256: str | None = None,
) -> dict:
    """The audit (see the module docstring) as a JSON-able dict."""
    if not hasattr(model, "encode_text") or not hasattr(model, "encode_image"):
        raise ConfigError(
            "vlmkit audit measures dual encoders (CLIP, SigLIP, FLIP); this model has no encode_text"
        )
    rows, bad = read_manifest(data, columns=(label_key, attribute))
    if bad:
        log.warning("%d rows of %s skipped (first: %s)", len(bad), data, bad[0])
    if not rows:
        raise DataError(f"{data}: no row has an image, a caption, {label_key!r} and {attribute!r}")
    images = extract_image_features(
        model, [r.image for r in rows], ImageTransform(preprocess), batch_size, device, bf16
    )
    rows = [rows[i] for i in images.kept]
    image_f = images.features.float()  # (N, D) unit norm
    labels = np.array([r.fields[label_key] for r in rows])
    values = np.array([r.fields[attribute] for r in rows])
    classes = sorted(set(labels.tolist()))
    if len(set(values.tolist())) < 2:
        raise DataError(
            f"{data}: every usable row has the same {attribute!r}; an audit needs two values or more"
        )
    _check_k(k, len(rows))
    templates = list(templates or DEFAULT_TEMPLATES)
    queries = list(queries or [t.replace("{}", c) for c in classes for t in templates])

    classifier = build_zeroshot_classifier(model, tokenizer, classes, templates, device=device, bf16=bf16)
    predictions = np.array(classes)[(image_f @ classifier).argmax(dim=1).numpy()]
    query_f = extract_text_features(model, tokenizer, queries, device=device, bf16=bf16)  # (Q, D)
    similarity = (query_f @ image_f.T).numpy()  # (Q, N)
    caption_f = extract_text_features(model, tokenizer, [r.caption for r in rows], device=device, bf16=bf16)
    leak_image = leakage_probe(image_f.numpy(), values, seed)
    leak_text = leakage_probe(caption_f.numpy(), values, seed)

    def statistic(idx: np.ndarray) -> dict[str, float]:
        groups = group_accuracy(labels[idx], predictions[idx], values[idx])
        out = {k_: groups[k_] for k_ in ("accuracy", "average_group_accuracy", "worst_group_accuracy", "gap")}
        out.update({f"group/{g}": a for g, a in groups["per_group"].items()})
        out.update(parity_fast(labels[idx], predictions[idx], values[idx], classes))
        for target in TARGETS:
            p = target_distribution(values[idx].tolist(), target)
            skew = retrieval_skew(similarity[:, idx], values[idx], k, p)
            out.update({f"{name}@{k}/{target}": v for name, v in skew.items()})
        out["leakage/image"] = float((leak_image["predicted"][idx] == values[idx]).mean())
        out["leakage/text"] = float((leak_text["predicted"][idx] == values[idx]).mean())
        return out

    intervals = bootstrap(statistic, len(rows), samples, seed)
    parity = parity_differences(
        labels, predictions, values, classes
    )  # fairlearn's numbers are the ones reported
    for key in ("demographic_parity_difference", "equalized_odds_difference"):
        intervals[key]["value"] = parity[key]
    groups = group_accuracy(labels, predictions, values)
    per_query = []
    for q, query in enumerate(queries):
        entry = {"query": query}
        for target in TARGETS:
            p = target_distribution(values.tolist(), target)
            skew = retrieval_skew(similarity[q : q + 1], values, k, p)
            entry.update({f"{name}/{target}": v for name, v in skew.items()})
        per_query.append(entry)
    metrics = {key: v for key, v in intervals.items() if not key.startswith("group/")}
    counts = {
        g: int(((labels == g.split(" | ")[0]) & (values == g.split(" | ")[1])).sum())
        for g in groups["per_group"]
    }
    return {
        "task": "audit",
        "model": model_name,
        "model_sha256": model_sha256,
        "dataset": str(data),
        "attribute": attribute,
        "label_key": label_key,
        "settings": {
            "k": k,
            "templates": templates,
            "queries": queries,
            "classes": classes,
            "targets": {t: target_distribution(values.tolist(), t) for t in TARGETS},
            "bootstrap_samples": samples,
            "interval": "95% percentile bootstrap over images",
            "seed": seed,
            "leakage_probe": "logistic regression, 5-fold stratified cross-validation",
            "average": "plain mean over (label, attribute) groups",
        },
        "counts": {
            "images": len(rows),
            "skipped_images": len(images.skipped),
            "bad_rows": len(bad),
            "groups": counts,
        },
        "metrics": metrics,
        "chance": {"leakage/image": leak_image["chance"], "leakage/text": leak_text["chance"]},
        "worst_group": groups["worst_group"],
        "per_group": {g: intervals[f"group/{g}"] for g in groups["per_group"]},
        "parity_per_class": parity["per_class"],
        "per_query": per_query,
    }


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(
            f"--k must be an integer in [1, {n}] (the number of audited images); it is never defaulted: at "
            f"k = {n} the proportional MaxSkew is 0 whatever the model does"
        )


# ---------------------------------------------------------------- report


def _bars(ax, names, entries, chance=None, colour="#4c72b0"):
    values = [e["value"] for e in entries]
    low = [e["value"] - e["low"] for e in entries]
    high = [e["high"] - e["value"] for e in entries]
    ax.barh(range(len(names)), values, xerr=[low, high], color=colour, capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    if chance is not None:
        ax.axvline(chance, color="#c44e52", linestyle="--", linewidth=1)


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
    leak = [m["leakage/image"], m["leakage/text"]]
    _bars(ax, ["image embeddings", "caption embeddings"], leak, chance=result["chance"]["leakage/image"])
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
        "<h2>Settings (everything needed to reproduce the numbers)</h2>",
        f"<pre>{html.escape(json.dumps(result['settings'], indent=2))}</pre>",
    ]
    return write_page(out / "report.html", f"Bias audit: {result['attribute']}", sections)


__all__ = ["DEFAULT_TEMPLATES", "audit_dual_encoder", "weights_sha256", "write_audit_report"]
