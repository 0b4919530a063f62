"""A neuron atlas of a dual encoder's image tower: what each unit of a layer answers to, in images and in words.

Units: the MLP neurons of a block (the hidden activations after the nonlinearity) or its residual directions (the
channels of the block's output). A unit's activation on an image is its value averaged over the patch tokens
(`reduce="mean"`), at the class token (`"cls"`) or its maximum over tokens (`"max"`).

- Top images: the images that activate the unit most.
- Best-aligned words: the unit's direction in the joint embedding space, the covariance of its activation with the
  images' (unit-norm) embeddings, v = mean_i (a_i - mean(a)) e_i, compared by cosine with the text tower's
  embedding of each word of the data's captions. A unit whose best word names what it prefers in images answers
  to the concept in images and in text alike: a multimodal neuron.
- Selectivity, on images of one object whose metadata names its colour, shape, size and position: for each
  attribute, the correlation ratio eta^2 = (variance of the per-value mean activations, weighted by the count of
  each value) / (variance of the activation), the share of the unit's variance the attribute explains (0 to 1). A
  unit is selective for the attribute with the largest eta^2 when that eta^2 >= `threshold` (0.5); its preferred
  value is the one with the highest mean activation. The same count with the attribute labels shuffled among the
  images is the chance level, reported beside it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from vlmkit.data.manifest import read_jsonl
from vlmkit.errors import ConfigError, DataError

ATTRIBUTES = ("colour", "shape", "size", "position")
STOPWORDS = frozenset("a an the of and on in with is are there at to".split())


def read_atlas_data(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows {"image", "caption", "attributes"} of a JSONL manifest; "attributes" maps ATTRIBUTES to the values of
    a one-object scene's metadata (None for other rows). A malformed row is an error naming its line."""
    path = Path(path)
    rows = []
    for line_no, row in read_jsonl(path, "a JSONL manifest of image, caption and, for selectivity, objects"):
        if not isinstance(row.get("image"), str):
            raise DataError(f"{path}:{line_no}: a row needs an 'image' path")
        objects = row.get("objects")
        attributes = None
        if isinstance(objects, list) and len(objects) == 1 and isinstance(objects[0], dict):
            attributes = {a: objects[0].get(a) for a in ATTRIBUTES if objects[0].get(a) is not None}
        rows.append({"image": path.parent / row["image"], "caption": str(row.get("caption", "")),
                     "attributes": attributes, "line": line_no})  # fmt: skip
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def vocabulary(captions: list[str], min_count: int = 2) -> list[str]:
    """The captions' words seen at least `min_count` times, stop words left out, most frequent first."""
    counts = Counter(w for c in captions for w in re.findall(r"[a-z]+", c.lower()) if w not in STOPWORDS)
    return [w for w, n in counts.most_common() if n >= min_count]


@torch.no_grad()
def unit_activations(visual, images: Tensor, layer: int, units: str = "mlp", reduce: str = "mean") -> Tensor:
    """(B, 3, S, S) -> (B, U): each unit's activation (see the module docstring)."""
    blocks = visual.transformer.blocks
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer {layer} does not exist: the image tower has blocks 0..{len(blocks) - 1}")
    if units not in ("mlp", "residual"):
        raise ConfigError(f"units must be 'mlp' or 'residual', not {units!r}")
    if reduce not in ("mean", "cls", "max"):
        raise ConfigError(f"reduce must be 'mean', 'cls' or 'max', not {reduce!r}")
    if reduce == "cls" and visual.num_prefix_tokens == 0:
        raise ConfigError("this tower has no class token: use reduce 'mean' or 'max'")
    seen = []
    block = blocks[layer]
    if units == "mlp":
        handle = block.mlp.fc2.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = block.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        visual.forward_hidden(images, layer + 1)  # (B, T, U) recorded by the hook
    finally:
        handle.remove()
    acts = seen[0].float()  # (B, T, U)
    if reduce == "cls":
        return acts[:, 0]
    patches = acts[:, visual.num_prefix_tokens :]
    return patches.mean(1) if reduce == "mean" else patches.amax(1)


def correlation_ratio(values: np.ndarray, labels: list) -> float:
    """eta^2 of activations (N,) by categorical labels (N): between-group variance / total variance."""
    values = np.asarray(values, dtype=np.float64)
    total = values.var()
    if total <= 0:
        return 0.0
    groups = {}
    for v, lab in zip(values, labels):
        groups.setdefault(lab, []).append(v)
    mean = values.mean()
    between = sum(len(g) * (np.mean(g) - mean) ** 2 for g in groups.values()) / len(values)
    return float(between / total)


