"""Data-loading throughput: vlmkit's shard pipeline against a plain Pillow decode-only loop.

Writes `--num-images` photo-like JPEGs (gradients, soft shapes, texture, noise) into tar shards,
then times, in alternating rounds so that background load hits both alike:

  vlmkit       ShardStream (tar read + decode + ImageTransform) through a DataLoader with W workers,
               batches of --batch. `--pipeline train` (the default) is what training streams: a
               random resized crop to --image-size, shipped as uint8 (the trainer normalises on the
               device); `--pipeline eval` is the evaluation transform to a normalised float tensor;
  decode-only  `Image.open(BytesIO(b)).convert("RGB")` + `.load()` over the same JPEG bytes (already
               in memory), split over a pool of W processes.

Each figure is the median over `--reps` rounds. Worker start-up is excluded: the DataLoader keeps its
workers between passes (after one untimed pass) and the pool is warmed up before any timing. Prints
images/s in all and per worker, vlmkit / decode-only per worker, and the 1 -> 2 worker scaling.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/data_throughput.py --num-images 600
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlmkit.data.shards import ShardStream, decode_image_bytes, draft_size_for, iter_samples
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.runtime import describe_machine

_BYTES: list[bytes] = []  # the JPEGs, shared with the decode-only pool through fork


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A (H, W, 3) uint8 image with roughly the statistics JPEG sees in photos: smooth gradients, soft
    discs, texture at several scales and a little sensor noise (pure noise would decode far slower
    than a photo, flat colour far faster)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 90 * np.tanh(a * x / width + b * y / height + d)
    for _ in range(rng.integers(3, 7)):  # soft discs of random colours
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * width
        edge = np.clip((np.hypot(x - cx, y - cy) - r) / 4, -30, 30)
        mask = (1 / (1 + np.exp(edge)))[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
    for cell, amplitude in ((32, 14), (8, 10), (2, 6)):  # texture: upsampled noise, coarse to fine
        small = rng.normal(0, amplitude, (height // cell + 1, width // cell + 1, 1))
        img += np.kron(small, np.ones((cell, cell, 1)))[:height, :width]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_shards(out: Path, n: int, width: int, height: int, shard_size: int, quality: int) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for k in range(0, n, shard_size):
        path = out / f"{k // shard_size:05d}.tar"
        count = min(shard_size, n - k)
        with wds.TarWriter(str(path), encoder=False) as w:
            for i in range(k, k + count):
                buf = io.BytesIO()
                Image.fromarray(photo_like(rng, width, height)).save(buf, "JPEG", quality=quality)
                w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"photo {i}".encode()})
        stats = {"shard": path.name, "count": count, "successes": count, "failed": 0, "failures": {}}
        (out / f"{k // shard_size:05d}_stats.json").write_text(json.dumps(stats))
        urls.append(str(path))
    return urls


def time_vlmkit(loader: DataLoader) -> tuple[int, float]:
    """(images, seconds) for one pass of the shard pipeline; its persistent workers are idle at the
    start, so the clock includes neither their start-up nor work done before it started."""
    t0 = time.perf_counter()
    n = sum(len(images) for images, _ in loader)
    return n, time.perf_counter() - t0


def _plain(b: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(b)).convert("RGB")
    img.load()
    return img


def _decode_range(bounds: tuple[int, int]) -> int:
    for b in _BYTES[bounds[0] : bounds[1]]:
        _plain(b)
    return bounds[1] - bounds[0]


def _warm(_: int) -> int:
    torch.set_num_threads(1)
    return os.getpid()


def time_decode_only(pool, workers: int) -> tuple[int, float]:
    n = len(_BYTES)
    edges = np.linspace(0, n, workers + 1).round().astype(int)
    t0 = time.perf_counter()
    done = sum(pool.map(_decode_range, list(zip(edges[:-1], edges[1:]))))
    return done, time.perf_counter() - t0


def per_image_ms(transform: ImageTransform, reps: int = 3) -> dict[str, float]:
    """In-process cost of each stage, ms per image (best of `reps`), to explain the ratio."""
    draft = draft_size_for(transform)
    stages = {
        "decode-only (Image.open + convert + load)": _plain,
        "vlmkit decode (decode_image_bytes, draft)": lambda b: decode_image_bytes(b, "x", draft),
        "vlmkit decode + ImageTransform": lambda b: transform(decode_image_bytes(b, "x", draft)),
    }
    sample = _BYTES[: min(100, len(_BYTES))]
    out = {}
    for name, fn in stages.items():
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in sample:
                fn(b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 1e3 * best / len(sample)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--image-size", type=int, default=224, help="model input size (S x S)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="folder for the shards (default: a temporary folder)")
    p.add_argument("--pipeline", choices=("train", "eval"), default="train", help="which transform to time")
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        urls = write_shards(out, args.num_images, args.width, args.height, args.shard_size, args.quality)
        _BYTES.extend(s.image_bytes for s in iter_samples(urls))
        train = args.pipeline == "train"
        transform = ImageTransform(PreprocessConfig(image_size=args.image_size), train=train, uint8=train)
        kb = sum(map(len, _BYTES)) / len(_BYTES) / 1024
        print(
            f"{len(_BYTES)} JPEGs {args.width}x{args.height} (q{args.quality}, {kb:.0f} KB avg) in "
            f"{len(urls)} shards -> {args.image_size}x{args.image_size} ({args.pipeline} pipeline); batch {args.batch}; "
            f"Pillow {Image.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
            f"{describe_machine()}"
        )
        for name, ms in per_image_ms(transform).items():
            print(f"  in-process, 1 thread: {name:45s} {ms:6.2f} ms/image")

        ctx = get_context("fork")
        pools = {w: ctx.Pool(w) for w in args.workers}  # started before any timing
        for w, pool in pools.items():
            pool.map(_warm, range(4 * w))
        stream = ShardStream(urls, transform, shuffle=False)
        loaders = {
            w: DataLoader(stream, batch_size=args.batch, num_workers=w, persistent_workers=True)
            for w in args.workers
        }
        for loader in loaders.values():
            time_vlmkit(loader)  # starts the workers
        rates: dict[tuple[str, int], list[float]] = {}
        for rep in range(args.reps):
            order = args.workers if rep % 2 == 0 else args.workers[::-1]
            for w in order:
                for name in ("vlmkit", "decode-only") if rep % 2 == 0 else ("decode-only", "vlmkit"):
                    if name == "vlmkit":
                        n, s = time_vlmkit(loaders[w])
                    else:
                        n, s = time_decode_only(pools[w], w)
                    rates.setdefault((name, w), []).append(n / s)
        for pool in pools.values():
            pool.close()
        del loaders

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmedian of {args.reps} rounds (images/s):")
    print(
        f"{'workers':>8} {'vlmkit':>10} {'per worker':>11} {'decode-only':>12} {'per worker':>11} {'ratio':>7}"
    )
    for w in args.workers:
        v, d = med[("vlmkit", w)], med[("decode-only", w)]
        print(f"{w:>8} {v:>10.1f} {v / w:>11.1f} {d:>12.1f} {d / w:>11.1f} {v / d:>6.2f}x")
    if 1 in args.workers and 2 in args.workers:
        for name in ("vlmkit", "decode-only"):
            print(f"scaling 1 -> 2 workers, {name}: {med[(name, 2)] / med[(name, 1)]:.2f}x")
    print("rounds:", json.dumps({f"{k[0]}/{k[1]}": [round(x, 1) for x in v] for k, v in rates.items()}))


if __name__ == "__main__":
    main()
