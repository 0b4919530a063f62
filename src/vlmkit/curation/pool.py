"""The pool to curate: samples (key, caption, where the image is) from a manifest or shards."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmkit.data.manifest import read_manifest
from vlmkit.data.shards import (
    SkipStats,
    decode_image_bytes,
    expand_shards,
    is_shard_spec,
    iter_samples,
)
from vlmkit.data.transforms import load_image
from vlmkit.errors import DataError

log = logging.getLogger(__name__)

KEY_COLUMNS = ("key", "uid")  # a manifest column that names its samples (DataComp calls it uid)


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
