"""Frozen-feature extraction shared by the zero-shot, retrieval and linear-probe evaluations.

Images are decoded and transformed (optionally in DataLoader workers), encoded in batches under
no_grad, and returned as float32 CPU tensors. An image that cannot be decoded is logged and skipped
rather than ending an evaluation that may have run for an hour; callers report the count.
"""

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

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
    with eval_mode(model), bar:
        for batch in loader:
            good = [(i, image) for i, image, _ in batch if image is not None]
            for i, _, reason in batch:
                if reason is not None:
                    log.warning("skipping %s: %s", paths[i], reason)
                    skipped.append((paths[i], reason))
            if good:
                images = torch.stack([image for _, image in good]).to(device)  # (B, 3, S, S)
                with _autocast(device, bf16):
                    features = model.encode_image(images)  # (B, D)
                chunks.append(F.normalize(features.float(), dim=-1).cpu())
                kept.extend(i for i, _ in good)
            bar.update(len(batch))
    if not kept:
        path, reason = skipped[0]
        raise DataError(f"none of the {len(paths)} images could be decoded (first: {path}: {reason})")
    return ImageFeatures(torch.cat(chunks), kept, skipped)  # (N_kept, D)


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
