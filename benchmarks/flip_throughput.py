"""FLIP's speed-up: training pairs/s of one CLIP with 0%, 50% and 75% of its image patches dropped.

One model (clip-B-16 by default), one batch, the same training step as `train_throughput.py` (forward of
both towers + `ClipLoss` + backward + AdamW); only `vision.patch_dropout` changes between contenders. The
rates are timed in alternating rounds (so background load hits them alike); each figure is the median of
`--reps` rounds, and the speed-up is also taken per round (paired), which cancels load that hits a round.

    PYTHONPATH=src python benchmarks/flip_throughput.py --model clip-B-16 --batch 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import make_batch, parse_overrides, text_lengths

from vlmkit.losses import ClipLoss
from vlmkit.models import create_model
from vlmkit.runtime import cpu_info, describe_machine, resolve_precision


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="clip-B-16", help="a vlmkit dual-encoder name")
    p.add_argument(
        "--set", dest="override", nargs="*", default=[], help="config overrides, e.g. vision.layers=6"
    )
    p.add_argument("--rates", default="0,0.5,0.75", help="patch dropout rates to time")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--reps", type=int, default=5, help="timed rounds; each figure is their median")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per rate first")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    precision = resolve_precision(args.precision, "cpu")
    print(describe_machine(precision.name))
    rates = [float(r) for r in args.rates.split(",")]

    torch.manual_seed(0)
    model = create_model(args.model, **parse_overrides(args.override)).train()
    cfg = model.cfg
    images, text = make_batch(cfg, args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    loss_fn = ClipLoss()

    def step(rate: float) -> None:
        model.visual.patch_dropout.prob = rate
        with precision.autocast(torch.device("cpu")):
            out = model(images, text)
            loss = loss_fn(out.image_features, out.text_features, out.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = {}
    for rate in rates:
        with FlopCounterMode(display=False) as counter:
            step(rate)
        flops[rate] = counter.get_total_flops()
        for _ in range(args.warmup):
            step(rate)
    times: dict[float, list[float]] = {r: [] for r in rates}
    for i in range(args.reps):
        k = i % len(rates)  # rotate the order so no rate always runs first
        for rate in rates[k:] + rates[:k]:
            t0 = time.perf_counter()
            step(rate)
            times[rate].append(time.perf_counter() - t0)
        print(
            f"round {i + 1}/{args.reps}: " + ", ".join(f"{r:.0%} {times[r][-1]:.2f}s" for r in rates),
            flush=True,
        )

    base = rates[0]
    v = cfg.vision
    print(
        f"\n{args.model}: image {v.image_size}/{v.patch_size} ({v.grid_size**2} patches), ViT {v.width}x{v.layers}, "
        f"text {cfg.text.width}x{cfg.text.layers} ({statistics.mean(text_lengths(cfg, text)):.1f} tokens to "
        f"end-of-text on average); batch {args.batch}, {precision.name}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {cpu_info().model}"
    )
    print(f"{'masked':>8}{'patches':>9}{'step s':>9}{'pairs/s':>9}{'speed-up':>10}{'paired':>8}{'FLOPs':>8}")
    rows = {}
    for rate in rates:
        med = statistics.median(times[rate])
        paired = statistics.median(tb / t for tb, t in zip(times[base], times[rate], strict=True))
        rows[rate] = dict(
            kept_patches=max(1, int(v.grid_size**2 * (1 - rate))),
            step_s=med,
            pairs_per_s=args.batch / med,
            speedup=statistics.median(times[base]) / med,
            paired_speedup=paired,
            flops_ratio=flops[rate] / flops[base],
        )
        r = rows[rate]
        print(
            f"{rate:>8.0%}{r['kept_patches']:>9}{med:>9.2f}{r['pairs_per_s']:>9.2f}{r['speedup']:>9.2f}x"
            f"{paired:>7.2f}x{r['flops_ratio']:>8.2f}"
        )
    result = dict(
        model=args.model, batch=args.batch, precision=precision.name, cpu=cpu_info().describe(),
        threads=torch.get_num_threads(), torch=torch.__version__, results=rows, step_times=times,
    )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
