"""Prompts for zero-shot classification, measured: each template alone, the ensemble, a forward-selected subset,
and class descriptions (CuPL-style).

- A class's embedding under a set of texts is the mean of the texts' unit-norm embeddings, renormalised (CLIP's
  prompt ensemble).
- Forward selection (CLIP's procedure for its 7 ImageNet templates): on a selection split, start from no
  template and add, one at a time, the template whose addition gives the ensemble the highest accuracy (ties:
  the earlier template); the chosen set is the prefix of that path with the highest selection accuracy (the
  shortest on ties). It is then scored on the test data, which it never saw.
- Descriptions: a JSON object {class name: [sentences]} written by the user or another model ("a red circle is
  a round shape filled with red"), averaged like templates; alone and together with the templates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkit.errors import DataError
from vlmkit.eval.features import extract_text_features


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device="cpu",
                     bf16: bool = False) -> Tensor:  # fmt: skip
    """Unit-norm text embeddings of every template for every class: (K templates, C classes, D)."""
    texts = [t.replace("{}", c) for t in templates for c in classnames]  # template-major
    emb = extract_text_features(model, tokenizer, texts, device=device, bf16=bf16)  # (K*C, D), unit norm
    return emb.view(len(templates), len(classnames), -1)


def ensemble(embeddings: Tensor) -> Tensor:
    """(K, C, D) unit-norm embeddings -> (C, D): the mean over K, renormalised."""
    return F.normalize(embeddings.float().mean(0), dim=-1)


def accuracy(image_features: Tensor, labels: Tensor, classes: Tensor) -> float:
    """Top-1 accuracy of images (N, D) against class embeddings (C, D)."""
    logits = F.normalize(image_features.float(), dim=-1) @ classes.float().T  # (N, C)
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())


def forward_selection(image_features: Tensor, labels: Tensor, embeddings: Tensor) -> dict:
    """Greedy forward selection of templates on a selection split (see the module docstring).

    Returns {"order": template indices in the order added, "curve": selection accuracy after each addition,
    "chosen": the best prefix of `order`}."""
    K = embeddings.shape[0]
    order, curve, total = [], [], torch.zeros_like(embeddings[0], dtype=torch.float32)
    remaining = list(range(K))
    while remaining:
        scores = [accuracy(image_features, labels, F.normalize(total + embeddings[k].float(), dim=-1))
                  for k in remaining]  # fmt: skip
        best = max(range(len(remaining)), key=lambda i: (scores[i], -remaining[i]))
        k = remaining.pop(best)
        order.append(k)
        curve.append(scores[best])
        total = total + embeddings[k].float()
    top = max(range(K), key=lambda i: (curve[i], -i))
    return {"order": order, "curve": curve, "chosen": order[: top + 1]}


def read_descriptions(path: str | Path, classnames: Sequence[str]) -> dict[str, list[str]]:
    """{class name: [sentences]} from a JSON file; every class must have at least one sentence and every key must be
    a class (a mismatch is one error naming the classes, never a silent partial set)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: descriptions file not found (a JSON object {{class name: [sentences]}})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{class name: [sentences]}}")
    missing = [c for c in classnames if not data.get(c)]
    unknown = [k for k in data if k not in classnames]
    if missing or unknown:
        raise DataError(
            f"{path}: "
            + "; ".join(
                part
                for part in (
                    f"no sentences for {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"keys that are not classes: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                    if unknown
                    else "",
                )
                if part
            )
            + f" (the classes: {list(classnames)[:5]}{' ...' if len(classnames) > 5 else ''})"
        )
    for c in classnames:
        sentences = data[c]
        if isinstance(sentences, str):
            sentences = [sentences]
        if not all(isinstance(x, str) and x.strip() for x in sentences):
            raise DataError(f"{path}: class {c!r}: sentences must be non-empty strings")
        data[c] = list(sentences)
    return {c: data[c] for c in classnames}


def description_embeddings(
    model, tokenizer, descriptions: dict[str, list[str]], device="cpu", bf16=False
) -> Tensor:
    """(C, D): each class's sentences embedded, averaged, renormalised (the classes in the dict's order)."""
    texts = [s for sentences in descriptions.values() for s in sentences]
    emb = extract_text_features(model, tokenizer, texts, device=device, bf16=bf16)  # (S, D)
    out, start = [], 0
    for sentences in descriptions.values():
        out.append(emb[start : start + len(sentences)].mean(0))
        start += len(sentences)
    return F.normalize(torch.stack(out), dim=-1)


def _features(model, preprocess, folder, batch_size, device, bf16, classes_file=None):
    from vlmkit.data.manifest import read_image_folder
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.eval.features import encode_labelled_images

    paths, labels, classnames = read_image_folder(folder, classes_file=classes_file)
    data = encode_labelled_images(
        model, paths, labels, classnames, ImageTransform(preprocess, train=False), batch_size, device, bf16
    )
    return data.features, data.labels, classnames


