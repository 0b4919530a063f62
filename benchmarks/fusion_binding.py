"""Why a fusion model's ITM does (or does not) bind attributes to objects: three probes of a trained model.

  patches  (any model with a vlmkit ViT, a dual encoder too) a logistic-regression probe of the image
           tower's output patch tokens on two-object scenes of the shapes
           data: each object's colour and shape from the token at its box centre and from the mean of the
           tokens inside its box (raw pixels of the centre patch as a baseline). ITM can bind "blue" to
           "triangle" only if the triangle's tokens say "triangle";
  itm      fine-tunes the ITM head and fusion layers on (image, true caption) / (image, foil) pairs of the
           training compositional file (`--types` picks foil types; `--freeze-vision` keeps the image tower)
           and prints held-out accuracy per foil type every 50 steps: how fast each kind is learnt;
  mim      trains the image tower by masked image modelling (vlmkit's normalised-pixel regression) and
           re-runs the patch probe every 100 steps: does MIM make the tokens more object-aware?

The model is changed in memory only. Results: benchmarks/RESULTS.md (fusion section).

    PYTHONPATH=src python benchmarks/fusion_binding.py --model runs/fusion-tiny-shapes --probe patches
    PYTHONPATH=src python benchmarks/fusion_binding.py --model runs/fusion-tiny-shapes --probe itm \\
        --types attribute_swap,relation_swap --freeze-vision --steps 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from vlmkit.convert import load_pretrained
from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.eval.compositional import read_rows
from vlmkit.losses.fusion import mim_loss, patch_mask
from vlmkit.models.fusion import Fusion
from vlmkit.runtime import describe_machine


def object_features(model, transform, root: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """Per object of the two-object scenes (two different shapes): centre token, box-mean token, centre pixels."""
    p = model.cfg.vision.patch_size
    grid = model.cfg.vision.image_size // p
    centre, mean, pixels, colour, shape = [], [], [], [], []
    for i in range(0, len(rows), 100):
        batch = rows[i : i + 100]
        images = torch.stack([transform(load_image(root / r["image"])) for r in batch])
        with torch.no_grad():
            tokens = model.visual.forward_tokens(images)[:, model.visual.num_prefix_tokens :]  # (B, N, C)
        for r, t, image in zip(batch, tokens, images, strict=True):
            for o in r["objects"]:
                x0, y0, x1, y1 = o["box"]
                cx, cy = min((x0 + x1) // 2 // p, grid - 1), min((y0 + y1) // 2 // p, grid - 1)
                inside = [
                    y * grid + x
                    for y in range(y0 // p, min(y1 // p, grid - 1) + 1)
                    for x in range(x0 // p, min(x1 // p, grid - 1) + 1)
                ]
                centre.append(t[cy * grid + cx].numpy())
                mean.append(t[inside].mean(0).numpy())
                pixels.append(image[:, cy * p : (cy + 1) * p, cx * p : (cx + 1) * p].reshape(-1).numpy())
                colour.append(o["colour"])
                shape.append(o["shape"])
    return {
        "centre token": centre,
        "box-mean token": mean,
        "centre pixels": pixels,
        "_colour": colour,
        "_shape": shape,
    }


def patch_probe(model, transform, root: Path, n_scenes: int = 3000) -> dict[str, float]:
    rows = [json.loads(line) for line in open(root / "train.jsonl")][:n_scenes]
    rows = [
        r for r in rows if len(r["objects"]) == 2 and r["objects"][0]["shape"] != r["objects"][1]["shape"]
    ]
    feats = object_features(model, transform, root, rows)
    n = int(len(feats["_shape"]) * 0.8)  # objects in scene order: the last 20% of scenes are held out
    out = {"objects": len(feats["_shape"])}
    for name in ("centre token", "box-mean token", "centre pixels"):
        X = np.asarray(feats[name])
        for label in ("colour", "shape"):
            y = feats[f"_{label}"]
            clf = LogisticRegression(max_iter=2000).fit(X[:n], y[:n])
            out[f"{name}: {label}"] = round(float(clf.score(X[n:], y[n:])), 3)
    return out


def itm_probe(model, tokenizer, transform, root: Path, args) -> None:
    types = set(args.types.split(",")) if args.types != "all" else None
    train = [r for r in read_rows(root / "train_compositional.jsonl") if types is None or r["type"] in types]
    val = read_rows(root / "val_compositional.jsonl")
    cache: dict[str, torch.Tensor] = {}

    def pixels(rows):
        for r in rows:
            if r["image"] not in cache:
                cache[r["image"]] = transform(load_image(r["image"]))  # read_rows resolves the paths
        return torch.stack([cache[r["image"]] for r in rows])

    def match(images, texts):  # (B,) log-odds of "match"
        t = tokenizer(texts)
        logits = model.itm_logits(t, model.encode_image_tokens(images), model.attention_mask(t))
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        hits: dict[str, list[float]] = {}
        for i in range(0, len(val), 128):
            rows = val[i : i + 128]
            images = pixels(rows)
            good = match(images, [r["caption"] for r in rows])
            bad = match(images, [r["foils"][0]["text"] for r in rows])
            for r, a, b in zip(rows, good, bad, strict=True):
                hits.setdefault(r["type"], []).append(float(a > b))
        model.train()
        return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}

    params = [p for n, p in model.named_parameters() if not (args.freeze_vision and n.startswith("visual."))]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    print("step 0", evaluate(), flush=True)
    t0, losses, B = time.time(), [], args.batch
    for step in range(1, args.steps + 1):
        rows = random.sample(train, B)
        texts = [r["caption"] for r in rows] + [r["foils"][0]["text"] for r in rows]
        t = tokenizer(texts)
        image_tokens = model.encode_image_tokens(pixels(rows))
        logits = model.itm_logits(t, torch.cat([image_tokens, image_tokens]), model.attention_mask(t))
        loss = F.cross_entropy(logits, torch.cat([torch.ones(B), torch.zeros(B)]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(
                f"step {step} ({time.time() - t0:.0f} s) loss {np.mean(losses[-50:]):.3f}",
                evaluate(),
                flush=True,
            )


def mim_probe(pretrained, transform, root: Path, args) -> None:
    cfg = dataclasses.replace(pretrained.model.cfg, mim=True, mim_weight=1.0)
    model = Fusion(cfg)
    model.load_state_dict(pretrained.model.state_dict(), strict=False)  # new: the mask token and pixel head
    images = [transform(load_image(root / json.loads(line)["image"])) for line in open(root / "train.jsonl")]
    images = torch.stack(images)
    opt = torch.optim.AdamW(
        [*model.visual.parameters(), *model.mim_head.parameters()], lr=args.lr, weight_decay=0.05
    )
    p = cfg.vision.patch_size
    n = (cfg.vision.image_size // p) ** 2
    print("step 0", patch_probe(model, transform, root), flush=True)
    for step in range(1, args.steps + 1):
        x = images[torch.randint(len(images), (args.batch,))]
        mask = patch_mask(args.batch, n, args.mim_ratio)
        tokens = model.encode_image_tokens(x, mask)[:, model.visual.num_prefix_tokens :]
        loss = mim_loss(model.mim_head(tokens), x, mask, p)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} mim loss {loss.item():.3f}", patch_probe(model, transform, root), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained fusion model folder")
    ap.add_argument("--data", default="data/shapes-vqa", help="the shapes data the model was trained on")
    ap.add_argument("--probe", choices=["patches", "itm", "mim"], default="patches")
    ap.add_argument("--types", default="all", help="itm: comma-separated foil types to train on, or 'all'")
    ap.add_argument("--freeze-vision", action="store_true", help="itm: keep the image tower fixed")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mim-ratio", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    print(describe_machine())
    pretrained = load_pretrained(args.model)
    transform = ImageTransform(pretrained.preprocess, train=False)
    root = Path(args.data)
    if args.probe == "patches":
        print(json.dumps(patch_probe(pretrained.model, transform, root), indent=2))
    elif args.probe == "itm":
        pretrained.model.train()
        itm_probe(pretrained.model, pretrained.tokenizer, transform, root, args)
    else:
        mim_probe(pretrained, transform, root, args)


if __name__ == "__main__":
    main()