def selectivity(acts: np.ndarray, attributes: list[dict], threshold: float = 0.5) -> list[dict]:
    """Per unit of acts (N, U) over one-object images with `attributes`: eta^2 per attribute, the best attribute,
    whether it passes `threshold`, and the preferred value."""
    present = [a for a in ATTRIBUTES if all(a in row for row in attributes)]
    out = []
    for u in range(acts.shape[1]):
        col = acts[:, u]
        eta = {a: correlation_ratio(col, [row[a] for row in attributes]) for a in present}
        best = max(eta, key=eta.get) if eta else None
        preferred = None
        if best is not None:
            means = {}
            for v, row in zip(col, attributes):
                means.setdefault(row[best], []).append(v)
            preferred = max(means, key=lambda k: np.mean(means[k]))
        out.append({"eta2": eta, "attribute": best, "selective": bool(best and eta[best] >= threshold),
                    "preferred": preferred})  # fmt: skip
    return out


def build_atlas(
    clip,
    tokenizer,
    preprocess,
    data: str | Path,
    layer: int,
    *,
    units: str = "mlp",
    reduce: str = "mean",
    limit: int | None = 2000,
    threshold: float = 0.5,
    top_images: int = 8,
    top_words: int = 5,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    model_name: str | None = None,
    out_dir: str | Path | None = None,
    max_units_shown: int = 96,
) -> dict:
    """The atlas of one layer over a manifest's images (see the module docstring). Returns {"metrics": summary,
    "units": [...]}; with `out_dir`, writes atlas.json, the thumbnails and atlas.html."""
    from vlmkit.data.transforms import ImageTransform, load_image
    from vlmkit.eval.features import extract_text_features

    rows = read_atlas_data(data, limit)
    clip = clip.eval().to(device)
    visual = clip.visual
    transform = ImageTransform(preprocess, train=False)
    acts, embeds = [], []
    for start in tqdm(
        range(0, len(rows), batch_size), desc=f"layer {layer} units", unit="batch", leave=False
    ):
        images = torch.stack([transform(load_image(r["image"])) for r in rows[start : start + batch_size]])
        images = images.to(device)
        acts.append(unit_activations(visual, images, layer, units, reduce).cpu())
        with torch.no_grad():
            embeds.append(torch.nn.functional.normalize(clip.encode_image(images).float(), dim=-1).cpu())
    A, E = torch.cat(acts), torch.cat(embeds)  # (N, U), (N, D)
    words = vocabulary([r["caption"] for r in rows])
    if not words:
        raise DataError(
            f"{data}: the captions have no word seen twice: the atlas needs the data's vocabulary"
        )
    W = extract_text_features(clip, tokenizer, words, device=device)  # (M, D) unit norm
    directions = (
        (A - A.mean(0)).T @ E / len(rows)
    )  # (U, D): the embedding direction that moves with each unit
    cos = torch.nn.functional.normalize(directions, dim=-1) @ W.T  # (U, M)
    top_w = cos.topk(min(top_words, len(words)), dim=1)
    top_i = A.topk(min(top_images, len(rows)), dim=0).indices.T  # (U, k)

    one = [i for i, r in enumerate(rows) if r["attributes"]]
    sel = [None] * A.shape[1]
    summary: dict = {"num_images": len(rows), "num_one_object": len(one), "num_units": A.shape[1],
                     "layer": layer, "units": units, "reduce": reduce, "threshold": threshold}  # fmt: skip
    if len(one) >= 10:
        attrs = [rows[i]["attributes"] for i in one]
        acts_one = A[one].numpy()
        sel = selectivity(acts_one, attrs, threshold)
        rng = np.random.default_rng(seed)
        columns = {
            k: rng.permutation([a[k] for a in attrs]).tolist() for k in attrs[0]
        }  # each label shuffled
        shuffled = [{k: column[i] for k, column in columns.items()} for i in range(len(attrs))]
        chance = selectivity(acts_one, shuffled, threshold)
        value_words = {str(a[k]) for a in attrs for k in a}
        counts = Counter(s["attribute"] for s in sel if s["selective"])
        summary["selective"] = {a: counts.get(a, 0) for a in ATTRIBUTES}
        summary["selective_shuffled_labels"] = {
            a: sum(1 for s in chance if s["selective"] and s["attribute"] == a) for a in ATTRIBUTES
        }
        multimodal = 0
        for u, s in enumerate(sel):
            # the best-aligned word among the words that name attribute values (one-word values only)
            ranked = [words[j] for j in cos[u].argsort(descending=True).tolist() if words[j] in value_words]
            s["best_value_word"] = ranked[0] if ranked else None
            s["multimodal"] = bool(s["selective"] and ranked and ranked[0] == str(s["preferred"]))
            multimodal += s["multimodal"]
        summary["multimodal"] = multimodal
    else:
        summary["selective"] = None  # no metadata: top images and words only
    unit_rows = []
    for u in range(A.shape[1]):
        unit_rows.append({
            "unit": u,
            "top_images": top_i[u].tolist(),
            "top_activations": [float(A[i, u]) for i in top_i[u]],
            "words": [words[j] for j in top_w.indices[u].tolist()],
            "word_cosines": [float(c) for c in top_w.values[u]],
            "selectivity": sel[u],
        })  # fmt: skip
    result = {
        "task": "atlas",
        "model": model_name,
        "dataset": str(data),
        "metrics": summary,
        "units": unit_rows,
    }
    if out_dir is not None:
        write_atlas(out_dir, result, rows, max_units_shown)
    return result


