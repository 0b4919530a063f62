"""Reading WebDataset tar shards (img2dataset layout) for training, evaluation and curation.

(Over 500 lines: the shard spec, the stream with its resumable position and the skip accounting are
one reader.)

    urls = expand_shards("data/shards/{00000..00127}.tar")
    n = count_samples(urls)                        # from the per-shard _stats.json files
    for s in iter_samples(urls, stats=SkipStats()):  # in order, in this process
        ...
    stream = ShardStream(urls, ImageTransform(cfg, train=True), seed=0, epoch=0, repeat=True)

A shard is `{key}.jpg|png|webp`, `{key}.txt` (UTF-8 caption) and `{key}.json` per sample, beside
`{shard}_stats.json` and `{shard}.parquet` (see the shard writer). Only local files are read, with
webdataset's tar iterator. Only image, `.txt` and `.json` members are read at all: nothing is ever
unpickled, whatever a member's extension.

Bad input is skipped and counted, never fatal: each skip goes to a `SkipStats` (a Counter of reasons)
and to the log as `skipped WHERE: reason: detail`. Reasons share the shard writer's vocabulary:
missing_image, decode_error, decompression_bomb, missing_caption, empty_caption, caption_not_utf8,
bad_row, truncated_tar, shard_unreadable. The samples of a truncated shard before the cut are kept.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vlmkit.data.transforms import DecodeFailure, ImageDecodeError, ImageTransform, decode
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
CAPTION_EXT, META_EXT = "txt", "json"
READ_EXTS = frozenset((*IMAGE_EXTS, CAPTION_EXT, META_EXT))  # every other member is never read
# Why a sample was skipped: one vocabulary for writing shards (`shard_writer`) and reading them.
SKIP_REASONS = (
    "missing_image",
    "decode_error",
    "decompression_bomb",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "bad_row",
    "truncated_tar",
    "shard_unreadable",
)
_TAR_END = 1024  # a complete tar ends with (at least) two 512-byte zero blocks


# ----------------------------------------------------------------------------------------------
# shard lists


def _stats_path(url: str) -> Path:
    return Path(url[: -len(SHARD_SUFFIX)] + "_stats.json")


def _parquet_path(url: str) -> Path:
    return Path(url[: -len(SHARD_SUFFIX)] + ".parquet")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shard files a spec names, in order.

    A spec is a `.tar` path, a brace pattern (`shards/{00000..00127}.tar`), a directory (all its
    `*.tar`, sorted), several of these joined by "::", or a list of them. Raises DataError naming the
    first missing shard, or for a part that is not a local `.tar` file.
    """
    parts = [str(p) for p in spec] if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "://" in part or part.startswith("pipe:"):
            raise DataError(f"{part}: only local shard files are supported; copy the shards to a local disk")
        path = Path(part).expanduser()
        if path.is_dir():
            tars = sorted(str(p) for p in path.glob(f"*{SHARD_SUFFIX}") if p.is_file())
            if not tars:
                raise DataError(f"{path} holds no {SHARD_SUFFIX} shards; write some with `vlmkit data shard`")
            urls.extend(tars)
            continue
        try:
            expanded = list(braceexpand.braceexpand(str(path)))
        except braceexpand.UnbalancedBracesError:
            raise DataError(f"{part}: unbalanced braces; write a range as {{00000..00127}}") from None
        not_tar = [u for u in expanded if not u.endswith(SHARD_SUFFIX)]
        if not_tar:
            raise DataError(f"{not_tar[0]} is not a {SHARD_SUFFIX} shard; name shard files like 00000.tar")
        missing = [u for u in expanded if not os.path.isfile(u)]
        if missing:
            raise DataError(
                f"shard not found: {missing[0]} ({len(missing)} of the {len(expanded)} shards of "
                f"{part!r} are missing); check the folder and the brace range"
            )
        urls.extend(expanded)
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    return urls


def is_shard_spec(spec: str | os.PathLike | Sequence | None) -> bool:
    """True when `spec` names shards (a .tar path, a brace pattern of them, "::" lists, or a
    directory holding *.tar files) rather than a manifest or an image folder. Never raises."""
    if spec is None:
        return False
    if isinstance(spec, (list, tuple)):
        return bool(spec) and all(str(s).endswith(SHARD_SUFFIX) for s in spec)
    s = str(spec).strip()
    if not s:
        return False
    if "::" in s or s.endswith(SHARD_SUFFIX):
        return True
    try:
        path = Path(s).expanduser()
        return path.is_dir() and any(p.is_file() for p in path.glob(f"*{SHARD_SUFFIX}"))
    except OSError:
        return False


