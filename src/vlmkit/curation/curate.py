"""Curation of an image-text pool: `vlmkit data filter`, after DataComp's baselines and SemDeDup.

    pool = load_pool("data/shards")  # shards (a .tar, a brace pattern, a folder) or a manifest
    filters = [CaptionLength(min_words=3), DedupImages(), ModelScore("runs/clip", top_fraction=0.3)]
    result = curate(pool, filters, "data/curated")

Filters run in the order given; each sees only the survivors of the previous ones, so the counts it
reports are what it removed on top of them (dedup before a score filter removes duplicates of bad
pairs too; after it, only duplicates among good ones). The filters:

- `CaptionLength`: caption length in whitespace-separated words.
- `ImageSize`: the image's shorter side and its aspect ratio (long side / short side). For shard input
  the original size recorded in the sample's JSON is used when present, as DataComp does, since the
  stored image may have been resized.
- `DedupImages`, `DedupCaptions`: exact duplicates, keeping the first in input order. Images are equal
  when their decoded RGB pixels are (the same picture saved to two files, or as PNG and BMP, is one
  image); captions are equal ignoring case and runs of whitespace.
- `ModelScore`: cosine similarity of a vlmkit model's normalised image and caption embeddings (the
  "CLIP score"); keeps scores >= `min_score`, or the ceil(F * n) best of the n survivors with
  `top_fraction=F` (ties by input order).
- `SemDeDup`: k-means (scikit-learn, seeded) on normalised image embeddings; inside each cluster,
  members in input order, a member is removed when its cosine similarity to any earlier member exceeds
  1 - eps. So the first of each near-duplicate group is kept, and, as in SemDeDup, a chain a~b~c
  removes b and c even when a and c are further apart.
- `TextConcepts`: keeps captions naming any concept (whole words, any case, an "s"/"es"/"ies" plural
  of the last word allowed), DataComp's text-based selection.
- `ImageTargets`: k-means on the survivors' image embeddings; each target image hits its nearest
  centroid; keeps the samples in the hit clusters (DataComp's image-based selection).

Samples are named by key: the shard key, or a manifest's "key" / "uid" column, else its line number.

Images are decoded lazily: a basic filter decodes each image it needs once and caches its size and a
pixel hash; an embedding pass records the same facts from the image it decodes. An image that cannot
be decoded is removed by the first filter that needs it, with the reason (writing shards from a
manifest decodes every kept image, so a last "unreadable_image" step removes any left). Embeddings are
computed once per model and shared by the filters that use that model.

Outputs in the output folder: the kept subset (shards written with the raw image bytes, or `kept.jsonl`
with image paths relative to it; images of shard input are written under `images/`), `uids.txt` (kept
keys in input order), `removed.jsonl` (key, caption, filter, reason, score), `curation.json` (counts,
thresholds, score statistics) and `report.html` with its PNGs (see `vlmkit.curation.report`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vlmkit.config import atomic_write_text
from vlmkit.data.manifest import IMAGE_EXTENSIONS, read_manifest
from vlmkit.data.shards import (
    IMAGE_EXTS,
    SkipStats,
    decode_image_bytes,
    expand_shards,
    is_shard_spec,
    iter_samples,
)
from vlmkit.data.transforms import ImageDecodeError, ImageTransform, load_image
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST_OUT = "kept.jsonl"
UIDS = "uids.txt"
REMOVED = "removed.jsonl"
SUMMARY = "curation.json"
IMAGES_DIR = "images"
KEY_COLUMNS = ("key", "uid")  # a manifest column that names its samples (DataComp calls it uid)
SEMDEDUP_CLUSTER_SIZE = 1000  # default clusters: n / this (pairwise work inside a cluster is size^2)
TARGET_CLUSTER_SIZE = 128  # default image-based clusters: n / this (DataComp: 100k clusters, 12.8M pool)
SIMILARITY_BLOCK = 1024  # rows of a cluster's similarity matrix computed at a time


# ----------------------------------------------------------------------------------------------
# the pool


@dataclass
class PoolSample:
    key: str  # unique in the pool; what uids.txt lists
    caption: str
    source: str  # manifest input: the image path; shard input: "shard.tar:key"
    image_path: Path | None = None  # manifest input
    image_ext: str = ""  # "jpg", "png", ...
    meta: dict = field(default_factory=dict)  # shard input: the sample's JSON; manifest input: extra columns


class Pool:
    """The samples of a manifest or of shards, in input order.

    Image bytes of shard input are spooled to an anonymous temporary file (not held in memory) and read
    back when a filter or the output needs them. Use as a context manager, or call `close`.
    """

    def __init__(
        self,
        samples: list[PoolSample],
        kind: str,
        source: str,
        skipped: Counter | None = None,
        spool=None,
        spans: list[tuple[int, int]] | None = None,
    ):
        self.samples = samples
        self.kind = kind  # "manifest" or "shards"
        self.source = source
        self.skipped = skipped if skipped is not None else Counter()  # input rows/members not loaded
        self._spool = spool
        self._spans = spans  # (offset, length) of each sample's bytes in the spool

    def __len__(self) -> int:
        return len(self.samples)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def image_bytes(self, i: int) -> bytes:
        s = self.samples[i]
        if s.image_path is not None:
            return s.image_path.read_bytes()
        offset, length = self._spans[i]
        return os.pread(self._spool.fileno(), length, offset)  # thread-safe: no shared file position

    def load_image(self, i: int) -> Image.Image:
        """Sample i's image, fully decoded, as RGB; raises ImageDecodeError."""
        s = self.samples[i]
        if s.image_path is not None:
            return load_image(s.image_path)
        return decode_image_bytes(self.image_bytes(i), f"{s.source}.{s.image_ext}")