def _order(result: dict) -> list[dict]:
    """Units by their strongest selectivity (eta^2), then by their best word's cosine."""

    def key(u: dict) -> tuple:
        s = u["selectivity"]
        return (
            max(s["eta2"].values()) if s and s["eta2"] else 0.0,
            u["word_cosines"][0] if u["word_cosines"] else 0,
        )

    return sorted(result["units"], key=key, reverse=True)


def write_atlas(out_dir: str | Path, result: dict, rows: list[dict], max_units: int = 96) -> Path:
    """atlas.json, thumbnails/ and atlas.html: a card per unit (the `max_units` most selective)."""
    import html

    from vlmkit.data.transforms import load_image
    from vlmkit.eval.report import _table, write_page

    out = Path(out_dir)
    (out / "thumbnails").mkdir(parents=True, exist_ok=True)
    (out / "atlas.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shown = _order(result)[:max_units]
    needed = sorted({i for u in shown for i in u["top_images"]})
    for i in needed:
        im = load_image(rows[i]["image"])
        im.thumbnail((96, 96))
        im.save(out / "thumbnails" / f"{i}.png")
    m = result["metrics"]
    cards = []
    for u in shown:
        imgs = "".join(f'<img src="thumbnails/{i}.png" title="{a:.3f}" alt="image {i}">'
                       for i, a in zip(u["top_images"], u["top_activations"]))  # fmt: skip
        words = ", ".join(f"{html.escape(w)} ({c:.2f})" for w, c in zip(u["words"], u["word_cosines"]))
        s = u["selectivity"]
        tag = ""
        if s:
            eta = ", ".join(f"{a} {v:.2f}" for a, v in s["eta2"].items())
            label = f"{s['attribute']}: {s['preferred']}" if s["selective"] else "not selective"
            tag = (f"<div class='sel {'yes' if s['selective'] else 'no'}'>{html.escape(label)}"
                   f"{' &middot; multimodal' if s.get('multimodal') else ''}</div><div class='eta'>eta&sup2;: {eta}</div>")  # fmt: skip
        cards.append(f"<div class='card'><b>unit {u['unit']}</b>{tag}<div class='imgs'>{imgs}</div>"
                     f"<div class='words'>words: {words}</div></div>")  # fmt: skip
    sections = [
        f"<p>Layer {m['layer']} ({m['units']} units, activation by {m['reduce']} over tokens), "
        f"{m['num_units']} units, {m['num_images']} images ({m['num_one_object']} of one object).</p>"
    ]
    if m.get("selective") is not None:
        sections.append(
            "<h2>Selective units</h2><p>A unit is selective for the attribute that explains the largest share of "
            f"its variance (eta&sup2;) when that share is at least {m['threshold']}; the chance level is the same "
            "count with the labels shuffled. Multimodal: selective, and its best-aligned word among the attribute "
            f"values names its preferred value ({m['multimodal']} units).</p>"
            + _table(
                ["attribute", "selective units", "with shuffled labels"],
                [[a, m["selective"][a], m["selective_shuffled_labels"][a]] for a in ATTRIBUTES],
            )
        )
    sections.append(
        f"<h2>Units (the {len(shown)} most selective)</h2><div class='cards'>{''.join(cards)}</div>"
    )
    css = (
        ".cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:330px;border:1px solid #ccc;padding:6px;"
        "font-size:12px}.imgs img{width:40px;height:40px;margin:1px;image-rendering:pixelated}"
        ".sel.yes{color:#063;font-weight:bold}.sel.no{color:#777}.eta{color:#555}.words{color:#224}"
    )
    title = f"Neuron atlas: {result['model'] or ''} layer {m['layer']}"
    return write_page(out / "atlas.html", title, sections, css)


__all__ = [
    "build_atlas",
    "correlation_ratio",
    "read_atlas_data",
    "selectivity",
    "unit_activations",
    "vocabulary",
]