def _as_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    return expand_shards(urls) if isinstance(urls, (str, os.PathLike)) else [str(u) for u in urls]


def count_samples(urls: str | Sequence[str]) -> int:
    """The number of samples in the shards: the sum of "successes" over their `_stats.json` files."""
    total = 0
    for url in _as_urls(urls):
        path = _stats_path(url)
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
            total += int(stats["successes"])
        except FileNotFoundError:
            raise DataError(
                f"stats file not found: {path} (needed to count the samples of {url}); "
                "re-run `vlmkit data shard` to write the shards with their stats"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(
                f'{path}: not a shard stats file with an integer "successes" ({type(e).__name__}: {e}); '
                "re-run `vlmkit data shard`"
            ) from None
    return total


# ----------------------------------------------------------------------------------------------
# decoding and skip accounting


def decode_image_bytes(data: bytes, name: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image held in memory to an upright RGB `PIL.Image` (`transforms.decode`, which also
    explains `draft_size`). `name` is used in messages. Raises `ImageDecodeError` whose reason starts
    with the skip reason: "decode_error: ..." or "decompression_bomb: ..."."""
    if not data:
        raise ImageDecodeError(name, "decode_error: empty image member")
    try:
        return decode(io.BytesIO(data), draft_size)
    except DecodeFailure as e:
        raise ImageDecodeError(name, f"{e.reason}: {e.message}") from None


def _split_reason(e: ImageDecodeError) -> tuple[str, str]:
    reason, _, detail = e.reason.partition(": ")
    return (reason, detail) if reason in SKIP_REASONS else ("decode_error", e.reason)


@dataclass
class SkipStats:
    """Samples skipped, counted by reason; each skip is also logged at WARNING on `log`."""

    counts: Counter = field(default_factory=Counter)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__), repr=False)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.log.warning("skipped %s: %s%s", where, reason, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return {k: self.counts[k] for k in sorted(self.counts) if self.counts[k]}

    def as_vector(self) -> list[int]:
        """Counts in SKIP_REASONS order (for passing between processes)."""
        return [self.counts[r] for r in SKIP_REASONS]


@dataclass
class ShardSample:
    key: str
    image_bytes: bytes
    image_ext: str  # "jpg", "png", ...
    caption: str  # stripped, non-empty
    meta: dict  # the sample's .json ({} when it has none)
    shard: str  # the shard file it came from

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}.{self.image_ext}"

    def image(self, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """The decoded RGB image (raises ImageDecodeError; see `decode_image_bytes`)."""
        return decode_image_bytes(self.image_bytes, self.name, draft_size)


def decode_sample(
    sample: ShardSample, stats: SkipStats, draft_size: tuple[int, int] | None = None
) -> Image.Image | None:
    """The sample's RGB image, or None after counting the skip in `stats` when it cannot be decoded."""
    try:
        return sample.image(draft_size)
    except ImageDecodeError as e:
        reason, detail = _split_reason(e)
        stats.skip(reason, f"{sample.shard}:{sample.key}", detail)
        return None


# ----------------------------------------------------------------------------------------------
# reading one shard


@dataclass
class _Raw:
    """One sample's members as read from a tar: {extension: bytes}."""

    url: str
    key: str
    members: dict[str, bytes]

    @property
    def complete(self) -> bool:
        return CAPTION_EXT in self.members and any(e in self.members for e in IMAGE_EXTS)


@dataclass
class _Skip:
    reason: str
    where: str
    detail: str = ""


_warned_ignored: set[str] = set()


def _tar_is_complete(f) -> bool:
    """Whether the file ends like a whole tar: a size in 512-byte blocks and two zero blocks at the end.
    (A tar cut at a member boundary otherwise reads as a shorter, valid archive.)"""
    size = os.fstat(f.fileno()).st_size
    if size % 512 or size < _TAR_END:
        return False
    return os.pread(f.fileno(), _TAR_END, size - _TAR_END) == bytes(_TAR_END)


def _read_shard(url: str, exts: frozenset[str] | Callable[[str], bool] = READ_EXTS) -> Iterator[_Raw | _Skip]:
    """The samples of one shard in order, then a _Skip if the shard is unreadable or truncated.

    Members whose extension is not in `exts` (or for which `exts(ext)` is false) are never read. A sample cut short by truncation is
    dropped (the truncated_tar skip accounts for it) unless its image and caption were both read.
    """
    try:
        f = open(url, "rb")
    except OSError as e:
        yield _Skip("shard_unreadable", url, e.strerror or str(e))
        return
    ignored: Counter = Counter()

    def select(fname: str) -> bool:
        ext = (base_plus_ext(fname)[1] or "").lower()
        if exts(ext) if callable(exts) else ext in exts:
            return True
        if ext not in READ_EXTS:
            ignored[ext] += 1
        return False

    current: _Raw | None = None
    duplicate = ""  # a member name seen twice in the current sample: the sample is dropped
    error: _Skip | None = None
    with f:
        try:
            for member in tar_file_iterator(f, select_files=select):
                key, ext = base_plus_ext(member["fname"])
                if current is None or key != current.key:
                    if current is not None:
                        yield _Skip("bad_row", f"{url}:{current.key}", duplicate) if duplicate else current
                    current, duplicate = _Raw(url, key, {}), ""
                ext = ext.lower()
                if ext in current.members:
                    duplicate = f"two members named {member['fname']}"
                current.members[ext] = member["data"]
            if not _tar_is_complete(f):
                error = _Skip("truncated_tar", url, "the file ends before the end-of-archive marker")
        except (tarfile.TarError, OSError, EOFError) as e:
            detail = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
            if isinstance(e, tarfile.ReadError) and ("end of data" in detail or "truncated" in detail):
                error = _Skip("truncated_tar", url, detail)
            else:
                error = _Skip("shard_unreadable", url, f"{type(e).__name__}: {detail}")
    if current is not None and duplicate:
        yield _Skip("bad_row", f"{url}:{current.key}", duplicate)
    elif current is not None and (error is None or current.complete):
        yield current
    if error is not None:
        yield error
    if ignored and url not in _warned_ignored:
        _warned_ignored.add(url)
        names = ", ".join(f".{e} x{n}" for e, n in sorted(ignored.items()))
        log.warning("%s: ignored members that vlmkit never reads (%s)", url, names)


def _to_sample(raw: _Raw, parse_meta: bool) -> ShardSample | _Skip:
    where = f"{raw.url}:{raw.key}"
    image_ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if image_ext is None:
        return _Skip("missing_image", where, f"no .{'/.'.join(IMAGE_EXTS)} member")
    text = raw.members.get(CAPTION_EXT)
    if text is None:
        return _Skip("missing_caption", where, "no .txt member")
    try:
        caption = text.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return _Skip("caption_not_utf8", where, f"{e.reason} at byte {e.start}")
    if not caption:
        return _Skip("empty_caption", where)
    meta: dict = {}
    if parse_meta and META_EXT in raw.members:
        try:
            meta = json.loads(raw.members[META_EXT].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _Skip("bad_row", where, f"invalid .json member ({e})")
        if not isinstance(meta, dict):
            return _Skip("bad_row", where, ".json member is not a JSON object")
    return ShardSample(raw.key, raw.members[image_ext], image_ext, caption, meta, raw.url)


def iter_samples(
    urls: str | Sequence[str],
    *,
    stats: SkipStats | None = None,
    check_images: bool = False,
) -> Iterator[ShardSample]:
    """Every usable sample of the shards, in shard and tar order, in this process.

    Bad samples and shards are skipped and counted in `stats` (and logged). With `check_images`, each
    image is also fully decoded and undecodable ones are skipped (decode_error / decompression_bomb).
    """
    stats = stats if stats is not None else SkipStats()
    for url in _as_urls(urls):
        for item in _read_shard(url):
            item = _to_sample(item, parse_meta=True) if isinstance(item, _Raw) else item
            if isinstance(item, _Skip):
                stats.skip(item.reason, item.where, item.detail)
            elif not check_images or decode_sample(item, stats) is not None:
                yield item


def iter_captions(urls: str | Sequence[str]) -> Iterator[str]:
    """The captions of the shards' samples (for training a tokenizer), without reading any image:
    from each shard's parquet when present (rows with status "success"), else its .txt members."""
    for url in _as_urls(urls):
        captions = _parquet_captions(_parquet_path(url))
        if captions is None:
            raws = (r for r in _read_shard(url, frozenset({CAPTION_EXT})) if isinstance(r, _Raw))
            captions = (r.members[CAPTION_EXT] for r in raws)
            captions = (_utf8_or_empty(c).strip() for c in captions)
        yield from (c for c in captions if c)


def _utf8_or_empty(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _parquet_captions(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        columns = [c for c in ("caption", "status") if c in schema.names]
        if "caption" not in columns:
            return None
        table = pq.read_table(path, columns=columns).to_pydict()
    except (OSError, pa.ArrowException):
        log.warning("%s: unreadable parquet, reading the captions from the shard instead", path)
        return None
    status = table.get("status") or ["success"] * len(table["caption"])
    return [c.strip() for c, s in zip(table["caption"], status) if s == "success" and isinstance(c, str)]


# ----------------------------------------------------------------------------------------------
# streaming for training


def _seed(*parts: int) -> int:
    return wds.utils.make_seed(*(int(p) for p in parts))  # deterministic for ints (unlike str hashes)


def draft_size_for(transform: ImageTransform) -> tuple[int, int]:
    """The smallest image size (w, h) that `transform` needs in full detail: its output size, divided
    by sqrt(the smallest crop area fraction) for a training transform's random crops."""
    size = transform.cfg.image_size
    if transform.train:
        size = math.ceil(size / math.sqrt(transform.cfg.crop_scale[0]))
    elif transform.cfg.resize_size:  # resized to resize_size, then cropped
        size = max(size, transform.cfg.resize_size)
    return size, size


@dataclass
class StreamPosition:
    """Where each DataLoader worker of a ShardStream is within its epoch: what a resume needs.

    `consumed[w]` is the number of items (samples and skip events, after the shuffle buffer) that
    logical worker w had used for the batches consumed so far; `next_worker` is the logical worker
    that produces the next batch (DataLoader workers take turns, one batch each)."""

    consumed: list[int]
    next_worker: int = 0


class ShardStream(torch.utils.data.IterableDataset):
    """(image tensor, caption) pairs streamed from shards with webdataset; for training.

    Shards are split over processes (`rank` / `world_size`, default: torch.distributed's) and then over
    DataLoader workers, so every (rank, worker) reads disjoint shards. With `shuffle`, the shard order
    and a `shuffle_buffer`-sample buffer are seeded by (seed, epoch, rank, worker); the training crop
    of each sample is seeded by its position, so a stream replays exactly. With `repeat`, each worker
    cycles over its shards forever (so that every process yields as many batches as the others);
    with `resampled`, every worker instead draws shards with replacement from all of them (infinite).

    `position` resumes mid-epoch: each worker skips, without decoding, the items it had used, and
    DataLoader worker j plays logical worker (j + next_worker) % num_workers, so that batches come in
    the original order. With `track_position`, items are (image, caption, (worker, consumed, skips))
    where skips counts this worker's skips so far in SKIP_REASONS order.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: ImageTransform,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        repeat: bool = False,
        resampled: bool = False,
        position: StreamPosition | None = None,
        track_position: bool = False,
        draft: bool = True,
        log: logging.Logger | None = None,
    ):
        super().__init__()
        self.urls = _as_urls(urls)
        if rank is None or world_size is None:
            rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not within world_size {world_size}")
        if not resampled and len(self.urls) < world_size:
            raise DataError(
                f"{len(self.urls)} shards for {world_size} processes: each process needs its own shard; "
                "write smaller shards (vlmkit data shard --shard-size N) or set resampled=true"
            )
        self.transform = transform
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer)
        self.repeat, self.resampled = repeat, resampled
        self.position = position
        self.track_position = track_position
        self.draft_size = draft_size_for(transform) if draft else None
        self.log = log if log is not None else logging.getLogger(__name__)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_shards(self) -> list[str]:
        """This process's shards this epoch (all of them when resampled)."""
        if self.resampled:
            return list(self.urls)
        order = list(self.urls)
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        return order[self.rank :: self.world_size]

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards that logical DataLoader worker `worker` of `num_workers` reads first."""
        return self.rank_shards()[worker::num_workers]

    def _shard_urls(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            shards = wds.ResampledShards(
                self.urls,
                seed=_seed(self.seed, self.epoch),
                worker_seed=lambda: self.rank * 100_003 + worker,
                deterministic=True,
            )
            yield from (s["url"] for s in shards)
            return
        mine = self.worker_shards(worker, num_workers)
        rounds = 0
        while mine:
            yield from mine
            rounds += 1
            if not self.repeat:
                return
            if self.shuffle:  # a new order on every pass over the worker's shards
                random.Random(_seed(self.seed, self.epoch, self.rank, worker, rounds)).shuffle(mine)

    def _items(self, worker: int, num_workers: int) -> Iterator[_Raw | _Skip]:
        """Raw samples and skip events of the worker's shards; stops after a round of shards (or, when
        resampled, 100 draws) in a row gives no sample, rather than spinning forever on bad shards."""
        patience = 100 if self.resampled else max(1, len(self.worker_shards(worker, num_workers)))
        barren = 0
        for url in self._shard_urls(worker, num_workers):
            found = False
            for item in _read_shard(url):
                found = found or isinstance(item, _Raw)
                yield item
            barren = 0 if found else barren + 1
            if barren >= patience:
                self.log.warning(
                    "%s: no usable sample in %d shards in a row; stopping this reader", url, barren
                )
                return

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = self.position
        if position is not None and len(position.consumed) != num_workers:
            raise ConfigError(
                f"the stream position has {len(position.consumed)} workers but the DataLoader has {num_workers}"
            )
        worker = (physical + (position.next_worker if position else 0)) % num_workers
        skip = position.consumed[worker] if position else 0
        stats = SkipStats(log=self.log)
        items = self._items(worker, num_workers)
        if self.shuffle:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 0x5EED))
            items = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(items)
        for index, item in enumerate(items):
            if index < skip:
                continue  # used before the resume: not decoded, its skips are already counted
            if isinstance(item, _Raw):
                item = _to_sample(item, parse_meta=False)
            if isinstance(item, _Skip):
                stats.skip(item.reason, item.where, item.detail)
                continue
            img = decode_sample(item, stats, self.draft_size)
            if img is None:
                continue
            # a training crop is seeded by the sample's place in the stream: a replay crops alike
            rng = (
                np.random.default_rng([self.seed, self.epoch, self.rank, worker, index])
                if self.transform.train
                else None
            )
            x = self.transform(img, rng)  # (3, S, S)
            if self.track_position:
                yield x, item.caption, (worker, index + 1, tuple(stats.as_vector()))
            else:
                yield x, item.caption


def load_pairs(
    urls: str | Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    stats: SkipStats | None = None,
) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Every usable (image tensor, caption) of the shards in order, in memory, for small validation
    sets; also each sample's group: its meta "source" (the original image, shared by several
    captions of one image) or else its key. Undecodable images are skipped and counted."""
    stats = stats if stats is not None else SkipStats()
    images, captions, groups = [], [], []
    for sample in iter_samples(urls, stats=stats):
        img = decode_sample(sample, stats)
        if img is None:
            continue
        images.append(transform(img))
        captions.append(sample.caption)
        groups.append(sample_group(sample))
    if not images:
        raise DataError(f"no usable samples in {urls!r} ({stats.total} skipped; see the log)")
    return images, captions, groups


def sample_group(sample: ShardSample) -> str:
    """The image a sample shows: its meta "source" when the writer recorded one, else its own key."""
    source = sample.meta.get("source")
    return str(source) if source not in (None, "") else f"{sample.shard}:{sample.key}"


def fetch_images(url: str, keys: set[str]) -> dict[str, tuple[str, bytes]]:
    """{key: (image extension, image bytes)} for the samples of shard `url` named in `keys`
    (to show a few images again after a pass); skips are not counted again here."""
    found = {}
    for item in _read_shard(url):
        if isinstance(item, _Raw) and item.key in keys:
            ext = next((e for e in IMAGE_EXTS if e in item.members), None)
            if ext is not None:
                found[item.key] = (ext, item.members[ext])
    return found
