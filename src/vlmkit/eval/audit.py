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

Captioning and VQA models (CoCa, LLaVA) are audited from what they say (`audit_captions`): accuracy by group
(the caption names the label), and how often captions of bias-conflicting images name the majority value.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmkit.data.manifest import read_folder_metadata, read_manifest
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.fairness import (
    SFID,
    attribute_directions,
    bootstrap,
    calibrated_projection,
    check_k,
    group_accuracy,
    group_key,
    leakage_probe,
    parity_differences,
    parity_fast,
    project,
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


@dataclass
class Embedded:
    """What the audit measures: unit-norm embeddings of the images, the classes (template means), the
    neutral queries and the captions. A mitigation maps one Embedded to another."""

    image: np.ndarray  # (N, D)
    classes: np.ndarray  # (C, D)
    queries: np.ndarray  # (Q, D)
    captions: np.ndarray | None  # (N, D); None when the data has no captions


@dataclass
class Mitigation:
    """Settings of the post-hoc mitigations (`--mitigate projection projection-images sfid`)."""

    names: tuple[str, ...] = ()
    attribute_template: str = "a picture of a {value} background."  # prompts naming only the attribute
    pair_template: str = "a picture of a {label} on a {value} background."  # pairs differing only in it
    lam: float = 1000.0  # the projection's calibration strength (Chuang et al.)
    fit_data: str | None = (
        None  # SFID, projection-images: a manifest with label and attribute (not the audited)
    )
    sfid_dims: int = 0  # SFID: dimensions replaced; 0 = an eighth of the embedding
    sfid_low_fraction: float = 0.1  # SFID: the least confident share of samples gives the replacements


MITIGATIONS = ("projection", "projection-images", "sfid")
# the measures where lower means less bias (the MinSkew is the negative side: nearer 0 is better)
BIAS_MEASURES = (
    "gap",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "leakage/image",
    "leakage/text",
)


def _unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def measure(
    e: Embedded,
    labels: np.ndarray,
    values: np.ndarray,
    classes: list[str],
    queries: list[str],
    k: int,
    samples: int,
    seed: int,
    aligned: np.ndarray | None = None,
) -> dict:
    """Every number of the audit for one set of embeddings, with bootstrap intervals (same seed, same draws)."""
    predictions = np.array(classes)[(e.image @ e.classes.T).argmax(axis=1)]
    similarity = e.queries @ e.image.T  # (Q, N)
    leak_image = leakage_probe(e.image, values, seed)
    leak_text = leakage_probe(e.captions, values, seed) if e.captions is not None else None

    def statistic(idx: np.ndarray) -> dict[str, float]:
        groups = group_accuracy(labels[idx], predictions[idx], values[idx])
        out = {k_: groups[k_] for k_ in ("accuracy", "average_group_accuracy", "worst_group_accuracy", "gap")}
        out.update({f"group/{g}": a for g, a in groups["per_group"].items()})
        out.update(parity_fast(labels[idx], predictions[idx], values[idx], classes))
        if aligned is not None:  # signed: 0 when the attribute does not matter, > 0 when the majority helps
            right, a = labels[idx] == predictions[idx], aligned[idx]
            if a.any() and (~a).any():
                out["conflict_gap"] = float(right[a].mean() - right[~a].mean())
        for target in TARGETS:
            p = target_distribution(values[idx].tolist(), target)
            skew = retrieval_skew(similarity[:, idx], values[idx], k, p)
            out.update({f"{name}@{k}/{target}": v for name, v in skew.items()})
        out["leakage/image"] = float((leak_image["predicted"][idx] == values[idx]).mean())
        if leak_text is not None:
            out["leakage/text"] = float((leak_text["predicted"][idx] == values[idx]).mean())
        return out

    intervals = bootstrap(statistic, len(labels), samples, seed)
    parity = parity_differences(
        labels, predictions, values, classes
    )  # fairlearn's numbers are the ones reported
    for key in ("demographic_parity_difference", "equalized_odds_difference"):
        intervals[key]["value"] = parity[key]
    groups = group_accuracy(labels, predictions, values)
    targets = {t: target_distribution(values.tolist(), t) for t in TARGETS}
    per_query = []
    for q, query in enumerate(queries):
        entry = {"query": query}
        for target, p in targets.items():
            skew = retrieval_skew(similarity[q : q + 1], values, k, p)
            entry.update({f"{name}/{target}": v for name, v in skew.items()})
        per_query.append(entry)
    return {
        "metrics": {key: v for key, v in intervals.items() if not key.startswith("group/")},
        "chance": {
            "leakage/image": leak_image["chance"],
            "leakage/text": leak_text["chance"] if leak_text else None,
        },
        "worst_group": groups["worst_group"],
        "per_group": {g: intervals[f"group/{g}"] for g in groups["per_group"]},
        "parity_per_class": parity["per_class"],
        "per_query": per_query,
    }


def aligned_rows(labels: np.ndarray, values: np.ndarray, majority: dict[str, str]) -> np.ndarray:
    """(N,) bool: the row's attribute value is its label's majority value (bias-aligned)."""
    missing = sorted(set(labels.tolist()) - set(majority))
    if missing:
        raise ConfigError(f"--majority names no value for the label {missing[0]!r}; give one for every label")
    return np.array([majority[y] == v for y, v in zip(labels, values, strict=True)])


def read_audit_rows(data: str | Path, attribute: str, label_key: str = "label"):
    """(rows with the label and attribute in `fields`, bad rows) of a manifest or an imagefolder with metadata."""
    if Path(data).is_dir():  # an ImageFolder with metadata.jsonl/csv: the label is the class subfolder
        rows, bad = read_folder_metadata(data, (attribute,), label_key)
    else:
        rows, bad = read_manifest(data, columns=(label_key, attribute))
    if bad:
        log.warning("%d rows of %s skipped (first: %s)", len(bad), data, bad[0])
    if not rows:
        raise DataError(f"{data}: no row has an image, a caption, {label_key!r} and {attribute!r}")
    return rows, bad


def _names(word: str, text: str) -> bool:
    """Whether `text` names `word` (as a word, singular or plural, any case)."""
    return re.search(rf"\b{re.escape(word.lower())}(s|es)?\b", text.lower()) is not None


def audit_captions(
    captions: list[str],
    labels: list[str],
    values: list[str],
    majority: dict[str, str] | None = None,
    samples: int = 1000,
    seed: int = 0,
) -> dict:
    """The audit of a captioning or VQA model from its generated captions (or answers): a caption is right
    when it names the image's label; accuracy by (label, attribute) group, average, worst, gap; how often
    captions name any attribute value; and with `majority`, the signed conflict gap and how often captions of
    bias-conflicting images name their label's majority value (the bias speaking), beside the same rate on
    aligned images (where it is the truth). 95% bootstrap intervals on each."""
    labels, values = np.asarray(labels), np.asarray(values)
    names = sorted(set(values.tolist()))
    right = np.array([_names(y, c) for y, c in zip(labels, captions, strict=True)])
    predictions = np.where(right, labels, "")  # group_accuracy compares labels with predictions
    any_value = np.array([any(_names(v, c) for v in names) for c in captions])
    aligned = said_majority = None
    if majority is not None:
        aligned = aligned_rows(labels, values, majority)
        said_majority = np.array([_names(majority[y], c) for y, c in zip(labels, captions, strict=True)])

    def statistic(idx: np.ndarray) -> dict[str, float]:
        groups = group_accuracy(labels[idx], predictions[idx], values[idx])
        out = {k: groups[k] for k in ("accuracy", "average_group_accuracy", "worst_group_accuracy", "gap")}
        out.update({f"group/{g}": a for g, a in groups["per_group"].items()})
        out["attribute_named"] = float(any_value[idx].mean())
        if aligned is not None:
            a = aligned[idx]
            if a.any() and (~a).any():
                out["conflict_gap"] = float(right[idx][a].mean() - right[idx][~a].mean())
                out["majority_named_on_conflicting"] = float(said_majority[idx][~a].mean())
                out["majority_named_on_aligned"] = float(said_majority[idx][a].mean())
        return out

    intervals = bootstrap(statistic, len(labels), samples, seed)
    groups = group_accuracy(labels, predictions, values)
    return {
        "metrics": {k: v for k, v in intervals.items() if not k.startswith("group/")},
        "worst_group": groups["worst_group"],
        "per_group": {g: intervals[f"group/{g}"] for g in groups["per_group"]},
        "examples": [
            {"label": str(y), "value": str(v), "caption": c}
            for y, v, c in list(zip(labels, values, captions, strict=True))[:20]
        ],
    }


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
    mitigation: Mitigation | None = None,
    majority: dict[str, str] | None = None,
) -> dict:
    """The audit (see the module docstring) as a JSON-able dict; with `mitigation`, the same audit after each
    post-hoc method too, on the same images, seeds and bootstrap draws. `majority` (label -> the attribute value
    it co-occurs with in training, as `vlmkit data synth --bias` records it) adds the signed `conflict_gap`:
    accuracy on bias-aligned images minus accuracy on bias-conflicting ones."""
    if not hasattr(model, "encode_text") or not hasattr(model, "encode_image"):
        raise ConfigError(
            "vlmkit audit measures dual encoders (CLIP, SigLIP, FLIP); this model has no encode_text"
        )
    mitigation = mitigation or Mitigation()
    unknown = [m for m in mitigation.names if m not in MITIGATIONS]
    if unknown:
        raise ConfigError(f"unknown mitigation {unknown[0]!r}; choose from {', '.join(MITIGATIONS)}")
    fitted = [m for m in mitigation.names if m in ("sfid", "projection-images")]
    if fitted and not mitigation.fit_data:
        raise ConfigError(
            f"{fitted[0]} learns where the attribute lies from labelled images: pass --fit-data (a manifest "
            "other than --data, with the label and the attribute)"
        )
    rows, bad = read_audit_rows(data, attribute, label_key)
    transform = ImageTransform(preprocess)

    def embed_images(paths):
        return extract_image_features(model, paths, transform, batch_size, device, bf16)

    images = embed_images([r.image for r in rows])
    rows = [rows[i] for i in images.kept]
    labels = np.array([r.fields[label_key] for r in rows])
    values = np.array([r.fields[attribute] for r in rows])
    classes = sorted(set(labels.tolist()))
    value_names = sorted(set(values.tolist()))
    if len(value_names) < 2:
        raise DataError(
            f"{data}: every usable row has the same {attribute!r}; an audit needs two values or more"
        )
    check_k(k, len(rows))
    aligned = aligned_rows(labels, values, majority) if majority is not None else None
    templates = list(templates or DEFAULT_TEMPLATES)
    queries = list(queries or [t.replace("{}", c) for c in classes for t in templates])

    def text(texts: list[str]) -> np.ndarray:
        return _unit(extract_text_features(model, tokenizer, texts, device=device, bf16=bf16))

    classifier = build_zeroshot_classifier(model, tokenizer, classes, templates, device=device, bf16=bf16)
    captions = (
        text([r.caption for r in rows]) if all(r.caption for r in rows) else None
    )  # none: no text leakage
    before = Embedded(_unit(images.features), _unit(classifier.T), text(queries), captions)
    result = {
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
            "majority": majority,
        },
        "counts": {
            "images": len(rows),
            "skipped_images": len(images.skipped),
            "bad_rows": len(bad),
            "groups": {
                group_key(c, v): int(((labels == c) & (values == v)).sum())
                for c in classes
                for v in value_names
                if ((labels == c) & (values == v)).any()
            },
        },
        **measure(before, labels, values, classes, queries, k, samples, seed, aligned),
    }
    if mitigation.names:

        @functools.cache
        def fit_split():  # embedded once, for whichever methods need it
            return _fit_split(mitigation, attribute, label_key, embed_images)

        result["settings"]["mitigation"] = asdict(mitigation)
        result["mitigations"] = {}
        for name in mitigation.names:
            after = _mitigate(name, before, mitigation, text, fit_split, classes, value_names, seed)
            measured = measure(after, labels, values, classes, queries, k, samples, seed, aligned)
            result["mitigations"][name] = {**measured, **_compare(result["metrics"], measured["metrics"])}
    return result


