"""Which velocity network trains faster here: the FiLM UNet or the patch DiT? (issue 18 asks to measure it.)

Both train as rectified flows (vlmkit.models.flow) on the same one-object shapes scenes at 32 px, conditioned
on a fixed random embedding of each scene's class (colour + shape: 30 classes), for the same wall-clock time,
one after the other on this machine; printed: parameters, seconds per step, steps done, and the flow loss on a
fixed held-out batch (the same noise and times for both) at the end. Lower loss in the same time wins.

    PYTHONPATH=src python benchmarks/flow_archs.py                 # 2 x 3 minutes
    PYTHONPATH=src python benchmarks/flow_archs.py --minutes 1 --batch-size 32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vlmkit.data.synthetic import COLOURS, SHAPES, render_scene
from vlmkit.models.flow import FlowConfig, build_flow_model, flow_loss


def scenes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, classes = [], []
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for _ in range(n):
        image, meta = render_scene(rng, size, num_objects=1, background_noise=0.2)
        images.append(np.asarray(image, dtype=np.float32))
        o = meta["objects"][0]
        classes.append(names.index(f"{o['colour']} {o['shape']}"))
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return x, torch.tensor(classes)


def conditioned(model, cond: torch.Tensor):
    """The velocity of `model` under the conditions `cond` (B, cond_dim): what flow_loss calls."""
    return lambda xt, t: model(xt, t, cond)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="training time per network")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scenes", type=int, default=2000)
    a = p.parse_args()
    torch.manual_seed(0)
    x, cls = scenes(a.scenes, a.image_size, 0)
    held_x, held_cls = scenes(256, a.image_size, 1)
    table = torch.randn(30, 128, generator=torch.Generator().manual_seed(0))  # a class's condition
    nets = {
        "FiLM UNet 32/64/128": FlowConfig(image_size=a.image_size, channels=(32, 64, 128)),
        "FiLM UNet 16/32/64": FlowConfig(image_size=a.image_size, channels=(16, 32, 64)),
        "DiT patch 4, 128 x 4": FlowConfig(image_size=a.image_size, arch="dit", patch=4, width=128, layers=4),
        "DiT patch 2, 64 x 6": FlowConfig(
            image_size=a.image_size, arch="dit", patch=2, width=64, layers=6, heads=4
        ),
    }
    print(f"{'network':<24} {'params':>8} {'s/step':>7} {'steps':>6} {'held-out loss':>14}")
    for name, cfg in nets.items():
        torch.manual_seed(0)
        model = build_flow_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        steps, start = 0, time.time()
        while time.time() - start < 60 * a.minutes:
            idx = torch.randint(0, len(x), (a.batch_size,), generator=g)
            cond = model.drop_condition(table[cls[idx]], g)
            loss = flow_loss(conditioned(model, cond), x[idx], g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        per_step = (time.time() - start) / steps
        with torch.no_grad():
            held = flow_loss(conditioned(model, table[held_cls]), held_x, torch.Generator().manual_seed(1))
        params = sum(q.numel() for q in model.parameters())
        print(
            f"{name:<24} {params / 1e6:>7.2f}M {per_step:>7.3f} {steps:>6} {held.item():>14.4f}", flush=True
        )


if __name__ == "__main__":
    main()
