"""Write image-text data as WebDataset tar shards, the way img2dataset lays them out.

(Over 500 lines: resizing, encoding, worker processes, the per-shard stats and the failure accounting
of one writer, which must agree byte for byte across worker counts.)

    OUT/00000.tar            {key}.jpg, {key}.txt (UTF-8 caption), {key}.json per successful sample
    OUT/00000_stats.json     count, successes, failed, failures by reason, timing
    OUT/00000.parquet        one row per input, failed ones included with their reason

`ShardWriter` writes already-encoded samples (curation uses it to copy kept subsets); `write_shards`
reads any input `vlmkit.data.shards.ingest.open_input` understands, decodes, resizes and re-encodes every image,
and writes shards on a pool of worker processes, one whole shard per task. Keys depend only on an
input's position (shard i holds inputs [i * shard_size, (i + 1) * shard_size)), so the shards are
byte-identical for any number of workers. Bad inputs are skipped, logged and counted, never fatal.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from queue import Empty

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageColor
from tqdm import tqdm

from vlmkit.data.shards.ingest import Chunk, InputRecord, InputSource, open_input
from vlmkit.data.shards.read import SKIP_REASONS
from vlmkit.data.transforms import DecodeFailure, center_crop_box, decode
from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
FAILURE_REASONS = SKIP_REASONS  # the readers' vocabulary: a failure here is a skip there
PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's own default
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ]
)
_WRITER_KEYS = ("key", "caption", "status", "error_message")  # set by the writer, not taken from meta
_SHARD_FILE = re.compile(r"^\d{5,}(\.tar|\.parquet|_stats\.json)$")
_TEMP_FILE = re.compile(r"^\.\d{5,}(\.tar|\.parquet|_stats\.json)\..*\.tmp$")


class SampleError(Exception):
    """Why one input was skipped: `reason` from FAILURE_REASONS and a short `detail`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------
# the writer