def _manifest_rows(path: Path) -> dict[int, dict]:
    """Line -> the full JSON object of each row of a JSONL manifest (for its extra columns)."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        return {}
    rows = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        if raw.strip():
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                continue  # read_manifest reported it
            if isinstance(row, dict):
                rows[n] = row
    return rows


def _load_manifest_pool(path: Path) -> Pool:
    samples, bad = read_manifest(path)
    for b in bad:
        log.warning("skipped %s", b)
    rows = _manifest_rows(path)
    width = len(str(max((s.line for s in samples), default=0)))
    pool_samples, first_line = [], {}
    for s in samples:
        row = rows.get(s.line, {})
        key = next((row[k] for k in KEY_COLUMNS if isinstance(row.get(k), str | int) and str(row[k])), None)
        key = str(key) if key is not None else f"{s.line:0{width}d}"
        if key in first_line:
            raise DataError(
                f"{path}:{s.line}: key {key!r} was already used on line {first_line[key]}; keys must be unique"
            )
        first_line[key] = s.line
        extra = {k: v for k, v in row.items() if k not in ("image", "caption", *KEY_COLUMNS)}
        ext = s.image.suffix.lower().lstrip(".")
        pool_samples.append(PoolSample(key, s.caption, str(s.image), s.image, ext, extra))
    skipped = Counter("bad_row" for _ in bad)
    return Pool(pool_samples, "manifest", str(path), skipped)


def _load_shard_pool(spec: str) -> Pool:
    urls = expand_shards(spec)
    stats = SkipStats()
    spool = tempfile.TemporaryFile(prefix="vlmkit-pool-")
    samples, spans, first = [], [], {}
    offset = 0
    try:
        for s in iter_samples(urls, stats=stats):
            if s.key in first:
                raise DataError(
                    f"key {s.key!r} is in both {first[s.key]} and {s.shard}; keys must be unique across "
                    "the input shards (write them with different start shard numbers)"
                )
            first[s.key] = s.shard
            spool.write(s.image_bytes)
            spans.append((offset, len(s.image_bytes)))
            offset += len(s.image_bytes)
            samples.append(PoolSample(s.key, s.caption, f"{s.shard}:{s.key}", None, s.image_ext, s.meta))
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return Pool(samples, "shards", spec, Counter(stats.as_dict()), spool, spans)


def load_pool(spec: str | os.PathLike) -> Pool:
    """Read a pool: shards (a .tar, `dir/{00000..00009}.tar`, specs joined by "::", or a folder of .tar)
    or a manifest (.jsonl / .csv / .tsv). Bad rows and corrupt shard members are skipped and counted
    in `Pool.skipped`."""
    spec = str(spec)
    if is_shard_spec(spec):
        return _load_shard_pool(spec)
    path = Path(spec)
    if path.is_dir():
        raise DataError(f"{path} is a folder without .tar shards; pass shards or a .jsonl/.csv manifest")
    return _load_manifest_pool(path)


# ----------------------------------------------------------------------------------------------
# decoded-image facts and embeddings, computed once and shared by the filters


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
        from vlmkit.models.pretrained import load_pretrained

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

        chunks, done, failed = [], [], {}
        bs = ctx.batch_size
        with (
            ThreadPoolExecutor(ctx.workers) as threads,
            tqdm(total=len(items), desc=desc, unit="img", disable=not ctx.progress) as bar,
        ):
            for start in range(0, len(items), bs):
                batch = list(threads.map(prepare, items[start : start + bs]))
                failed.update({item: reason for item, x, reason in batch if x is None})
                good = [(item, x) for item, x, _ in batch if x is not None]
                if good:
                    x = torch.stack([t for _, t in good]).to(ctx.device)  # (B, 3, S, S)
                    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
                        feats = model.encode_image(x)  # (B, D)
                    chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
                    done.extend(item for item, _ in good)
                bar.update(len(batch))
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
    from vlmkit.models.pretrained import is_model_dir

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


# ----------------------------------------------------------------------------------------------
# filters


@dataclass
class FilterOutcome:
    removed: dict[int, str]  # pool index -> reason
    scores: dict[int, float] = field(default_factory=dict)  # pool index -> score, where the filter has one
    threshold: float | None = None  # the score line a sample had to clear
    stats: dict = field(default_factory=dict)


class Filter:
    """A step of a curation pipeline. `apply` gets the survivors of the previous steps (pool indices in
    input order) and says which to remove and why."""

    name: ClassVar[str] = "filter"
    score_name: ClassVar[str | None] = None  # what `FilterOutcome.scores` holds, for the report

    def params(self) -> dict:
        return asdict(self)

    def models(self) -> list[str | None]:
        """Model folders this filter embeds with (None: the pipeline's embed model)."""
        return []

    def apply(self, ctx: CurationContext, indices: list[int]) -> FilterOutcome:
        raise NotImplementedError


def _unreadable(ctx: CurationContext, i: int) -> str:
    return f"unreadable image: {ctx.errors[i]}"


@dataclass
class CaptionLength(Filter):
    min_words: int | None = None
    max_words: int | None = None
    name: ClassVar[str] = "caption_length"

    def __post_init__(self):
        for flag, v in (("--min-words", self.min_words), ("--max-words", self.max_words)):
            if v is not None and v < 0:
                raise ConfigError(f"{flag} must be >= 0, got {v}")
        if self.min_words is None and self.max_words is None:
            raise ConfigError("caption length filter: give --min-words and/or --max-words")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ConfigError(f"--min-words ({self.min_words}) is larger than --max-words ({self.max_words})")

    def apply(self, ctx, indices):
        removed = {}
        for i in indices:
            n = len(ctx.pool.samples[i].caption.split())
            if self.min_words is not None and n < self.min_words:
                removed[i] = f"{n} words < {self.min_words}"
            elif self.max_words is not None and n > self.max_words:
                removed[i] = f"{n} words > {self.max_words}"
        return FilterOutcome(removed)


@dataclass
class ImageSize(Filter):
    min_side: int | None = None  # pixels
    max_aspect: float | None = None  # long side / short side
    name: ClassVar[str] = "image_size"

    def __post_init__(self):
        if self.min_side is None and self.max_aspect is None:
            raise ConfigError("image size filter: give --min-side and/or --max-aspect")
        if self.min_side is not None and self.min_side < 1:
            raise ConfigError(f"--min-side must be >= 1 pixel, got {self.min_side}")
        if self.max_aspect is not None and not self.max_aspect >= 1:
            raise ConfigError(
                f"--max-aspect is long side / short side and must be >= 1, got {self.max_aspect}"
            )

    def apply(self, ctx, indices):
        # decode on threads up front rather than one by one
        ctx.ensure_info([i for i in indices if ctx.recorded_size(i) is None])
        removed = {}
        for i in indices:
            size = ctx.size(i)
            if size is None:
                removed[i] = _unreadable(ctx, i)
                continue
            w, h = size
            aspect = max(w, h) / max(min(w, h), 1)
            if self.min_side is not None and min(w, h) < self.min_side:
                removed[i] = f"{w}x{h}: shorter side < {self.min_side}"
            elif self.max_aspect is not None and aspect > self.max_aspect:
                removed[i] = f"{w}x{h}: aspect ratio {aspect:.2f} > {self.max_aspect:g}"
        return FilterOutcome(removed)


@dataclass
class DedupImages(Filter):
    name: ClassVar[str] = "dedup_images"

    def apply(self, ctx, indices):
        ctx.ensure_info(indices)
        first: dict[str, int] = {}
        removed = {}
        for i in indices:
            if i in ctx.errors:
                removed[i] = _unreadable(ctx, i)
            elif ctx.info[i].digest in first:
                removed[i] = f"same pixels as {ctx.pool.samples[first[ctx.info[i].digest]].key}"
            else:
                first[ctx.info[i].digest] = i
        return FilterOutcome(removed)


@dataclass
class _ReadableImages(Filter):
    """Removes samples whose image cannot be decoded (run before writing shards from a manifest)."""

    name: ClassVar[str] = "unreadable_image"

    def apply(self, ctx, indices):
        ctx.ensure_info(indices)
        return FilterOutcome({i: _unreadable(ctx, i) for i in indices if i in ctx.errors})


def normalize_caption(caption: str) -> str:
    """What `DedupCaptions` compares: case-folded, whitespace runs as one space."""
    return " ".join(caption.split()).casefold()


@dataclass
class DedupCaptions(Filter):
    name: ClassVar[str] = "dedup_captions"

    def apply(self, ctx, indices):
        first: dict[str, int] = {}
        removed = {}
        for i in indices:
            text = normalize_caption(ctx.pool.samples[i].caption)
            if text in first:
                removed[i] = f"same caption as {ctx.pool.samples[first[text]].key}"
            else:
                first[text] = i
        return FilterOutcome(removed)


def _score_stats(values: Iterable[float]) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    q = np.quantile(v, [0.1, 0.5, 0.9])
    return {
        "count": int(v.size),
        "min": float(v.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": float(v.max()),
        "mean": float(v.mean()),
    }


def top_count(fraction: float, n: int) -> int:
    """How many of n samples the top `fraction` keeps: ceil(fraction * n), guarded against float error
    (0.3 * 10 is 3.0000000000000004)."""
    return min(n, math.ceil(round(fraction * n, 9)))


@dataclass
class ModelScore(Filter):
    """Image-caption cosine similarity under a vlmkit model (the CLIP score)."""

    model: str
    min_score: float | None = None
    top_fraction: float | None = None
    name: ClassVar[str] = "model_score"
    score_name: ClassVar[str] = "image-caption cosine similarity"

    def __post_init__(self):
        self.model = str(self.model)
        if (self.min_score is None) == (self.top_fraction is None):
            raise ConfigError("model score filter: give exactly one of --min-score and --top-fraction")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ConfigError(f"--min-score is a cosine similarity within [-1, 1], got {self.min_score}")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ConfigError(f"--top-fraction must be within (0, 1], got {self.top_fraction}")

    def models(self):
        return [self.model]

    def apply(self, ctx, indices):
        emb = ctx.embedder(self.model, "--score-model")
        image, ok = emb.image_features(indices)
        text = emb.text_features(ok)
        scores = np.einsum("nd,nd->n", image.astype(np.float64), text.astype(np.float64))  # (n,)
        removed = {i: _unreadable(ctx, i) for i in indices if i in ctx.errors}
        if self.min_score is not None:
            threshold = self.min_score
            keep = scores >= threshold
        else:
            order = np.argsort(-scores, kind="stable")  # best first; ties by input order
            keep = np.zeros(len(ok), dtype=bool)
            keep[order[: top_count(self.top_fraction, len(ok))]] = True
            threshold = float(scores[keep].min()) if keep.any() else None
        for i, s, k in zip(ok, scores, keep):
            if not k:
                removed[i] = f"score {s:.4f} < {threshold:.4f}" if threshold is not None else "score"
        stats = {"model": emb.name, "scores": _score_stats(scores)}
        return FilterOutcome(removed, dict(zip(ok, scores.tolist())), threshold, stats)


def _kmeans(features: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), centroids (k, D)) of seeded k-means; k is clamped to the number of points."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(features)))
    if k == 1:
        return np.zeros(len(features), dtype=np.int64), features.mean(0, keepdims=True)
    km = KMeans(n_clusters=k, random_state=seed, n_init=1).fit(features)
    return km.labels_.astype(np.int64), km.cluster_centers_


def max_similarity_to_earlier(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row j of L2-normalised `features` (m, D): the largest cosine similarity to a row i < j,
    and that i (-inf and -1 for row 0). Computed in blocks of rows, never as one m x m matrix."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    m = len(x)
    best = torch.full((m,), -math.inf)
    arg = torch.full((m,), -1, dtype=torch.long)
    for start in range(1, m, SIMILARITY_BLOCK):
        stop = min(m, start + SIMILARITY_BLOCK)
        sim = x[start:stop] @ x[:stop].T  # (b, stop)
        rows = torch.arange(start, stop).unsqueeze(1)  # (b, 1)
        sim.masked_fill_(torch.arange(stop).unsqueeze(0) >= rows, -math.inf)  # only earlier rows
        best[start:stop], arg[start:stop] = sim.max(dim=1)
    return best.numpy().astype(np.float64), arg.numpy()


@dataclass
class SemDeDup(Filter):
    """Semantic near-duplicates: k-means on image embeddings, then a cosine threshold inside clusters."""

    clusters: int | None = None  # default: n / SEMDEDUP_CLUSTER_SIZE
    eps: float = 0.05  # remove when cosine similarity > 1 - eps
    model: str | None = None  # default: the pipeline's embed model
    name: ClassVar[str] = "semdedup"
    score_name: ClassVar[str] = "max cosine similarity to an earlier member of its cluster"

    def __post_init__(self):
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError(f"--semdedup-clusters must be >= 1, got {self.clusters}")
        if not 0.0 <= self.eps < 2.0:
            raise ConfigError(f"--semdedup-eps is a cosine distance within [0, 2), got {self.eps}")

    def models(self):
        return [self.model]

    def apply(self, ctx, indices):
        emb = ctx.embedder(self.model, "--semdedup-eps/--semdedup-clusters")
        features, ok = emb.image_features(indices)
        removed = {i: _unreadable(ctx, i) for i in indices if i in ctx.errors}
        k = self.clusters or max(1, round(len(ok) / SEMDEDUP_CLUSTER_SIZE))
        if not ok:
            return FilterOutcome(removed, threshold=1 - self.eps, stats={"clusters": 0})
        labels, _ = _kmeans(features, k, ctx.seed)
        scores = {}
        by_cluster = np.argsort(labels, kind="stable")  # grouped by cluster, input order inside each
        for members in np.split(by_cluster, np.cumsum(np.bincount(labels))[:-1]):
            best, arg = max_similarity_to_earlier(features[members])
            for j in range(1, len(members)):
                i = ok[members[j]]
                scores[i] = float(best[j])
                if best[j] > 1 - self.eps:
                    removed[i] = (
                        f"near-duplicate of {ctx.pool.samples[ok[members[arg[j]]]].key} (cosine {best[j]:.4f})"
                    )
        stats = {
            "model": emb.name,
            "clusters": int(labels.max()) + 1,
            "max_similarity": _score_stats(scores.values()),
        }
        return FilterOutcome(removed, scores, 1 - self.eps, stats)


def read_concepts(spec: str | Sequence[str]) -> list[str]:
    """Concepts from a list, a file (one per line; blank lines and '#' comments ignored) or a comma list."""
    if not isinstance(spec, str):
        items = list(spec)
    elif Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8-sig")
        items = [line.split("#", 1)[0] for line in text.splitlines()]
    else:
        items = spec.split(",")
    concepts = list(dict.fromkeys(" ".join(c.split()) for c in items if c.strip()))
    if not concepts:
        raise ConfigError(
            f"--text-concepts: no concepts in {spec!r}; give a comma list or a file with one per line"
        )
    return concepts


def concept_pattern(concepts: Sequence[str]) -> re.Pattern:
    """A regex matching any concept as whole words, any case, with flexible spacing and a plural of the
    last word ("box" -> "boxes", "puppy" -> "puppies", "car" -> "cars")."""
    parts = []
    for concept in sorted(concepts, key=len, reverse=True):
        *head, last = concept.lower().split()
        if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
            last_pat = re.escape(last[:-1]) + "(?:y|ies)"
        else:
            last_pat = re.escape(last) + "(?:e?s)?"
        parts.append(r"\s+".join([*map(re.escape, head), last_pat]))
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


@dataclass
class TextConcepts(Filter):
    """Keeps samples whose caption names any of the concepts (DataComp's text-based selection)."""

    concepts: str | list[str]  # a list, a comma list or a file (see `read_concepts`)
    name: ClassVar[str] = "text_concepts"

    def __post_init__(self):
        self.concepts = read_concepts(self.concepts)
        self._pattern = concept_pattern(self.concepts)

    def params(self):
        return {"concepts": self.concepts if len(self.concepts) <= 50 else f"{len(self.concepts)} concepts"}

    def apply(self, ctx, indices):
        removed = {
            i: "names no concept" for i in indices if not self._pattern.search(ctx.pool.samples[i].caption)
        }
        return FilterOutcome(removed, stats={"concepts": len(self.concepts)})


def list_target_images(spec: str | os.PathLike) -> list[Path]:
    """Target images: the images of a manifest, or every image file under a folder (ImageFolder or flat)."""
    path = Path(spec)
    if path.is_file():
        samples, bad = read_manifest(path)
        for b in bad:
            log.warning("skipped %s", b)
        paths = list(dict.fromkeys(s.image for s in samples))
    elif path.is_dir():
        paths = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
    else:
        raise ConfigError(f"--image-targets: not found: {path} (give an image folder or a manifest)")
    if not paths:
        raise DataError(f"--image-targets: no images in {path}")
    return paths


@dataclass
class ImageTargets(Filter):
    """Keeps samples in the k-means clusters nearest to target images (DataComp's image-based selection)."""

    targets: str
    clusters: int | None = None  # default: n / TARGET_CLUSTER_SIZE
    model: str | None = None
    name: ClassVar[str] = "image_targets"

    def __post_init__(self):
        self.targets = str(self.targets)
        if not Path(self.targets).exists():
            raise ConfigError(
                f"--image-targets: not found: {self.targets} (give an image folder or a manifest)"
            )
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError(f"--image-clusters must be >= 1, got {self.clusters}")

    def models(self):
        return [self.model]

    def apply(self, ctx, indices):
        emb = ctx.embedder(self.model, "--image-targets")
        paths = list_target_images(self.targets)
        targets, done, failed = emb.encode_images(
            lambda j: load_image(paths[j]), range(len(paths)), "embedding targets"
        )
        for j, reason in failed.items():
            log.warning("skipping target %s: %s", paths[j], reason)
        if not done:
            raise DataError(
                f"--image-targets: none of the {len(paths)} images in {self.targets} can be decoded"
            )
        features, ok = emb.image_features(indices)
        removed = {i: _unreadable(ctx, i) for i in indices if i in ctx.errors}
        if not ok:
            return FilterOutcome(removed)
        k = self.clusters or max(1, round(len(ok) / TARGET_CLUSTER_SIZE))
        labels, centroids = _kmeans(features, k, ctx.seed)
        # each target's nearest centroid, by squared Euclidean distance as k-means assigns points
        d2 = (targets**2).sum(1, keepdims=True) - 2 * targets @ centroids.T + (centroids**2).sum(1)  # (T, k)
        hit = set(np.argmin(d2, axis=1).tolist())
        for i, c in zip(ok, labels.tolist()):
            if c not in hit:
                removed[i] = f"cluster {c} is nearest to no target"
        stats = {
            "model": emb.name,
            "clusters": len(centroids),
            "targets": len(done),
            "clusters_hit": len(hit),
        }
        return FilterOutcome(removed, stats=stats)


# ----------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class StepResult:
    name: str
    params: dict
    input: int  # survivors entering this step
    removed: list[int]  # pool indices, input order
    reasons: dict[int, str]
    scores: dict[int, float]
    threshold: float | None
    score_name: str | None
    stats: dict
    unreadable: int  # of `removed`: images that could not be decoded

    def summary(self) -> dict:
        return {
            "filter": self.name,
            "params": self.params,
            "input": self.input,
            "removed": len(self.removed),
            "unreadable": self.unreadable,
            "kept": self.input - len(self.removed),
            "threshold": self.threshold,
            **self.stats,
        }


@dataclass
class CurationResult:
    pool: Pool
    steps: list[StepResult]
    kept: list[int]  # pool indices, input order
    out_dir: Path | None
    output_format: str
    files: dict[str, Path]

    @property
    def kept_keys(self) -> list[str]:
        return [self.pool.samples[i].key for i in self.kept]

    def summary(self) -> dict:
        return {
            "input": {"source": self.pool.source, "format": self.pool.kind, "count": len(self.pool)},
            "skipped_input": dict(self.pool.skipped),
            "filters": [s.summary() for s in self.steps],
            "kept": len(self.kept),
            "output_format": self.output_format,
        }


def format_summary(result: CurationResult) -> str:
    """A short table: per filter, how many it removed and how many remain."""
    rows = [("input", "", str(len(result.pool)))]
    for n, s in enumerate(result.steps, start=1):
        removed = f"{len(s.removed)}" + (f" ({s.unreadable} unreadable)" if s.unreadable else "")
        rows.append((f"{n}. {s.name}", removed, str(s.input - len(s.removed))))
    rows.append(("kept", "", str(len(result.kept))))
    widths = [max(len(r[c]) for r in [("filter", "removed", "remaining"), *rows]) for c in range(3)]
    lines = []
    for r in [("filter", "removed", "remaining"), *rows]:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
    return "\n".join(lines)


def _check_out_dir(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) or "_"


def _write_manifest(result: CurationResult, out: Path) -> Path:
    pool = result.pool
    rows, used = [], set()
    for i in result.kept:
        s = pool.samples[i]
        if s.image_path is not None:
            image = Path(os.path.relpath(os.path.abspath(s.image_path), os.path.abspath(out))).as_posix()
            extra = s.meta
        else:
            name = f"{_safe_name(s.key)}.{s.image_ext or 'jpg'}"
            while name in used:  # keys that differ only in unsafe characters
                name = "_" + name
            used.add(name)
            (out / IMAGES_DIR).mkdir(exist_ok=True)
            (out / IMAGES_DIR / name).write_bytes(pool.image_bytes(i))
            image = f"{IMAGES_DIR}/{name}"
            extra = {"source": s.meta.get("source") or s.source, **(s.meta.get("extra") or {})}
        rows.append(
            json.dumps({"image": image, "caption": s.caption, "key": s.key, **extra}, ensure_ascii=False)
        )
    path = out / MANIFEST_OUT
    atomic_write_text(path, "".join(r + "\n" for r in rows))
    return path


def _write_shards(result: CurationResult, ctx: CurationContext, out: Path, shard_size: int) -> list[Path]:
    """Kept samples as shards: raw image bytes copied, except manifest images in a format the shard
    reader does not read (BMP, GIF, TIFF, ...), which are re-encoded as PNG."""
    from vlmkit.data.shard_writer import ShardWriter

    pool = result.pool
    with ShardWriter(out, shard_size=shard_size) as writer:
        for i in result.kept:
            s = pool.samples[i]
            if s.image_path is None:
                meta = dict(s.meta, input_key=s.key)
                writer.add_success(pool.image_bytes(i), s.image_ext, s.caption, meta)
                continue
            info = ctx.info[i]
            size = {"width": info.width, "height": info.height}
            meta = {"source": s.source, **size, **{f"original_{k}": v for k, v in size.items()}}
            meta.update(extra=s.meta, input_key=s.key)
            ext = {"jpeg": "jpg", "jfif": "jpg"}.get(s.image_ext, s.image_ext)
            if ext in IMAGE_EXTS:
                data = pool.image_bytes(i)
            else:
                buffer = io.BytesIO()
                ctx.load_image(i).save(buffer, format="PNG")
                data, ext = buffer.getvalue(), "png"
            writer.add_success(data, ext, s.caption, meta)
    return sorted(out.glob("*.tar"))


def curate(
    pool: Pool | str | os.PathLike,
    filters: Sequence[Filter],
    out: str | os.PathLike | None,
    *,
    output_format: str | None = None,
    embed_model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    seed: int = 0,
    bf16: bool | None = None,
    shard_size: int = 10_000,
    report: bool = True,
    progress: bool = True,
) -> CurationResult:
    """Run `filters` in order over `pool` and write the outputs to `out` (None: compute only).

    `pool` is a `Pool` or a spec for `load_pool`. `output_format` is "shards" or "manifest" (default: the
    input's kind). `embed_model` is the model SemDeDup and image-based selection embed with when they
    name none (default: the first ModelScore's model). bf16 autocast is used on CUDA unless `bf16` says
    otherwise. Returns a `CurationResult`; the files written are in its `files`.
    """
    if output_format not in (None, "shards", "manifest"):
        raise ConfigError(f"--output-format must be 'shards' or 'manifest', got {output_format!r}")
    if batch_size < 1 or shard_size < 1:
        raise ConfigError("--batch-size and --shard-size must be >= 1")
    if embed_model is None:
        embed_model = next((f.model for f in filters if isinstance(f, ModelScore)), None)
    for f in filters:  # fail before any work on a bad model folder
        for model in f.models():
            if model is None and embed_model is None:
                raise ConfigError(
                    f"the {f.name} filter needs embeddings: pass --embed-model (or --score-model)"
                )
            check_model_dir(model or embed_model)
    out = Path(out) if out is not None else None
    if out is not None:
        _check_out_dir(out)

    own_pool = not isinstance(pool, Pool)
    pool = load_pool(pool) if own_pool else pool
    try:
        output_format = output_format or pool.kind
        ctx = CurationContext(
            pool,
            embed_model=str(embed_model) if embed_model else None,
            device=device,
            batch_size=batch_size,
            workers=workers,
            seed=seed,
            bf16=bf16,
            progress=progress,
        )
        survivors = list(range(len(pool)))
        steps = []
        # Every sample the output holds must decode, whatever the filters looked at: a last step decodes
        # the kept images (filters that decoded them already leave nothing to do) and removes the ones
        # that fail, with their reason, rather than passing them on as successes.
        for f in [*filters, _ReadableImages()]:
            outcome = f.apply(ctx, survivors)
            removed = [i for i in survivors if i in outcome.removed]
            if isinstance(f, _ReadableImages) and not removed:
                continue
            steps.append(
                StepResult(
                    f.name,
                    f.params(),
                    len(survivors),
                    removed,
                    {i: outcome.removed[i] for i in removed},
                    outcome.scores,
                    outcome.threshold,
                    f.score_name,
                    outcome.stats,
                    sum(outcome.removed[i].startswith("unreadable image") for i in removed),
                )
            )
            gone = set(removed)
            survivors = [i for i in survivors if i not in gone]
            log.info("%s removed %d, %d remain", f.name, len(removed), len(survivors))

        result = CurationResult(pool, steps, survivors, out, output_format, {})
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            _write_outputs(result, ctx, out, shard_size, report)
        return result
    finally:
        if own_pool:
            pool.close()


def _write_outputs(
    result: CurationResult, ctx: CurationContext, out: Path, shard_size: int, report: bool
) -> None:
    pool, files = result.pool, result.files
    if result.output_format == "manifest":
        files["manifest"] = _write_manifest(result, out)
    else:
        shards = _write_shards(result, ctx, out, shard_size)
        files["shards"] = out
        log.info("wrote %d shards to %s", len(shards), out)
    files["uids"] = out / UIDS
    atomic_write_text(files["uids"], "".join(f"{k}\n" for k in result.kept_keys))
    lines = []
    for step in result.steps:
        for i in step.removed:
            s = pool.samples[i]
            score = step.scores.get(i)
            record = {
                "key": s.key,
                "caption": s.caption,
                "filter": step.name,
                "reason": step.reasons[i],
                "score": score,
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    files["removed"] = out / REMOVED
    atomic_write_text(files["removed"], "".join(lines))
    summary = result.summary()
    if report:
        from vlmkit.curation.report import write_curation_report

        files["report"] = write_curation_report(result, out)
    summary["files"] = {k: os.path.relpath(v, out) for k, v in files.items()}
    files["summary"] = out / SUMMARY
    atomic_write_text(files["summary"], json.dumps(summary, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# CLI

# flag dest -> the filter it configures; a filter takes its place in the pipeline at its first flag
_FILTER_OF_FLAG = {
    "min_words": "caption_length",
    "max_words": "caption_length",
    "min_side": "image_size",
    "max_aspect": "image_size",
    "dedup_images": "dedup_images",
    "dedup_captions": "dedup_captions",
    "min_score": "model_score",
    "top_fraction": "model_score",
    "semdedup_clusters": "semdedup",
    "semdedup_eps": "semdedup",
    "text_concepts": "text_concepts",
    "image_targets": "image_targets",
    "image_clusters": "image_targets",
}
