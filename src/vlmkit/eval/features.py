"""Frozen-feature extraction: the one image-encoding loop (`encode_image_batches`) and text-encoding loop
(`extract_text_features`) that the evaluations, the trainer's evaluation, curation and inference share.

Images are decoded and transformed (optionally in DataLoader workers), encoded in batches under
no_grad, and returned as float32 CPU tensors. An image that cannot be decoded is logged and skipped
rather than ending an evaluation that may have run for an hour; callers report the count.
"""

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from vlmkit.data.shards import (
    SKIP_REASONS,
    SkipStats,
    count_samples,
    decode_sample,
    iter_samples,
    sample_group,
)
from vlmkit.data.transforms import ImageDecodeError, load_image
from vlmkit.errors import DataError

log = logging.getLogger(__name__)

PROGRESS_MIN_ITEMS = 1000  # smaller sets finish before a progress bar is worth its output


@dataclass
class ImageFeatures:
    features: torch.Tensor  # (N_kept, D) float32 on CPU, one row per decodable image
    kept: list[int]  # index into the input paths of each row of `features`
    skipped: list[tuple[Path, str]]  # (path, reason) of each image that could not be decoded


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `model` in eval mode for the block, then restore its mode (the trainer evaluates mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _autocast(device: str | torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def encode_image_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    device: str | torch.device,
    bf16: bool,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """For each `(items, images)` of `batches` (images (B, 3, S, S), transformed): `(items, features)`, the
    features (B, D) from `model.encode_image` (under bf16 autocast if `bf16`), L2-normalised in float32, on
    the CPU. The model is in eval mode meanwhile; gradients are off."""
    with eval_mode(model), torch.no_grad():
        for items, images in batches:
            with _autocast(device, bf16):
                features = model.encode_image(images.to(device))  # (B, D)
            yield items, F.normalize(features.float(), dim=-1).cpu()


def encode_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """L2-normalised float32 CPU features (N, D) of transformed images already in memory (N, 3, S, S)."""
    batches = ((None, images[i : i + batch_size]) for i in range(0, len(images), batch_size))
    return torch.cat([f for _, f in encode_image_batches(model, batches, device, bf16)])


class _ImageFiles(Dataset):
    """Decoded, transformed images; a failure is returned as a reason instead of raised, so one bad
    file does not kill a DataLoader worker."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageDecodeError as e:
            return i, None, e.reason


@torch.no_grad()
def extract_image_features(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    num_workers: int = 0,
) -> ImageFeatures:
    """Encode the images at `paths` with `model.encode_image`; features are L2-normalised.

    `model` must already be on `device`. `bf16` runs the encoder under bfloat16 autocast; features
    are normalised in float32 either way. Raises DataError if no image at all can be decoded.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no images to encode; check the dataset folder or manifest")
    loader = DataLoader(
        _ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    chunks, kept, skipped = [], [], []
    bar = tqdm(total=len(paths), desc="images", unit="img", disable=len(paths) < PROGRESS_MIN_ITEMS)

    def batches():
        for batch in loader:
            good = [(i, image) for i, image, _ in batch if image is not None]
            for i, _, reason in batch:
                if reason is not None:
                    log.warning("skipping %s: %s", paths[i], reason)
                    skipped.append((paths[i], reason))
            bar.update(len(batch))
            if good:
                yield [i for i, _ in good], torch.stack([image for _, image in good])  # (B, 3, S, S)

    with bar:
        for items, features in encode_image_batches(model, batches(), device, bf16):
            chunks.append(features)
            kept.extend(items)
    if not kept:
        path, reason = skipped[0]
        raise DataError(f"none of the {len(paths)} images could be decoded (first: {path}: {reason})")
    return ImageFeatures(torch.cat(chunks), kept, skipped)  # (N_kept, D)


class _ShardImages(IterableDataset):
    """Transformed images of shard samples; DataLoader workers read disjoint shards. Items are
    ((shard index, sample index), image or None, caption, group, key); each worker ends with
    (None, its skip counts in SKIP_REASONS order)."""

    def __init__(self, urls: Sequence[str], transform: Callable[[Image.Image], torch.Tensor]):
        self.urls = list(urls)
        self.transform = transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SkipStats(log=log)
        for u in range(worker, len(self.urls), num_workers):
            for i, sample in enumerate(iter_samples([self.urls[u]], stats=stats)):
                img = decode_sample(sample, stats)
                image = self.transform(img) if img is not None else None
                yield (u, i), image, sample.caption, sample_group(sample), sample.key
        yield None, stats.as_vector()


@dataclass
class ShardFeatures:
    features: torch.Tensor  # (N_kept, D) float32 on CPU, L2-normalised, in shard order
    captions: list[str]  # caption of each row
    groups: list[str]  # the image each row shows (meta "source", else shard:key; see sample_group)
    names: list[tuple[str, str]]  # (shard, key) of each row
    skipped: dict[str, int]  # samples skipped, by reason (decode_error, missing_caption, ...)


@torch.no_grad()
def extract_shard_features(
    model: torch.nn.Module,
    urls: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    num_workers: int = 0,
) -> ShardFeatures:
    """Encode the images of every usable sample in the shards at `urls`, streaming (one pass).

    Features are L2-normalised and returned in shard order whatever the number of workers. Bad samples
    are skipped, logged and counted. Raises DataError if no sample at all is usable.
    """
    urls = list(urls)
    try:
        total = count_samples(urls)
    except DataError:  # the stats files only size the progress bar
        total = None
    loader = DataLoader(
        _ShardImages(urls, transform),
        batch_size=batch_size,
        num_workers=min(num_workers, len(urls)),
        collate_fn=list,
    )
    chunks, rows, skipped = [], [], Counter()
    bar = tqdm(total=total, desc="images", unit="img", disable=(total or 0) < PROGRESS_MIN_ITEMS)

    def batches():
        for batch in loader:
            good = []
            for item in batch:
                if item[0] is None:  # a worker's final skip counts
                    skipped.update(dict(zip(SKIP_REASONS, item[1])))
                elif item[1] is not None:
                    good.append(item)
            bar.update(len(batch))
            if good:
                rows_of_batch = [(order, caption, group, key) for order, _, caption, group, key in good]
                yield rows_of_batch, torch.stack([item[1] for item in good])  # (B, 3, S, S)

    with bar:
        for batch_rows, features in encode_image_batches(model, batches(), device, bf16):
            chunks.append(features)
            rows.extend(batch_rows)
    skipped = {k: v for k, v in skipped.items() if v}
    if not rows:
        raise DataError(f"no usable sample in the {len(urls)} shards (skipped: {skipped or 'none'})")
    order = sorted(range(len(rows)), key=lambda r: rows[r][0])
    return ShardFeatures(
        features=torch.cat(chunks)[order],  # (N_kept, D)
        captions=[rows[r][1] for r in order],
        groups=[rows[r][2] for r in order],
        names=[(urls[rows[r][0][0]], rows[r][3]) for r in order],
        skipped=skipped,
    )


@torch.no_grad()
def extract_text_features(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Encode `texts` with `model.encode_text`; returns L2-normalised float32 CPU features (N, D)."""
    texts = list(texts)
    chunks = []
    with eval_mode(model):
        for start in tqdm(
            range(0, len(texts), batch_size), desc="texts", disable=len(texts) < PROGRESS_MIN_ITEMS
        ):
            tokens = tokenizer(texts[start : start + batch_size]).to(device)  # (B, T)
            with _autocast(device, bf16):
                features = model.encode_text(tokens)  # (B, D)
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(chunks)  # (N, D)


@dataclass
class LabelledFeatures:
    features: torch.Tensor  # (N_kept, D) L2-normalised
    labels: torch.Tensor  # (N_kept,) int64 class index of each row
    paths: list[Path]  # (N_kept) image of each row
    classnames: list[str]
    skipped: list[tuple[Path, str]]


def encode_labelled_images(
    model: torch.nn.Module,
    paths: Sequence[str | Path],
    labels: Sequence[int],
    classnames: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    num_workers: int = 0,
) -> LabelledFeatures:
    """Encode a classification set (as read by `read_image_folder`); undecodable images are dropped."""
    out = extract_image_features(model, paths, transform, batch_size, device, bf16, num_workers)
    return LabelledFeatures(
        features=out.features,
        labels=torch.tensor([labels[i] for i in out.kept], dtype=torch.long),
        paths=[Path(paths[i]) for i in out.kept],
        classnames=list(classnames),
        skipped=out.skipped,
    )


def result_dict(task: str, dataset: str, model_name: str, metrics: dict) -> dict:
    """One evaluation result in CLIP_benchmark's form, as saved to eval/*.json and read by the report."""
    return {"dataset": dataset, "model": model_name, "task": task, "metrics": metrics}


def save_results(results: dict, path: str | Path) -> Path:
    """Write `results` as indented JSON, via a temp file and os.replace: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
