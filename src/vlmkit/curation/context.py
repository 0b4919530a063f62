"""What the filters share: decoded-image facts and model embeddings, each computed once."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlmkit.curation.pool import Pool
from vlmkit.data.transforms import ImageDecodeError, ImageTransform
from vlmkit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ImageInfo:
    width: int
    height: int
    digest: str  # sha256 of the decoded RGB pixels and size


def _image_info(img: Image.Image) -> ImageInfo:
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return ImageInfo(img.width, img.height, h.hexdigest())


def _resolve_bf16(device: torch.device, bf16: bool | None) -> bool:
    """None: bf16 autocast where this device runs it fast (vlmkit.runtime), else fp32."""
    if bf16 is not None:
        return bf16
    from vlmkit.runtime import resolve_precision

    return resolve_precision("auto", device).bf16


class Embedder:
    """A vlmkit model's normalised image and caption embeddings of pool samples, computed on demand
    (in batches, under no_grad) and cached."""

    def __init__(self, model_dir: str, ctx: CurationContext):
        from vlmkit.convert import load_pretrained

        check_model_dir(model_dir)
        self.name = str(model_dir)
        self.ctx = ctx
        self.pt = load_pretrained(model_dir, ctx.device)
        if self.pt.tokenizer is None:
            raise ConfigError(
                f"{model_dir} has no tokenizer.json; scoring captions needs the model's tokenizer"
            )
        self.transform = ImageTransform(self.pt.preprocess, train=False)
        n, dim = len(ctx.pool), self.pt.model.cfg.embed_dim
        # np.zeros maps untouched pages lazily: memory grows with the rows actually embedded
        self.image = np.zeros((n, dim), dtype=np.float32)
        self.text = np.zeros((n, dim), dtype=np.float32)
        self.has_image = np.zeros(n, dtype=bool)
        self.has_text = np.zeros(n, dtype=bool)

    @torch.no_grad()
    def encode_images(
        self, load: Callable[[int], Image.Image], items: Sequence[int], desc: str
    ) -> tuple[np.ndarray, list[int], dict[int, str]]:
        """Decode `load(item)` for each item, transform and encode; returns (features (n_ok, D) float32
        L2-normalised, the items encoded, {item: reason} of those that could not be decoded)."""
        ctx, model = self.ctx, self.pt.model

        def prepare(item: int) -> tuple[int, torch.Tensor | None, str]:
            try:
                return item, self.transform(load(item)), ""
            except ImageDecodeError as e:
                return item, None, e.reason

        from vlmkit.eval.features import encode_image_batches

        chunks, done, failed = [], [], {}
        bs = ctx.batch_size
        with (
            ThreadPoolExecutor(ctx.workers) as threads,
            tqdm(total=len(items), desc=desc, unit="img", disable=not ctx.progress) as bar,
        ):

            def batches():
                for start in range(0, len(items), bs):
                    batch = list(threads.map(prepare, items[start : start + bs]))
                    failed.update({item: reason for item, x, reason in batch if x is None})
                    good = [(item, x) for item, x, _ in batch if x is not None]
                    bar.update(len(batch))
                    if good:
                        yield [item for item, _ in good], torch.stack([t for _, t in good])  # (B, 3, S, S)

            for batch_items, feats in encode_image_batches(model, batches(), ctx.device, ctx.bf16):
                chunks.append(feats.numpy())
                done.extend(batch_items)
        dim = model.cfg.embed_dim
        return (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), done, failed

    def image_features(self, indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Image embeddings (n_ok, D) of the decodable pool samples among `indices`, and those samples.
        Undecodable ones are recorded in the context's `errors`."""
        ctx = self.ctx
        todo = [i for i in indices if not self.has_image[i] and i not in ctx.errors]
        if todo:
            feats, done, failed = self.encode_images(
                ctx.load_image, todo, f"embedding images ({Path(self.name).name})"
            )
            self.image[done] = feats
            self.has_image[done] = True
            ctx.errors.update(failed)
        ok = [i for i in indices if self.has_image[i]]
        return self.image[ok], ok

    def text_features(self, indices: Sequence[int]) -> np.ndarray:
        from vlmkit.eval.features import extract_text_features

        todo = [i for i in indices if not self.has_text[i]]
        if todo:
            captions = [self.ctx.pool.samples[i].caption for i in todo]
            feats = extract_text_features(
                self.pt.model,
                self.pt.tokenizer,
                captions,
                self.ctx.batch_size,
                self.ctx.device,
                self.ctx.bf16,
            )
            self.text[todo] = feats.numpy()
            self.has_text[todo] = True
        return self.text[list(indices)]


def check_model_dir(path: str | os.PathLike) -> None:
    """ConfigError unless `path` is a model folder: a vlmkit run or a Hugging Face CLIP/SigLIP folder."""
    from vlmkit.convert import is_model_dir

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model folder not found: {path}")
    if not is_model_dir(path):
        raise ConfigError(
            f"{path} is not a model folder: expected a vlmkit run (model.safetensors, config.json) "
            "or a Hugging Face CLIP/SigLIP folder"
        )


class CurationContext:
    """What the filters share: the pool, decoded-image facts, embedders, device and batch settings."""

    def __init__(
        self,
        pool: Pool,
        embed_model: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        seed: int = 0,
        bf16: bool | None = None,
        progress: bool = True,
    ):
        self.pool = pool
        self.embed_model = embed_model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = _resolve_bf16(self.device, bf16)
        self.batch_size = batch_size
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.seed = seed
        self.progress = progress
        self.info: dict[int, ImageInfo] = {}
        self.errors: dict[int, str] = {}  # pool index -> why its image cannot be decoded
        self._embedders: dict[str, Embedder] = {}

    def load_image(self, i: int) -> Image.Image:
        """Decode sample i's image, recording its size and pixel hash on the way."""
        img = self.pool.load_image(i)
        if i not in self.info:
            self.info[i] = _image_info(img)
        return img

    def ensure_info(self, indices: Sequence[int]) -> None:
        """Decode (on threads) the images among `indices` whose size and hash are not known yet."""
        todo = [i for i in indices if i not in self.info and i not in self.errors]
        if not todo:
            return

        def decode(i: int) -> tuple[int, str]:
            try:
                self.load_image(i)
                return i, ""
            except ImageDecodeError as e:
                return i, e.reason

        with ThreadPoolExecutor(self.workers) as threads:
            results = threads.map(decode, todo)
            for i, reason in tqdm(
                results, total=len(todo), desc="decoding images", unit="img", disable=not self.progress
            ):
                if reason:
                    self.errors[i] = reason

    def recorded_size(self, i: int) -> tuple[int, int] | None:
        """The original (width, height) a shard sample's JSON records, if any."""
        meta = self.pool.samples[i].meta
        w, h = meta.get("original_width"), meta.get("original_height")
        if self.pool.kind == "shards" and isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return w, h
        return None

    def size(self, i: int) -> tuple[int, int] | None:
        """(width, height) of sample i's image (the recorded original size for shards), None if unreadable."""
        size = self.recorded_size(i)
        if size is None:
            self.ensure_info([i])
            info = self.info.get(i)
            size = (info.width, info.height) if info is not None else None
        return size

    def embedder(self, model: str | None, flag: str) -> Embedder:
        model = model or self.embed_model
        if model is None:
            raise ConfigError(
                f"{flag} needs embeddings: pass --embed-model or --score-model with a model folder"
            )
        key = os.path.abspath(model)
        if key not in self._embedders:
            self._embedders[key] = Embedder(model, self)
        return self._embedders[key]