def evaluate_templates(
    model,
    tokenizer,
    preprocess,
    data: str | Path,
    templates: Sequence[str],
    *,
    select_data: str | Path | None = None,
    descriptions: str | Path | None = None,
    classes_file: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    model_name: str | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Zero-shot accuracy on the ImageFolder `data` of every template alone and of the ensemble; with `select_data`
    (another ImageFolder with the same classes), the forward-selected subset; with `descriptions`, the class
    descriptions alone and with the templates. With `out_dir`: templates.json, templates.png, report.html."""
    templates = list(dict.fromkeys(templates))
    feats, labels, classnames = _features(model, preprocess, data, batch_size, device, bf16, classes_file)
    emb = class_embeddings(model, tokenizer, classnames, templates, device, bf16)  # (K, C, D)
    per_template = [accuracy(feats, labels, emb[k]) for k in range(len(templates))]
    rows = [
        {
            "prompts": f"all {len(templates)} templates (ensemble)",
            "accuracy": accuracy(feats, labels, ensemble(emb)),
        }
    ]
    metrics: dict = {
        "num_images": len(labels),
        "num_classes": len(classnames),
        "num_templates": len(templates),
    }
    ranked = sorted(range(len(templates)), key=lambda k: -per_template[k])
    metrics["per_template"] = [{"template": templates[k], "accuracy": per_template[k]} for k in ranked]
    rows.append(
        {"prompts": f"best single template: {templates[ranked[0]]!r}", "accuracy": per_template[ranked[0]]}
    )
    rows.append(
        {"prompts": f"worst single template: {templates[ranked[-1]]!r}", "accuracy": per_template[ranked[-1]]}
    )
    if select_data is not None:
        sel_feats, sel_labels, sel_names = _features(
            model, preprocess, select_data, batch_size, device, bf16, classes_file
        )
        if sel_names != classnames:
            raise DataError(
                f"{select_data} and {data} name different classes: selection needs the same classes"
            )
        path = forward_selection(sel_feats, sel_labels, emb)
        chosen = path["chosen"]
        metrics["selection"] = {"data": str(select_data), "order": [templates[k] for k in path["order"]],
                                "curve": path["curve"], "chosen": [templates[k] for k in chosen]}  # fmt: skip
        rows.append({"prompts": f"forward-selected on {Path(select_data).name}: {len(chosen)} templates",
                     "accuracy": accuracy(feats, labels, ensemble(emb[chosen]))})  # fmt: skip
    if descriptions is not None:
        desc = read_descriptions(descriptions, classnames)
        d = description_embeddings(model, tokenizer, desc, device, bf16)  # (C, D)
        rows.append({"prompts": "class descriptions", "accuracy": accuracy(feats, labels, d)})
        n = sum(len(v) for v in desc.values()) / len(desc)
        both = F.normalize(emb.float().sum(0) + d * n, dim=-1)  # every sentence of a class weighs the same
        rows.append({"prompts": "templates + descriptions", "accuracy": accuracy(feats, labels, both)})
    metrics["rows"] = rows
    results = {"task": "templates", "model": model_name, "dataset": str(data), "metrics": metrics}
    if out_dir is not None:
        write_templates_report(out_dir, results)
    return results


def write_templates_report(out_dir: str | Path, results: dict) -> Path:
    """templates.json, templates.png (each template's accuracy, the ensemble's as a line) and report.html."""
    import html

    from vlmkit.eval.report import _table, new_figure, save_figure, write_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "templates.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    m = results["metrics"]
    per = m["per_template"]
    fig = new_figure(max(6.0, 0.12 * len(per) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(per)), [p["accuracy"] for p in per], color="#4a7ab5")
    ax.axhline(m["rows"][0]["accuracy"], color="k", linestyle="--", linewidth=1, label="ensemble of all")
    if len(per) <= 30:
        ax.set_xticks(range(len(per)), [p["template"] for p in per], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel("templates, best first")
    ax.set_ylabel("zero-shot accuracy")
    ax.legend(fontsize=7)
    png = save_figure(fig, out / "templates.png")
    sections = [
        f"<p>{m['num_images']} images, {m['num_classes']} classes, {m['num_templates']} templates.</p>",
        _table(["prompts", "accuracy"], [[r["prompts"], f"{r['accuracy']:.3f}"] for r in m["rows"]]),
        f'<h2>Each template alone</h2><img src="{png.name}" alt="per-template accuracy">',
        _table(["template", "accuracy"], [[p["template"], f"{p['accuracy']:.3f}"] for p in per]),
    ]
    if "selection" in m:
        s = m["selection"]
        sections.insert(2, "<h2>Forward selection</h2><p>Chosen on " + html.escape(s["data"]) + ": "
                        + html.escape("; ".join(s["chosen"])) + "</p>")  # fmt: skip
    return write_page(out / "report.html", f"Prompt templates: {results['model'] or ''}", sections)


__all__ = [
    "accuracy",
    "class_embeddings",
    "description_embeddings",
    "ensemble",
    "evaluate_templates",
    "forward_selection",
    "read_descriptions",
]
