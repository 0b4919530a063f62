"""Saliency proven on known boxes: `vlmkit eval saliency`.

The synthetic scenes (`vlmkit data synth`, the quickstart's data) list every object's box. For each object of a
scene of two or more objects whose colour and shape no other object shares, the model is asked for a map of
"a {colour} {shape}." and the map is scored:

- pointing: the map's maximum lies in the object's box or within the tolerance (15 px at 224, scaled);
- class-sensitive pointing: as pointing, and the maximum is nearer the asked object's box than every other
  object's (asked about A, the map must point at A, not at B);
- box IoU: the map thresholded at half its maximum against the box's pixels;
- deletion / insertion AUC of the image-text similarity (pixels removed to, or restored from, the image's mean
  colour, most salient first; on the first `deletion_limit` queries).

Controls in the same table: the centre point (its map falls off from the centre), a random point (the share of
pixels that would score) and a uniform map (its maximum anywhere, its threshold keeps everything, its order of
deletion random); and each method on a randomly initialised copy of the model, which must fall to the controls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlmkit.data.manifest import read_jsonl
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.saliency import (
    CAPTUM_METHODS,
    METHODS,
    _distance_to_box,
    box_iou,
    captum_available,
    deletion_insertion,
    distance_grid,
    explain_dual_encoder,
    pointing_hit,
    to_image_size,
    tolerance_for,
)

NUM_EXAMPLES = 6


def query_text(obj: dict) -> str:
    """The text a map is asked for: "a red circle.", "an orange star." (as the scenes' captions name objects)."""
    article = "an" if obj["colour"][0] in "aeiou" else "a"
    return f"{article} {obj['colour']} {obj['shape']}."


def read_scenes(path: str | Path) -> list[dict]:
    """Rows of a scene manifest (JSONL: "image" relative to the file, "objects" with "colour", "shape", "box"),
    image paths resolved; a row without them is an error naming its line."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: saliency is scored on a JSONL scene manifest with object boxes")
    rows = []
    for line_no, row in read_jsonl(path, "a scene manifest such as data/shapes/val.jsonl"):
        objects = row.get("objects")
        ok = isinstance(objects, list) and objects and isinstance(row.get("image"), str)
        if ok:
            ok = all(isinstance(o, dict) and {"colour", "shape", "box"} <= o.keys() for o in objects)
        if not ok:
            raise DataError(
                f"{path}:{line_no}: a row needs 'image' and 'objects' with 'colour', 'shape' and 'box' "
                "(write scenes with `vlmkit data synth`)"
            )
        rows.append({"image": path.parent / row["image"], "objects": objects, "line": line_no})
    return rows


def _question(obj: dict, objects: list[dict]) -> tuple[str, str] | tuple[None, None]:
    """A question about `obj` a generative model answers, as the VQA tasks ask it: its colour when its shape is the
    scene's alone, else its shape when its colour is; (None, None) when neither is."""
    if sum(o["shape"] == obj["shape"] for o in objects) == 1:
        return f"what colour is the {obj['shape']}?", obj["colour"]
    if sum(o["colour"] == obj["colour"] for o in objects) == 1:
        return f"what shape is the {obj['colour']} object?", obj["shape"]
    return None, None


def queries(scenes: list[dict], limit: int | None = None, usable=None) -> list[dict]:
    """One query per object of a scene of 2+ objects whose colour and shape are the scene's alone:
    {"image", "name" (its class, "red circle"), "text", "question", "answer", "box", "others", "objects", "group",
    "line"}; only those `usable`
    accepts (default: all), the first `limit` per group of 2 and 3+ objects."""
    out, per_group = [], {}
    for scene in scenes:
        objects = scene["objects"]
        if len(objects) < 2:
            continue
        kinds = [(o["colour"], o["shape"]) for o in objects]
        group = "2" if len(objects) == 2 else "3+"
        for i, obj in enumerate(objects):
            if kinds.count(kinds[i]) > 1:
                continue
            if limit is not None and per_group.get(group, 0) >= limit:
                break
            others = [o["box"] for j, o in enumerate(objects) if j != i]
            question, answer = _question(obj, objects)
            q = {"image": scene["image"], "name": f"{obj['colour']} {obj['shape']}", "text": query_text(obj),
                 "question": question, "answer": answer,
                 "box": obj["box"], "others": others, "objects": len(objects), "group": group,
                 "line": scene["line"]}  # fmt: skip
            if usable is not None and not usable(q):
                continue
            per_group[group] = per_group.get(group, 0) + 1
            out.append(q)
    return out


def class_sensitive_hit(saliency, box, others: Sequence, tolerance: float | None = None) -> bool:
    """Whether the map's (H, W) maximum is within `tolerance` of `box` and strictly nearer it than every box in
    `others` (the other objects of the scene)."""
    s = np.asarray(saliency)
    y, x = np.unravel_index(int(s.argmax()), s.shape)
    tol = tolerance_for(max(s.shape)) if tolerance is None else tolerance
    d = _distance_to_box(x, y, box)
    return d <= tol and all(d < _distance_to_box(x, y, o) for o in others)


def _hit_share(box, others, size: tuple[int, int], tol: float) -> tuple[float, float]:
    """The share of pixels that would be a pointing hit and a class-sensitive hit: a random point's score."""
    d = distance_grid(box, size)
    hit = d <= tol
    sensitive = hit.copy()
    for o in others:
        sensitive &= d < distance_grid(o, size)
    return float(hit.mean()), float(sensitive.mean())


def centre_map(h: int, w: int) -> np.ndarray:
    """A map falling off linearly from the image centre: the centre control's map."""
    ys, xs = np.mgrid[0:h, 0:w]
    d = np.hypot(xs - (w - 1) / 2, ys - (h - 1) / 2)
    return 1.0 - d / d.max()


class DualEncoderMaps:
    """What `evaluate_saliency` asks of a model, for a dual encoder (CLIP, SigLIP): the maps of a batch of
    queries, the model's input, the score deletion and insertion follow (the image-text cosine), a random copy."""

    def __init__(self, clip, tokenizer, preprocess, device: str | torch.device = "cpu"):
        from vlmkit.data.transforms import ImageTransform

        self.clip, self.tokenizer, self.preprocess, self.device = (
            clip.eval().to(device),
            tokenizer,
            preprocess,
            device,
        )
        self.transform = ImageTransform(preprocess, train=False)

    def methods(self, requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
        """The methods to score, and those left out of the default list with the reason (printed and reported)."""
        if not requested:
            pooled_cls = self.clip.cfg.vision.pool == "cls"
            chosen = [m for m in METHODS if pooled_cls or m not in ("rollout", "relevance")]
            skipped = {}
            if not pooled_cls:
                skipped.update(
                    {m: "needs a class-token-pooled image tower" for m in ("rollout", "relevance")}
                )
            if not captum_available():
                chosen = [m for m in chosen if m not in CAPTUM_METHODS]
                skipped.update(
                    {m: "captum is not installed: pip install 'vlmkit[explain]'" for m in CAPTUM_METHODS}
                )
            return chosen, skipped
        for m in requested:
            if m not in METHODS:
                raise ConfigError(f"unknown saliency method {m!r}; dual encoders have {', '.join(METHODS)}")
        return list(requested), {}

    def usable(self, query: dict) -> bool:
        return True

    def label(self, query: dict) -> str:
        """How the report names a query."""
        return query["text"]

    def pixels(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, S, S)

    def _text(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.clip.encode_text(self.tokenizer(texts).to(self.device))  # (B, D)

    def maps(self, chunk: list[dict], pixels: torch.Tensor, method: str) -> torch.Tensor:
        return explain_dual_encoder(self.clip, pixels, self._text([q["text"] for q in chunk]), method).cpu()

    def scorer(self, query: dict):
        text = torch.nn.functional.normalize(self._text([query["text"]]).float(), dim=-1)[0]

        def score(pixels: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.clip.encode_image(pixels).float(), dim=-1) @ text

        return score

    def random_init(self, seed: int) -> DualEncoderMaps:
        from vlmkit.models.registry import build_model

        torch.manual_seed(seed)
        return DualEncoderMaps(build_model(self.clip.cfg), self.tokenizer, self.preprocess, self.device)


def _empty_scores() -> dict[str, list]:
    return {"pointing": [], "sensitive": [], "iou": [], "deletion": [], "insertion": []}


def _mean_colour(pixels: torch.Tensor) -> torch.Tensor:
    """An image (3, H, W) filled with its own mean colour: what deletion removes pixels to."""
    return pixels.mean(dim=(1, 2), keepdim=True).expand_as(pixels)


def _score_model(provider, qs, methods, deletion_limit, batch_size, desc) -> dict:
    """Per method: per-query pointing / class-sensitive hits and IoU, deletion/insertion on the first queries."""
    from vlmkit.data.transforms import load_image

    out = {m: _empty_scores() for m in methods}
    examples = {m: [] for m in methods}
    bar = tqdm(total=len(methods) * len(qs), desc=desc, unit="query", leave=False)
    for start in range(0, len(qs), batch_size):
        chunk = qs[start : start + batch_size]
        images = [load_image(q["image"]) for q in chunk]
        pixels = provider.pixels(images)  # (B, 3, S, S)
        S = pixels.shape[-1]
        for m in methods:
            maps = provider.maps(chunk, pixels, m)  # (B, g, g)
            for k, (q, im) in enumerate(zip(chunk, images)):
                full = to_image_size(maps[k : k + 1], im.size)[0].numpy()  # (H, W) in the image's pixels
                tol = tolerance_for(max(im.size))
                out[m]["pointing"].append(pointing_hit(full, q["box"], tol))
                out[m]["sensitive"].append(class_sensitive_hit(full, q["box"], q["others"], tol))
                out[m]["iou"].append(box_iou(full, q["box"]))
                if start + k < deletion_limit:
                    model_map = to_image_size(maps[k : k + 1], (S, S))[0]  # at the model's input
                    base = _mean_colour(pixels[k])
                    with torch.no_grad():
                        di = deletion_insertion(
                            provider.scorer(q), pixels[k], model_map.to(pixels.device), base
                        )
                    out[m]["deletion"].append(di["deletion_auc"])
                    out[m]["insertion"].append(di["insertion_auc"])
                if q["group"] == "2" and len(examples[m]) < NUM_EXAMPLES:
                    examples[m].append(full)
            bar.update(len(chunk))
    bar.close()
    return {"scores": out, "examples": examples}


def _baselines(provider, qs, deletion_limit, seed) -> dict:
    """The controls' per-query scores: centre point/map, random point, uniform map."""
    from vlmkit.data.transforms import load_image

    gen = torch.Generator().manual_seed(seed)
    rows = {name: _empty_scores() for name in ("centre point", "random point", "uniform map")}
    with torch.no_grad():
        for i, q in enumerate(qs):
            image = load_image(q["image"])
            w, h = image.size
            tol = tolerance_for(max(w, h))
            cmap = centre_map(h, w)
            rows["centre point"]["pointing"].append(
                _distance_to_box((w - 1) / 2, (h - 1) / 2, q["box"]) <= tol
            )
            rows["centre point"]["sensitive"].append(class_sensitive_hit(cmap, q["box"], q["others"], tol))
            rows["centre point"]["iou"].append(box_iou(cmap, q["box"]))
            hit, sensitive = _hit_share(q["box"], q["others"], (w, h), tol)
            for name in ("random point", "uniform map"):
                rows[name]["pointing"].append(hit)
                rows[name]["sensitive"].append(sensitive)
            rows["uniform map"]["iou"].append(box_iou(np.ones((h, w)), q["box"]))
            if i < deletion_limit:
                pixels = provider.pixels([image])[0]
                S = pixels.shape[-1]
                base = _mean_colour(pixels)
                score = provider.scorer(q)
                for name, m in (
                    ("centre point", torch.from_numpy(centre_map(S, S)).float()),
                    ("uniform map", torch.rand(S, S, generator=gen)),  # ties broken at random
                ):
                    di = deletion_insertion(score, pixels, m.to(pixels.device), base)
                    rows[name]["deletion"].append(di["deletion_auc"])
                    rows[name]["insertion"].append(di["insertion_auc"])
    return rows


def _summary(scores: dict, groups: list[str]) -> dict:
    def mean(xs) -> float | None:
        return float(np.mean(xs)) if len(xs) else None

    row = {
        "pointing": mean(scores["pointing"]),
        "iou": mean(scores["iou"]),
        "deletion_auc": mean(scores["deletion"]),
        "insertion_auc": mean(scores["insertion"]),
    }
    for g in ("2", "3+"):
        vals = [s for s, gg in zip(scores["sensitive"], groups) if gg == g]
        row[f"class_sensitive_{g}"] = mean(vals)
        hits = [s for s, gg in zip(scores["pointing"], groups) if gg == g]
        row[f"pointing_{g}"] = mean(hits)
    return row


def evaluate_saliency(
    provider,
    scenes: str | Path,
    methods: Sequence[str] | None = None,
    *,
    limit: int | None = 300,
    deletion_limit: int = 60,
    random_init: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    model_name: str | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Score each saliency method of a model on a scene manifest's boxes (see the module docstring).

    `provider`: the model behind the methods' interface, `DualEncoderMaps(clip, tokenizer, preprocess)` or, for
    LLaVA / CoCa, `vlmkit.inference.explain.GenerativeMaps(pipeline)`. `limit`: queries per group (scenes of 2 and
    of 3+ objects); `deletion_limit`: queries whose deletion and insertion curves are computed (each costs 2 x 17
    forward passes). `random_init`: also score a randomly initialised model of the same config (seeded by
    `seed`). Returns {"metrics": {"rows": [...]}, ...}; with `out_dir`, writes saliency.json, examples.png and
    report.html there.
    """
    methods, skipped = provider.methods(methods)
    for m, why in skipped.items():
        print(f"{m}: not scored ({why})")
    qs = queries(read_scenes(scenes), limit, provider.usable)
    if not qs:
        raise DataError(
            f"{scenes}: no scene of two or more objects with an object of its own colour and shape"
        )
    groups = [q["group"] for q in qs]
    models = [("trained", provider)]
    if random_init:
        models.append(("random init", provider.random_init(seed)))
    rows, examples = [], {}
    for label, model in models:
        scored = _score_model(model, qs, methods, deletion_limit, batch_size, label)
        for m in methods:
            rows.append({"method": m, "model": label, **_summary(scored["scores"][m], groups)})
        if label == "trained":
            examples = scored["examples"]
    for name, scores in _baselines(provider, qs, deletion_limit, seed).items():
        rows.append({"method": name, "model": "control", **_summary(scores, groups)})
    trained = [r for r in rows if r["model"] == "trained" and r["class_sensitive_2"] is not None]
    best = max(trained, key=lambda r: r["class_sensitive_2"]) if trained else None
    centre = next(r for r in rows if r["method"] == "centre point")
    metrics = {
        "rows": rows,
        "num_queries": {g: groups.count(g) for g in ("2", "3+")},
        "skipped_methods": skipped,
        "best_method": best["method"] if best else None,
        "best_class_sensitive_2": best["class_sensitive_2"] if best else None,
        "best_above_centre": (
            best["class_sensitive_2"] - centre["class_sensitive_2"]
            if best and centre["class_sensitive_2"] is not None
            else None
        ),
    }
    results = {"task": "saliency", "model": model_name, "dataset": str(scenes), "metrics": metrics}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "saliency.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        shown = [{**q, "label": provider.label(q)} for q in qs if q["group"] == "2"][:NUM_EXAMPLES]
        write_saliency_report(out, results, shown, examples)
    return results


def _fmt_row(r: dict) -> list:
    def f(v):
        return "&ndash;" if v is None else f"{v:.3f}"

    keys = ("class_sensitive_2", "class_sensitive_3+", "pointing", "iou", "deletion_auc", "insertion_auc")
    return [r["method"], r["model"], *[f(r[k]) for k in keys]]


def write_saliency_report(out: Path, results: dict, shown: list[dict], examples: dict) -> Path:
    """report.html: the table of every method and control, and example maps on two-object scenes."""
    import html

    from vlmkit.data.transforms import load_image
    from vlmkit.eval.report import new_figure, save_figure, write_page

    m = results["metrics"]
    header = ["method", "model", "class-sensitive, 2 objects", "class-sensitive, 3+", "pointing", "box IoU",
              "deletion AUC (lower better)", "insertion AUC"]  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in _fmt_row(r)) + "</tr>" for r in m["rows"])
    best = ""
    if m["best_method"] is not None:
        best = (
            f" Best method on two-object scenes: <b>{html.escape(m['best_method'])}</b> "
            f"({m['best_class_sensitive_2']:.3f}, {m['best_above_centre']:+.3f} against the centre point)."
        )
    sections = [
        f"<p>{m['num_queries']['2']} queries on two-object scenes, {m['num_queries']['3+']} on scenes of three "
        f"or more.{best} Class-sensitive: the maximum within the tolerance of the asked object's box and nearer "
        "it than any other object's.</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    if m.get("skipped_methods"):
        sections.append(
            "<p>Not scored: "
            + "; ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in m["skipped_methods"].items())
            + ".</p>"
        )
    if shown and examples:
        methods = list(examples)
        fig = new_figure(1.6 * (len(methods) + 1), 1.7 * len(shown))
        for i, q in enumerate(shown):
            image = load_image(q["image"])
            for j in range(len(methods) + 1):
                ax = fig.add_subplot(len(shown), len(methods) + 1, i * (len(methods) + 1) + j + 1)
                ax.imshow(image)
                if j:
                    ax.imshow(examples[methods[j - 1]][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
                x0, y0, x1, y1 = q["box"]
                ax.add_patch(_rect(x0, y0, x1, y1))
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(methods[j - 1] if j else "image", fontsize=8)
                if j == 0:
                    ax.set_ylabel(q["label"], fontsize=7)
        png = save_figure(fig, out / "examples.png")
        sections.append(
            "<h2>Examples</h2><p>Asked about the object in the white box.</p>"
            f'<img src="{png.name}" alt="saliency examples">'
        )
    return write_page(out / "report.html", f"Saliency on known boxes: {results['model']}", sections)


def _rect(x0, y0, x1, y1):
    from matplotlib.patches import Rectangle

    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2)


__all__ = [
    "DualEncoderMaps",
    "class_sensitive_hit",
    "evaluate_saliency",
    "queries",
    "query_text",
    "read_scenes",
]
