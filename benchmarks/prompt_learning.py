"""Learned prompts (CoOp, CoCoOp) against hand-made templates, base-to-new, on a task a CLIP's prompts find hard.

The quickstart's CLIP names colour x shape classes at 0.997 with any template: nothing is left for a prompt to
learn. Adding size makes the task harder: captions name size only sometimes. This script
renders a size x colour x shape ImageFolder (60 classes, "small red circle" ... "large yellow diamond"; one object,
the quickstart's scene style) with `--shots` training and `--test` held-out images per class, splits the classes
base / new (by default the first half of the sorted names are base, so the new classes' colours were never in
training), and prints the accuracy of

- the forward-selected hand templates (CLIP's 80 plus "a {}.", chosen on the same shots),
- CoOp (a shared context at the end; `--n-ctx`), CoOp with a per-class context (base only), CoCoOp,
- and a reference: free class vectors (a linear probe on the sphere with the CLIP's scale) fitted on the shots,

in one run. `vlmkit train --task prompt-learning` runs the same protocol on your own ImageFolders.

The quickstart's CLIP names these at 1.000 with hand templates too; a CLIP trained for two minutes does not:

    vlmkit train --recipe clip-tiny --train-data runs/quickstart/data/train.jsonl --time-budget 2 \
        --out runs/clip-2min --set precision=fp32
    PYTHONPATH=src python benchmarks/prompt_learning.py --model runs/clip-2min     # about 5.5 minutes, CoCoOp 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.convert import load_pretrained
from vlmkit.data.synthetic import COLOURS, SHAPES, render_scene
from vlmkit.models.prompt_learner import PromptConfig
from vlmkit.train.prompts import _encode_folder, base_to_new, class_subset, few_shot_indices


def render_folder(root: Path, per_class: int, seed: int, image_size: int = 64, noise: float = 0.2) -> None:
    """root/<size>_<colour>_<shape>/NNN.png, `per_class` one-object scenes each (rendered until every class is full)."""
    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == per_class * 2 * len(COLOURS) * len(SHAPES):
        return
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for size in ("small", "large"):
        for colour in COLOURS:
            for shape in SHAPES:
                (root / f"{size}_{colour}_{shape}").mkdir(parents=True, exist_ok=True)
    full = 2 * len(COLOURS) * len(SHAPES)
    while sum(1 for n in counts.values() if n >= per_class) < full:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = list(SHAPES)[rng.integers(len(SHAPES))]
        image, meta = render_scene(rng, image_size=image_size, num_objects=1, background_noise=noise,
                                   colours=(colour,), shapes=(shape,))  # fmt: skip
        name = f"{meta['objects'][0]['size']}_{colour}_{shape}"
        if counts.get(name, 0) < per_class:
            image.save(root / name / f"{counts.get(name, 0):03d}.png")
            counts[name] = counts.get(name, 0) + 1


def free_class_vectors(clip, preprocess, train, test, base, shots, seed) -> float:
    """Free class vectors on the sphere, fitted on the same shots with the CLIP's scale (seeded start): about what
    any prompt could reach on these image features."""
    f, y, names = _encode_folder(clip, preprocess, train, "cpu")
    tf, ty, _ = _encode_folder(clip, preprocess, test, "cpu")
    f, y = class_subset(f, y, names, base)
    pick = few_shot_indices(y.tolist(), shots, seed)
    f, y = f[pick], y[pick]
    tf, ty = class_subset(tf, ty, names, base)
    scale = clip.logit_scale.exp().item()
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(len(base), f.shape[1], generator=g) * 0.01)
    opt = torch.optim.Adam([W], 0.05)
    for _ in range(300):
        loss = F.cross_entropy(scale * f @ F.normalize(W, dim=-1).T, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((tf @ F.normalize(W, dim=-1).T).argmax(1) == ty).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/quickstart/run")
    ap.add_argument("--data", default="runs/prompt-bench", help="where the size x colour x shape folders go")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--test", type=int, default=10, help="held-out images per class")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--n-ctx", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="a JSON file for the results")
    args = ap.parse_args()
    data = Path(args.data)
    render_folder(data / "train", args.shots, seed=args.seed)
    render_folder(data / "test", args.test, seed=args.seed + 1)
    pt = load_pretrained(args.model)
    clip = pt.model.eval()
    common = dict(
        shots=args.shots, epochs=args.epochs, lr=args.lr, templates=["imagenet80", "a {}."], seed=args.seed
    )
    rows = {}
    for label, cfg in (
        ("CoOp (shared context)", PromptConfig(n_ctx=args.n_ctx)),
        ("CoOp (per-class context)", PromptConfig(n_ctx=args.n_ctx, per_class=True)),
        ("CoCoOp", PromptConfig(n_ctx=args.n_ctx, meta_net=True)),
    ):
        t = time.perf_counter()
        m = base_to_new(clip, pt.tokenizer, pt.preprocess, data / "train", data / "test", cfg, **common)[
            "metrics"
        ]
        rows.setdefault("hand templates (forward-selected on the shots)", m["hand"])
        rows[label] = {**m["learned"], "seconds": round(time.perf_counter() - t, 1)}
        base = m["base_classes"]
    rows["reference: free class vectors"] = {"base": free_class_vectors(clip, pt.preprocess, data / "train", data / "test", base,
                                                            args.shots, args.seed)}  # fmt: skip
    print(f"{len(base)} base classes, {args.shots} shots; held-out images: {args.test} per class")
    for label, r in rows.items():
        cells = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float) and k != "seconds")
        print(f"{label:>48}: {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
