"""Can a temporal transformer read the arrow of time from a dual encoder's frame embeddings?

The towers of a trained CLIP are frozen and every training clip's frame embeddings cached once; then only the
seqTransf pool (frame positions + a small transformer) trains, for many epochs in seconds, with the captions'
embeddings fixed too and each clip played backwards beside its reversed caption. Printed: multiple-choice accuracy
on the validation clips (direction, order, entering/leaving, count) for the trained pool, meanP and the reversed
clip: whether the frames carry what time needs, apart from how long the end-to-end recipe can train.

    PYTHONPATH=src python benchmarks/video_seqtransf_probe.py --model runs/clip-video-tiny/stage1-stills \
        --data data/moving-shapes --epochs 60
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
from vlmkit.data.transforms import ImageTransform
from vlmkit.data.video import frames_tensor, read_clip
from vlmkit.eval.features import extract_text_features
from vlmkit.eval.video import frame_features
from vlmkit.models.clip import TemporalPool, VideoConfig


def load(rows_file: Path, model, transform, num_frames: int, limit: int | None):
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()][:limit]
    clips = [
        frames_tensor(read_clip(rows_file.parent / r["video"], num_frames).frames, transform) for r in rows
    ]
    return rows, frame_features(model, clips, batch_size=64)  # (N, T, D)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a CLIP folder (its towers are frozen)")
    p.add_argument("--data", default="data/moving-shapes", help="a `vlmkit data synth-video` folder")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="training clips (default all)")
    args = p.parse_args()
    torch.manual_seed(0)
    pt = load_pretrained(args.model)
    model, tok = pt.model.eval(), pt.tokenizer
    transform = ImageTransform(pt.preprocess, train=False)
    t0 = time.perf_counter()
    data = Path(args.data)
    train_rows, train_x = load(data / "train.jsonl", model, transform, args.num_frames, args.limit)
    val_rows, val_x = load(data / "val.jsonl", model, transform, args.num_frames, None)
    print(
        f"cached {len(train_rows)} + {len(val_rows)} clips' frame embeddings in {time.perf_counter() - t0:.0f} s"
    )
    caption = extract_text_features(model, tok, [r["caption"] for r in train_rows])  # (N, D) unit
    reversed_caption = extract_text_features(
        model, tok, [r.get("reversed_caption") or r["caption"] for r in train_rows]
    )
    has_reverse = torch.tensor([bool(r.get("reversed_caption")) for r in train_rows])
    D = train_x.shape[-1]
    pool = TemporalPool(D, VideoConfig(pool="transformer", layers=args.layers, heads=4, max_frames=16))
    pool.init_weights()
    opt = torch.optim.AdamW(pool.parameters(), lr=args.lr, weight_decay=0.0)
    scale = model.scale_and_bias()[0].detach()

    def embed(x):
        return F.normalize(F.normalize(pool(x), dim=-1).mean(1), dim=-1)

    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 128):
            b = order[i : i + 128]
            rev = b[has_reverse[b]]
            x = torch.cat([train_x[b], train_x[rev].flip(1)])
            t = torch.cat([caption[b], reversed_caption[rev]])
            logits = scale * embed(x) @ t.T
            target = torch.arange(len(x))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")

    choices = extract_text_features(model, tok, [c for r in val_rows for c in r["choice_captions"]])
    starts = np.cumsum([0] + [len(r["choices"]) for r in val_rows])

    @torch.no_grad()
    def table(video, key="answer"):
        hits: dict[str, list[bool]] = {}
        for j, r in enumerate(val_rows):
            if r.get(key) is None:
                continue
            pick = r["choices"][int((choices[starts[j] : starts[j + 1]] @ video[j]).argmax())]
            hits.setdefault(r["kind"], []).append(pick == r[key])
        return {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}

    with torch.no_grad():
        print("seqTransf      ", table(embed(val_x)))
        print("mean pool      ", table(F.normalize(F.normalize(val_x, dim=-1).mean(1), dim=-1)))
        print("reversed (flip)", table(embed(val_x.flip(1)), "reversed_answer"))


if __name__ == "__main__":
    main()
