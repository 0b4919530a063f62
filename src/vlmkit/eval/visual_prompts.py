"""Referring to one object by a visual prompt, measured on the synthetic scenes' boxes: `vlmkit eval visual-prompts`.

For each object of a scene of two or more objects whose colour and shape no other object shares, the image is
classified zero-shot among every colour x shape the scenes hold, as it is ("none") and with each visual prompt
(`vlmkit.data.visual_prompts`: a circle or a box drawn around the object, the object cropped, the rest blurred).
Reported per prompt: the share of answers naming the referred object (right), and naming another object of the
scene (the model read the scene, not the prompt). Without a prompt a model can only be right by chance among the
scene's objects, so "none" is the control.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.data.visual_prompts import VISUAL_PROMPTS, apply_visual_prompt
from vlmkit.errors import DataError
from vlmkit.eval.features import encode_images
from vlmkit.eval.prompts import class_embeddings, ensemble
from vlmkit.eval.saliency_eval import queries, read_scenes

NUM_EXAMPLES = 4


def evaluate_visual_prompts(
    clip,
    tokenizer,
    preprocess,
    scenes: str | Path,
    prompts: Sequence[str] = VISUAL_PROMPTS,
    templates: Sequence[str] = ("a {}.",),
    *,
    limit: int | None = 300,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Accuracy of naming the referred object with each visual prompt (see the module docstring). With `out_dir`:
    visual_prompts.json, examples.png, report.html."""
    rows = read_scenes(scenes)
    qs = queries(rows, limit)
    if not qs:
        raise DataError(
            f"{scenes}: no scene of two or more objects with an object of its own colour and shape"
        )
    classes = sorted({f"{o['colour']} {o['shape']}" for r in rows for o in r["objects"]})
    clip = clip.eval().to(device)
    classifier = ensemble(class_embeddings(clip, tokenizer, classes, list(templates), device)).to(
        device
    )  # (C, D)
    transform = ImageTransform(preprocess, train=False)
    objects_of = {str(r["image"]): {f"{o['colour']} {o['shape']}" for o in r["objects"]} for r in rows}
    kinds = ["none", *prompts]
    right, other, examples = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0), {}
    for start in tqdm(range(0, len(qs), batch_size), desc="visual prompts", leave=False):
        chunk = qs[start : start + batch_size]
        originals = [load_image(q["image"]) for q in chunk]  # decoded once, prompted every way
        for kind in kinds:
            images = [
                im if kind == "none" else apply_visual_prompt(im, q["box"], kind)
                for im, q in zip(originals, chunk)
            ]
            examples.setdefault(kind, images[:NUM_EXAMPLES])
            feats = encode_images(clip, torch.stack([transform(im) for im in images]), batch_size, device)
            for q, p in zip(chunk, (feats.to(device) @ classifier.T).argmax(1).tolist()):
                right[kind] += classes[p] == q["name"]
                other[kind] += classes[p] != q["name"] and classes[p] in objects_of[str(q["image"])]
    results = {k: {"right": right[k] / len(qs), "other_object": other[k] / len(qs)} for k in kinds}
    chance = sum(1 / q["objects"] for q in qs) / len(qs)  # picking one of the scene's objects at random
    metrics = {"num_queries": len(qs), "num_classes": len(classes), "templates": list(templates),
               "chance_among_scene_objects": chance, "prompts": results}  # fmt: skip
    out = {"task": "visual_prompts", "model": model_name, "dataset": str(scenes), "metrics": metrics}
    if out_dir is not None:
        write_visual_prompts_report(Path(out_dir), out, examples, qs[:NUM_EXAMPLES])
    return out


def write_visual_prompts_report(out: Path, results: dict, examples: dict, shown: list[dict]) -> Path:
    from vlmkit.eval.report import _table, new_figure, save_figure, write_page

    out.mkdir(parents=True, exist_ok=True)
    (out / "visual_prompts.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    m = results["metrics"]
    kinds = list(examples)
    fig = new_figure(1.5 * len(kinds), 1.6 * len(shown))
    for i, q in enumerate(shown):
        for j, kind in enumerate(kinds):
            ax = fig.add_subplot(len(shown), len(kinds), i * len(kinds) + j + 1)
            ax.imshow(examples[kind][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(kind, fontsize=8)
            if j == 0:
                ax.set_ylabel(q["name"], fontsize=7)
    png = save_figure(fig, out / "examples.png")
    table = _table(
        ["visual prompt", "names the referred object", "names another object of the scene"],
        [[k, f"{v['right']:.3f}", f"{v['other_object']:.3f}"] for k, v in m["prompts"].items()],
    )
    sections = [
        f"<p>{m['num_queries']} referred objects among {m['num_classes']} classes; picking one of the scene's objects "
        f"at random names the referred one {m['chance_among_scene_objects']:.3f} of the time.</p>",
        table,
        f'<h2>Examples</h2><img src="{png.name}" alt="visual prompt examples">',
    ]
    return write_page(out / "report.html", f"Visual prompts: {results['model'] or ''}", sections)


__all__ = ["evaluate_visual_prompts"]
