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

import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.config import atomic_write_text
from vlmkit.curation.context import CurationContext, check_model_dir
from vlmkit.curation.filters import (
    SEMDEDUP_CLUSTER_SIZE,
    TARGET_CLUSTER_SIZE,
    CaptionLength,
    DedupCaptions,
    DedupImages,
    Filter,
    ImageSize,
    ImageTargets,
    ModelScore,
    SemDeDup,
    TextConcepts,
    _ReadableImages,
    concept_pattern,
    normalize_caption,
    read_concepts,
    top_count,
)
from vlmkit.curation.pool import Pool, PoolSample, load_pool
from vlmkit.data.shards import (
    IMAGE_EXTS,
)
from vlmkit.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_OUT = "kept.jsonl"
UIDS = "uids.txt"
REMOVED = "removed.jsonl"
SUMMARY = "curation.json"
IMAGES_DIR = "images"


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
    from vlmkit.data.shards.write import ShardWriter

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


__all__ = [
    "SEMDEDUP_CLUSTER_SIZE", "TARGET_CLUSTER_SIZE", "CaptionLength", "CurationContext", "CurationResult",
    "DedupCaptions", "DedupImages", "Filter", "ImageSize", "ImageTargets", "ModelScore", "Pool", "PoolSample",
    "SemDeDup", "TextConcepts", "check_model_dir", "concept_pattern", "curate", "format_summary", "load_pool",
    "normalize_caption", "read_concepts", "top_count",
]  # fmt: skip
