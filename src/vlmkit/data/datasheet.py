"""A datasheet (Gebru et al.) for an image-caption manifest: `vlmkit data card`. The sections are the
datasheet's (motivation, composition, collection, preprocessing, uses, distribution, maintenance) with the
numbers computed from the data: rows, skipped rows and why, images and captions, duplicates, the labels, and
with a sensitive attribute its label x attribute table, its association with the label (Cramer's V) and how
many captions name each of its values. A `dataset.json` written by vlmkit's generator beside the manifest
describes how the data was made; without one those sections say "[More Information Needed]". Written as a
Hugging Face dataset card (YAML front matter through huggingface_hub's `DatasetCard`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from vlmkit.data.manifest import read_manifest
from vlmkit.errors import DataError

MORE = "[More Information Needed]"


def cramers_v(table: np.ndarray) -> float:
    """Cramer's V of a contingency table (rows x columns of counts): 0 = independent, 1 = determined."""
    from scipy.stats.contingency import association

    table = np.asarray(table)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if min(table.shape) < 2:
        return 0.0
    return float(association(table, method="cramer"))


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "n>1M"


def dataset_stats(manifest: str | Path, attribute: str | None = None, label_key: str = "label") -> dict:
    """The numbers of the datasheet, as a dict (see the module docstring)."""
    manifest = Path(manifest)
    all_rows, bad = read_manifest(manifest)
    columns = tuple(c for c in (label_key, attribute) if c)
    # the label and attribute columns are optional for the datasheet: read them where present
    with_columns, _ = read_manifest(manifest, columns) if columns else (all_rows, [])
    fields = {r.line: r.fields for r in with_columns}
    hashes = Counter()
    for path in {r.image for r in all_rows}:
        hashes[hashlib.sha256(Path(path).read_bytes()).hexdigest()] += 1
    captions = Counter(r.caption for r in all_rows)
    images = Counter(str(r.image) for r in all_rows)
    stats: dict = {
        "manifest": str(manifest),
        "rows": len(all_rows) + len(bad),
        "usable_rows": len(all_rows),
        "skipped_rows": len(bad),
        "skip_reasons": dict(Counter(b.reason.split(":")[0] for b in bad).most_common()),
        "images": len(images),
        "images_with_several_captions": sum(n > 1 for n in images.values()),
        "duplicate_image_files": sum(n - 1 for n in hashes.values() if n > 1),
        "duplicate_captions": sum(n - 1 for n in captions.values() if n > 1),
        "mean_caption_words": float(np.mean([len(r.caption.split()) for r in all_rows])) if all_rows else 0.0,
    }
    labels = [fields[r.line][label_key] for r in all_rows if r.line in fields and label_key in fields[r.line]]
    if labels:
        stats["labels"] = dict(sorted(Counter(labels).items()))
    if attribute:
        pairs = [(f[label_key], f[attribute]) for f in fields.values() if label_key in f and attribute in f]
        if not pairs:
            raise DataError(f"{manifest}: no row has both {label_key!r} and {attribute!r}")
        ys, values = sorted({y for y, _ in pairs}), sorted({a for _, a in pairs})
        table = np.zeros((len(ys), len(values)), dtype=int)
        for y, a in pairs:
            table[ys.index(y), values.index(a)] += 1
        stats["attribute"] = attribute
        stats["attribute_values"] = dict(sorted(Counter(a for _, a in pairs).items()))
        stats["label_by_attribute"] = {
            y: dict(zip(values, map(int, table[i]), strict=True)) for i, y in enumerate(ys)
        }
        stats["cramers_v"] = cramers_v(table)
        stats["captions_naming_value"] = {
            v: sum(bool(re.search(rf"\b{re.escape(v)}\b", r.caption, re.IGNORECASE)) for r in all_rows)
            for v in values
        }
    record = manifest.parent / "dataset.json"
    if record.is_file():
        try:
            meta = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("generator") == "vlmkit.data.synthetic":
            stats["generator"] = meta
    return stats


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def datasheet(
    manifest: str | Path, attribute: str | None = None, label_key: str = "label", name: str | None = None
) -> str:
    """The datasheet as a Hugging Face dataset card (markdown with YAML front matter)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    s = dataset_stats(manifest, attribute, label_key)
    gen = s.get("generator")
    name = name or Path(manifest).parent.name
    data = DatasetCardData(
        pretty_name=name,
        size_categories=[_size_category(s["usable_rows"])],
        task_categories=["zero-shot-image-classification", "image-to-text"],
        license=None,
    )
    if gen:
        kind = (
            "biased shapes benchmark (vlmkit.data.bias)"
            if gen.get("kind") == "biased"
            else "synthetic shapes data"
        )
        motivation = f"Made by vlmkit's generator as a {kind}: scenes whose content is known exactly, for testing and teaching."
        collection = (
            f"Rendered, not collected: no person is depicted and no data was scraped. Generator settings "
            f"(`dataset.json`): seed {gen.get('seed')}, image size {gen.get('image_size')}"
            + (
                f", attribute `{gen['attribute']}` correlated with the label with strength {gen['strength']} in train "
                f"(measured {gen.get('measured_strength')})"
                if gen.get("attribute")
                else ""
            )
            + "."
        )
    else:
        motivation = collection = MORE
    composition = [
        _table(
            ["", "count"],
            [
                ["rows", s["rows"]],
                ["usable rows", s["usable_rows"]],
                ["skipped rows", s["skipped_rows"]],
                ["images", s["images"]],
                ["images with several captions", s["images_with_several_captions"]],
                ["duplicate image files (identical bytes)", s["duplicate_image_files"]],
                ["duplicate captions", s["duplicate_captions"]],
            ],
        ),
        f"\nMean caption length: {s['mean_caption_words']:.1f} words.",
    ]
    if s["skip_reasons"]:
        composition.append(
            "\nSkipped rows by reason: " + ", ".join(f"{k} ({v})" for k, v in s["skip_reasons"].items()) + "."
        )
    if "labels" in s:
        composition.append(
            "\nLabels (`"
            + label_key
            + "`):\n\n"
            + _table(["label", "rows"], [[k, v] for k, v in s["labels"].items()])
        )
    if attribute:
        values = list(s["attribute_values"])
        rows = [[y, *(row[v] for v in values)] for y, row in s["label_by_attribute"].items()]
        composition.append(
            f"\nLabel x `{attribute}`:\n\n"
            + _table([label_key, *values], rows)
            + f"\n\nAssociation between `{attribute}` and the label: Cramer's V = {s['cramers_v']:.3f} "
            "(0: independent, 1: the attribute determines the label)."
            + "\n\nCaptions naming each value: "
            + ", ".join(f"`{v}` {n}" for v, n in s["captions_naming_value"].items())
            + "."
        )
    body = f"""# Datasheet: {name}

Computed by vlmkit from `{s["manifest"]}`.

## Motivation

{motivation}

## Composition

{chr(10).join(composition)}

## Collection

{collection}

## Preprocessing

Rows that name a missing or empty image, lack a key or have an empty caption are skipped and counted above;
images are decoded when used. Other preprocessing: {MORE if not gen else "none (images as rendered)."}

## Uses

{"Training and evaluating vision-language models, and testing bias measures against a known bias." if gen else MORE}
Not for: drawing conclusions about people.

## Distribution

License: {MORE}

## Maintenance

{MORE}
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


__all__ = ["cramers_v", "dataset_stats", "datasheet"]
