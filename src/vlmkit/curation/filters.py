"""The curation filters: each sees the survivors of the previous ones and says what it removes and why."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from vlmkit.curation.context import CurationContext
from vlmkit.data.manifest import IMAGE_EXTENSIONS, read_manifest
from vlmkit.data.transforms import load_image
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SEMDEDUP_CLUSTER_SIZE = 1000  # default clusters: n / this (pairwise work inside a cluster is size^2)
TARGET_CLUSTER_SIZE = 128  # default image-based clusters: n / this (DataComp: 100k clusters, 12.8M pool)
SIMILARITY_BLOCK = 1024  # rows of a cluster's similarity matrix computed at a time


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