def _file_mode() -> int:
    umask = os.umask(0)  # read the umask (there is no getter); restored at once
    os.umask(umask)
    return 0o666 & ~umask


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside `path`, readable as a normally created file would be (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, _file_mode())
    return fd, tmp


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temporary path)`, then rename the file to `path`: readers never see half a file."""
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """Write samples into `out_dir/{shard:05d}.tar`, `shard_size` inputs per shard, with the per-shard
    `_stats.json` and `.parquet`.

    Every input, failed or not, takes the next key `f"{shard:05d}{index:0{key_width}d}"` (img2dataset's
    scheme); failures appear only in the parquet. A tar is written under a temporary name and renamed
    when complete, then its parquet and finally its stats file. Tar headers are fixed (mtime 0, owner
    0), so the same samples give the same bytes. Use as a context manager, or call `close()`; on an
    exception inside `with`, the unfinished shard is deleted. Files of the same names are overwritten.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_size: int = 10_000,
        start_shard: int = 0,
        key_width: int | None = None,
    ):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")
        min_width = len(str(shard_size - 1))
        if key_width is not None and key_width < min_width:
            raise ConfigError(
                f"key_width {key_width} is too small for shard_size {shard_size} (needs {min_width})"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.key_width = key_width if key_width is not None else min_width
        self.stats: list[dict] = []
        self._shard_id = start_shard
        self._index = 0  # inputs in the current shard
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: str | None = None
        self._rows: list[dict] = []
        self._failures: Counter = Counter()
        self._successes = 0
        self._start_time = 0.0

    @property
    def shard_name(self) -> str:
        return f"{self._shard_id:05d}.tar"

    def _open(self) -> None:
        fd, self._tmp = _temp_file(self.out_dir / self.shard_name)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._start_time = time.time()

    def _next_key(self) -> str:
        if self._tar is None:
            self._open()
        return f"{self._shard_id:05d}{self._index:0{self.key_width}d}"

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # fixed headers: identical input gives identical bytes
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_success(self, image_bytes: bytes, ext: str, caption: str, meta: dict) -> str:
        """Add a sample: `{key}.{ext}` (bytes as given), `{key}.txt`, `{key}.json` (`meta` plus key,
        caption, status, error_message). Returns the key."""
        ext = ext.lower().lstrip(".")
        if not ext.isalnum():
            raise ValueError(f"image extension must be alphanumeric, like 'jpg', got {ext!r}")
        key = self._next_key()
        record = {"key": key, "caption": caption}
        record.update((k, v) for k, v in meta.items() if k not in _WRITER_KEYS)
        record.update(status="success", error_message=None)
        self._add_member(f"{key}.{ext}", image_bytes)
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self._rows.append(self._row(key, caption, meta.get("source"), "success", None, meta))
        self._successes += 1
        self._advance()
        return key

    def add_members(self, record: dict, images: list[tuple[str, bytes]], source: str | None = None) -> str:
        """Add a sample of several images (an interleaved document): `{key}.json` (`record`) and each image
        as `{key}.{name}` (bytes as given; names like "0.png"). Returns the key."""
        key = self._next_key()
        for name, data in images:
            self._add_member(f"{key}.{name}", data)
        self._add_member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self._rows.append(self._row(key, None, source, "success", None, {}))
        self._successes += 1
        self._advance()
        return key

    def add_failure(self, source: str, reason: str, detail: str = "", caption: str | None = None) -> None:
        """Record an input that was skipped: it takes a key and a parquet row, but nothing in the tar."""
        key = self._next_key()
        message = f"{reason}: {detail}" if detail else reason
        self._rows.append(self._row(key, caption, source, "failed", message, {}))
        self._failures[reason] += 1
        self._advance()

    @staticmethod
    def _row(key, caption, source, status, error_message, meta) -> dict:
        row = {
            "key": key,
            "caption": caption,
            "source": source,
            "status": status,
            "error_message": error_message,
        }
        for k in ("width", "height", "original_width", "original_height"):
            row[k] = meta.get(k)
        return row

    def _advance(self) -> None:
        self._index += 1
        if self._index == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        name = self.shard_name
        os.replace(self._tmp, self.out_dir / name)
        stem = f"{self._shard_id:05d}"
        table = pa.Table.from_pylist(self._rows, schema=PARQUET_SCHEMA)
        _atomic_write_bytes(self.out_dir / f"{stem}.parquet", lambda tmp: pq.write_table(table, tmp))
        end = time.time()
        stats = {
            "shard": name,
            "count": self._index,
            "successes": self._successes,
            "failed": self._index - self._successes,
            "failures": dict(sorted(self._failures.items())),
            "start_time": self._start_time,
            "end_time": end,
            "duration_s": round(end - self._start_time, 3),
        }
        text = json.dumps(stats, indent=2) + "\n"
        _atomic_write_bytes(self.out_dir / f"{stem}_stats.json", lambda tmp: Path(tmp).write_text(text))
        self.stats.append(stats)
        self._shard_id += 1
        self._index = self._successes = 0
        self._tar = self._file = self._tmp = None
        self._rows, self._failures = [], Counter()

    def close(self) -> list[dict]:
        """Finish the last, partly filled shard; returns every shard's stats dict. Safe to call twice."""
        if self._tar is not None:
            self._finish_shard()
        return self.stats

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file); finished shards stay."""
        if self._tar is not None:
            self._file.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar = self._file = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------------
# decoding, resizing, encoding


def parse_colour(text: str | tuple | list) -> tuple[int, int, int]:
    """'R,G,B', '#rrggbb' or a colour name ('white') -> (r, g, b)."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    elif "," in text:
        parts = [p.strip() for p in text.split(",")]
    else:
        try:
            return ImageColor.getrgb(text.strip())[:3]
        except ValueError:
            raise ConfigError(
                f"unknown colour {text!r}; use R,G,B (e.g. 255,255,255), #rrggbb or a name"
            ) from None
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"colour {text!r} must be three integers 0-255, e.g. 255,255,255")
    return rgb


@dataclass
class ImageOptions:
    """How each image is stored. `max_image_pixels` is Pillow's decompression-bomb limit
    (default: `Image.MAX_IMAGE_PIXELS` when the options are made); it is never switched off."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"  # one of RESIZE_MODES
    resize_only_if_bigger: bool = False
    pad_colour: tuple[int, int, int] = (255, 255, 255)  # "border" mode padding
    encode_format: str = "jpg"  # one of ENCODE_FORMATS
    quality: int = 95  # jpg and webp
    max_image_pixels: int | None = None

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.image_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {self.resize_mode!r}; use one of {list(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ConfigError(
                f"unknown encode format {self.encode_format!r}; use one of {list(ENCODE_FORMATS)}"
            )
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be an integer from 1 to 100, got {self.quality!r}")
        self.pad_colour = parse_colour(self.pad_colour)
        if self.max_image_pixels is None:
            self.max_image_pixels = Image.MAX_IMAGE_PIXELS or PILLOW_MAX_IMAGE_PIXELS
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            raise ConfigError(f"max image pixels must be a positive integer, got {self.max_image_pixels!r}")


def resize_image(
    img: Image.Image,
    size: int,
    mode: str = "keep_ratio",
    only_if_bigger: bool = False,
    pad_colour: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Resize an RGB image as img2dataset's resize modes do.

    keep_ratio: shorter side to `size`, aspect kept (long side rounded). center_crop: shorter side to
    `size`, then the centre `size` x `size` (one resize over the crop box, as `center_crop_box`).
    border: longer side to `size`, then centred on a `size` x `size` canvas of `pad_colour`. no: as is.
    With `only_if_bigger`, images whose shorter side (longer side for border) is at most `size` stay
    as they are.
    """
    w, h = img.size
    resample = Image.Resampling.LANCZOS
    if mode == "no":
        return img
    if mode == "keep_ratio":
        if only_if_bigger and min(w, h) <= size:
            return img
        new = (size, max(1, round(h * size / w))) if w <= h else (max(1, round(w * size / h)), size)
        return img if new == (w, h) else img.resize(new, resample)
    if mode == "center_crop":
        if only_if_bigger and min(w, h) <= size:
            return img
        return img.resize((size, size), resample, box=center_crop_box(w, h, size))
    if mode == "border":
        if only_if_bigger and max(w, h) <= size:
            return img
        new = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
        if new != (w, h):
            img = img.resize(new, resample)
        canvas = Image.new("RGB", (size, size), tuple(pad_colour))
        canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
        return canvas
    raise ConfigError(f"unknown resize mode {mode!r}; use one of {list(RESIZE_MODES)}")


def decode_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Encoded bytes -> upright RGB image (`transforms.decode`), or `SampleError` decode_error /
    decompression_bomb, with Pillow's guard at `max_image_pixels`. (Setting the global limit for the
    call is safe here: each process decodes on one thread.)
    """
    if not data:
        raise SampleError("decode_error", "empty image data")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        return decode(io.BytesIO(data))
    except DecodeFailure as e:
        limit = " (limit: --max-image-pixels)" if e.kind == "too_large" else ""
        raise SampleError(e.reason, e.message + limit) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def encode_image(img: Image.Image, encode_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    fmt = ENCODE_FORMATS[encode_format]
    if fmt == "PNG":
        img.save(buf, fmt)
    else:
        img.save(buf, fmt, quality=quality)
    return buf.getvalue()


def caption_text(rec: InputRecord) -> str:
    """The record's caption as text, or `SampleError` missing_caption / caption_not_utf8 / empty_caption.
    Bytes are decoded as strict UTF-8; text is returned unchanged (so it is written byte-identical)."""
    caption = rec.caption
    if caption is None:
        raise SampleError("missing_caption", "no caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("caption_not_utf8", f"{e.reason} at byte {e.start}") from None
    else:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from "\ud800" in JSON
            raise SampleError("caption_not_utf8", f"{e.reason} at character {e.start}") from None
    if not caption.strip():
        raise SampleError("empty_caption", "caption is empty or blank")
    return caption


def _image_bytes(rec: InputRecord) -> bytes:
    if rec.image is None:
        raise SampleError("missing_image", "no image in this input")
    if isinstance(rec.image, bytes):
        return rec.image
    try:
        return Path(rec.image).read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_image", f"file not found: {rec.image}") from None
    except OSError as e:
        raise SampleError("missing_image", f"unreadable file {rec.image} ({e.strerror})") from None


def prepare_sample(rec: InputRecord, opts: ImageOptions) -> tuple[bytes, str, dict]:
    """One input -> (encoded image, caption, meta for `ShardWriter.add_success`), or `SampleError`."""
    if rec.failure is not None:
        raise SampleError(*rec.failure)
    caption = caption_text(rec)  # cheap checks first
    img = decode_image(_image_bytes(rec), opts.max_image_pixels)
    original = img.size
    img = resize_image(img, opts.image_size, opts.resize_mode, opts.resize_only_if_bigger, opts.pad_colour)
    meta = {
        "source": rec.source,
        "width": img.width,
        "height": img.height,
        "original_width": original[0],
        "original_height": original[1],
    }
    if rec.extra:
        meta["extra"] = rec.extra
    return encode_image(img, opts.encode_format, opts.quality), caption, meta


# ----------------------------------------------------------------------------------------------
# writing a whole input on a process pool


@dataclass
class _ShardTask:
    chunk: Chunk
    shard_id: int
    out_dir: str
    shard_size: int
    key_width: int
    opts: ImageOptions


_REPORT_EVERY = 16
_progress_queue = None  # set in each pool worker


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def _run_task(task: _ShardTask, report: Callable[[int], None]) -> tuple[dict, list[tuple[str, str, str]]]:
    """Write one shard; returns (its stats, [(source, reason, detail) per failure])."""
    failures, pending = [], 0
    with ShardWriter(task.out_dir, task.shard_size, task.shard_id, task.key_width) as writer:
        for rec in task.chunk:
            try:
                image, caption, meta = prepare_sample(rec, task.opts)
            except SampleError as e:
                try:
                    caption = caption_text(rec) if rec.failure is None else None
                except SampleError:
                    caption = None
                writer.add_failure(rec.source, e.reason, e.detail, caption)
                failures.append((rec.source, e.reason, e.detail))
            else:
                writer.add_success(image, task.opts.encode_format, caption, meta)
            pending += 1
            if pending == _REPORT_EVERY:
                report(pending)
                pending = 0
    if pending:
        report(pending)
    return writer.stats[0], failures


def _run_task_in_worker(task: _ShardTask) -> tuple[dict, list[tuple[str, str, str]]]:
    return _run_task(task, _progress_queue.put)


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if _SHARD_FILE.match(p.name))
    if existing and not overwrite:
        raise ConfigError(
            f"{out} already holds shards ({existing[0].name}, ...); choose an empty folder or pass --overwrite"
        )
    for p in existing:
        p.unlink()
    for p in out.iterdir():  # temporary files left by an interrupted run
        if _TEMP_FILE.match(p.name):
            p.unlink()


def write_shards(
    input: str | os.PathLike | InputSource,
    out: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    image_size: int = 256,
    resize_mode: str = "keep_ratio",
    resize_only_if_bigger: bool = False,
    pad_colour: str | tuple[int, int, int] = (255, 255, 255),
    encode_format: str = "jpg",
    quality: int = 95,
    workers: int | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    classes_file: str | os.PathLike | None = None,
    positional_classes: bool = False,
    max_image_pixels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Read `input` (see `open_input`), write shards of `shard_size` inputs to `out`, return totals.

    Each image is decoded, made RGB, resized (`resize_image`) and encoded as `encode_format`; captions
    are written as given (UTF-8). `workers` processes (default `default_workers()`) each write whole
    shards; the output does not depend on their number. `out` must not already hold shards unless
    `overwrite`. Totals: {"input", "out", "samples", "successes", "failed", "failures": {reason: n},
    "shards", "seconds"}.
    """
    t0 = time.time()
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard size must be a positive integer, got {shard_size!r}")
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    opts = ImageOptions(
        image_size, resize_mode, resize_only_if_bigger, pad_colour, encode_format, quality, max_image_pixels
    )
    source = (
        input
        if isinstance(input, InputSource)
        else open_input(
            input,
            image_column=image_column,
            text_column=text_column,
            split=split,
            classes_file=classes_file,
            positional_classes=positional_classes,
        )
    )
    n = len(source)
    if n == 0:
        raise DataError(f"{source.description} holds no inputs")
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    num_shards = math.ceil(n / shard_size)
    key_width = len(str(shard_size - 1))
    tasks = (
        _ShardTask(
            source.chunk(i * shard_size, min(n, (i + 1) * shard_size)),
            i,
            str(out),
            shard_size,
            key_width,
            opts,
        )
        for i in range(num_shards)
    )
    workers = min(workers, num_shards)
    log.info(
        "sharding %d inputs from %s into %d shards on %d worker(s)",
        n,
        source.description,
        num_shards,
        workers,
    )

    all_stats: list[dict] = []
    failures: Counter = Counter()
    bar = tqdm(total=n, unit="sample", desc="shard", disable=not progress, dynamic_ncols=True)

    def finished(result: tuple[dict, list]) -> None:
        stats, skipped = result
        all_stats.append(stats)
        failures.update(stats["failures"])
        for src, reason, detail in skipped:
            log.warning("skipped %s: %s (%s)", src, reason, detail)
        bar.set_postfix(failed=sum(failures.values()), refresh=False)

    with bar:
        if workers == 1:
            for task in tasks:
                finished(_run_task(task, bar.update))
        else:
            ctx = get_context("spawn")  # fork is unsafe once torch or threads are loaded
            queue = ctx.Queue()
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
            try:
                pending = set()
                for task in tasks:
                    # keep a few tasks queued per worker rather than describing every chunk up front
                    while len(pending) >= 2 * workers:
                        pending = _drain(pending, queue, bar, finished)
                    pending.add(pool.submit(_run_task_in_worker, task))
                while pending:
                    pending = _drain(pending, queue, bar, finished)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        bar.update(n - bar.n)  # progress messages may still be in flight

    all_stats.sort(key=lambda s: s["shard"])
    totals = {
        "input": source.description,
        "out": str(out),
        "samples": sum(s["count"] for s in all_stats),
        "successes": sum(s["successes"] for s in all_stats),
        "failed": sum(s["failed"] for s in all_stats),
        "failures": dict(sorted(failures.items())),
        "shards": len(all_stats),
        "seconds": round(time.time() - t0, 2),
    }
    log.info(
        "wrote %d shards to %s: %d of %d samples, %d failed%s",
        totals["shards"],
        out,
        totals["successes"],
        totals["samples"],
        totals["failed"],
        f" {totals['failures']}" if totals["failures"] else "",
    )
    return totals


def _drain(pending: set, queue, bar: tqdm, finished: Callable) -> set:
    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
    while True:
        try:
            bar.update(queue.get_nowait())
        except Empty:
            break
    for f in done:
        finished(f.result())
    return pending


# ----------------------------------------------------------------------------------------------
# CLI