def _fit_split(m: Mitigation, attribute: str, label_key: str, embed_images) -> tuple[np.ndarray, list, list]:
    """The fit split's unit image embeddings, labels and attribute values (rows lacking either are skipped)."""
    fit_rows, _ = read_manifest(m.fit_data, columns=(attribute, label_key))
    if not fit_rows:
        raise DataError(f"{m.fit_data}: no row has an image, a caption, {label_key!r} and {attribute!r}")
    fit = embed_images([r.image for r in fit_rows])
    kept = [fit_rows[i] for i in fit.kept]
    return _unit(fit.features), [r.fields[label_key] for r in kept], [r.fields[attribute] for r in kept]


def _mitigate(name, e: Embedded, m: Mitigation, text, fit_split, classes, value_names, seed) -> Embedded:
    """`e` after the mitigation `name`; `text` embeds prompts, `fit_split()` gives the fit split's embeddings."""
    pairs = [
        (m.pair_template.format(label=c, value=a), m.pair_template.format(label=c, value=b))
        for c in classes
        for i, a in enumerate(value_names)
        for b in value_names[i + 1 :]
    ]
    if name in ("projection", "projection-images"):
        if (
            name == "projection"
        ):  # Chuang et al.: the directions of prompts naming the attribute; text side only
            spurious = text([m.attribute_template.format(value=v) for v in value_names])
            pair_f = text([t for pair in pairs for t in pair]).reshape(len(pairs), 2, -1)
            P = calibrated_projection(spurious, pair_f, m.lam)
        else:  # the directions measured on labelled images of the fit split, projected out of both sides
            spurious = attribute_directions(*fit_split())
            if not len(spurious):
                raise DataError(f"{m.fit_data}: no label has two attribute values with 2 images each")
            P = calibrated_projection(spurious, np.zeros((0, 2, spurious.shape[1])), 0.0)
        return Embedded(
            e.image if name == "projection" else project(e.image, P),
            project(e.classes, P),
            project(e.queries, P),
            project(e.captions, P) if e.captions is not None else None,
        )
    # sfid: a forest on images of another split finds the image dimensions, one on attribute prompts the text ones
    fit, _, fit_values = fit_split()
    dims = m.sfid_dims or max(1, e.image.shape[1] // 8)
    image_sfid = SFID.fit(fit, fit_values, dims, m.sfid_low_fraction, seed)
    prompts = [m.pair_template.format(label=c, value=v) for c in classes for v in value_names]
    prompts += [m.attribute_template.format(value=v) for v in value_names]
    prompt_values = [v for _ in classes for v in value_names] + list(value_names)
    text_sfid = SFID.fit(text(prompts), prompt_values, dims, m.sfid_low_fraction, seed)
    return Embedded(
        image_sfid.apply(e.image),
        text_sfid.apply(e.classes),
        text_sfid.apply(e.queries),
        text_sfid.apply(e.captions) if e.captions is not None else None,
    )


def _compare(before: dict, after: dict) -> dict:
    """Each number's change; which bias measures got worse (their interval moved wholly above the old value)
    and the cost in average accuracy."""
    change = {key: after[key]["value"] - before[key]["value"] for key in before}
    worse = [
        key
        for key in before
        if (key in BIAS_MEASURES or key.startswith(("max_skew", "ndkl")))
        and after[key]["low"] > before[key]["value"]
    ]
    return {
        "change": change,
        "worse": worse,
        "accuracy_cost": before["average_group_accuracy"]["value"] - after["average_group_accuracy"]["value"],
    }


__all__ = [
    "DEFAULT_TEMPLATES",
    "audit_captions",
    "read_audit_rows",
    "MITIGATIONS",
    "Mitigation",
    "audit_dual_encoder",
    "measure",
    "weights_sha256",
]
