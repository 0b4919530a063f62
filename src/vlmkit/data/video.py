"""Video files: decoding with PyAV, frame sampling with timestamps, lossless writing, manifests and shards.

    clip = read_clip("clips/000.mkv", num_frames=8)                 # uniform: the centre of 8 equal segments
    clip.frames                                                      # (8, H, W, 3) uint8
    clip.timestamps                                                  # seconds, from the stream's pts
    read_clip(path, num_frames=16, sampling="fps", fps=2.0)          # one frame every 0.5 s, at most 16
    read_clip(path, num_frames=8, sampling="keyframes")              # the encoder's keyframes, at most 8
    write_video("clip.mkv", frames, fps=8)                           # ffv1: pixel-exact

Sampling:
- "uniform" (TSN / CLIP4Clip): the video's N frames cut into `num_frames` equal segments, the middle frame of each.
  A video shorter than `num_frames` repeats frames (every index is still in order).
- "fps": the frame shown at 0, 1/fps, 2/fps, ... seconds (by timestamp); more than `num_frames` of them are
  thinned uniformly.
- "keyframes": the frames the encoder stored whole (I-frames). Which frames those are depends on the encoder
  and its settings (x264 puts one every 250 frames by default and at scene cuts; ffv1 stores every frame on its
  own; a screen recording may hold one keyframe in total): do not read meaning into keyframe positions.

Frame counts: many containers say how many frames a stream holds (mp4); others do not (mkv, webm: 0). The
count is then found by decoding the whole stream, and a container whose count is wrong (a truncated file) is
caught by decoding too: a clip whose frames run out before the sampled indices is a bad file.

Writing: libx264 in yuv420p shifts colours (chroma subsampling: up to 100 grey levels on small saturated
shapes), which would change what a synthetic clip shows. `write_video` writes ffv1 (.mkv) or libx264rgb at qp 0
(.mp4), both lossless: decoding gives back the exact pixels.

Bad files (zero bytes, not a video, no video stream, truncated) raise `VideoDecodeError` with a short reason;
datasets skip and count them as they do bad images. PyAV is an optional dependency: `pip install 'vlmkit[video]'`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})
SAMPLINGS = ("uniform", "fps", "keyframes")
_LOSSLESS = {".mkv": ("ffv1", "bgr0", {}), ".mp4": ("libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"})}


def require_av():
    """The `av` module, or a one-line ConfigError saying how to install it."""
    try:
        import av
    except ImportError:
        raise ConfigError(
            "reading video needs PyAV (its wheels carry FFmpeg): pip install 'vlmkit[video]'"
        ) from None
    return av


class VideoDecodeError(DataError):
    """A file that cannot be used as a video. `reason` is short ("empty file", "no video stream", ...)."""

    def __init__(self, where: str | os.PathLike, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = str(where)
        self.reason = reason


@dataclass
class Clip:
    """Frames sampled from one video."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: list[float]  # seconds from the stream's start, per frame
    indices: list[int]  # frame numbers in decoding order
    num_frames: int  # frames in the whole video
    fps: float  # the stream's average frame rate
    where: str = ""


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int
    codec: str
    counted: bool  # True when the container did not say and the frames were counted by decoding
    keyframes: list[int] = field(default_factory=list)  # indices of the frames the encoder stored whole


# ------------------------------------------------------------------------------------------ sampling


def uniform_indices(num_frames: int, n: int) -> list[int]:
    """The middle frame of each of `n` equal segments of a `num_frames`-frame video (repeats if it is shorter)."""
    if num_frames < 1 or n < 1:
        raise DataError(f"cannot sample {n} frames from a video of {num_frames} frames")
    return [min(num_frames - 1, int((i + 0.5) * num_frames / n)) for i in range(n)]


def fps_indices(timestamps: Sequence[float], fps: float, n: int) -> list[int]:
    """Frames shown at 0, 1/fps, 2/fps, ... seconds after the first (the last frame at or before each time),
    thinned uniformly to at most `n`."""
    if fps <= 0:
        raise ConfigError(f"sampling fps must be > 0, got {fps}")
    if not len(timestamps):
        raise DataError("cannot sample a video with no frames")
    t = np.asarray(timestamps, dtype=np.float64) - timestamps[0]
    times = np.arange(0.0, t[-1] + 1e-9, 1.0 / fps)
    picked = np.searchsorted(t, times + 1e-9, side="right") - 1  # the frame on screen at each time
    picked = list(dict.fromkeys(int(i) for i in picked))
    return [picked[i] for i in uniform_indices(len(picked), n)] if len(picked) > n else picked


def thin(indices: Sequence[int], n: int) -> list[int]:
    """At most `n` of `indices`, spread uniformly."""
    return list(indices) if len(indices) <= n else [indices[i] for i in uniform_indices(len(indices), n)]


# ------------------------------------------------------------------------------------------ decoding


def _source(video: str | os.PathLike | bytes) -> tuple[object, str]:
    if isinstance(video, bytes | bytearray):
        return io.BytesIO(video), "<bytes>"
    path = Path(video)
    if not path.is_file():
        raise VideoDecodeError(path, "missing file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file")
    return str(path), str(path)


def _open(video, where: str | None = None):
    av = require_av()
    src, name = _source(video)
    name = where or name
    try:
        container = av.open(src)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(name, f"not a readable video ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(name, "no video stream")
    return container, name


def _scan(
    video, name: str, want: Sequence[int] = ()
) -> tuple[list[float], list[bool], dict[int, np.ndarray], int]:
    """One decoding pass: every frame's time and keyframe flag, the frames in `want` as RGB arrays, and the
    count the container states (0 when it does not)."""
    av = require_av()
    container, name = _open(video, name)
    want = set(want)
    times, keys, arrays = [], [], {}
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _rate(stream)
        try:
            for i, frame in enumerate(container.decode(stream)):
                times.append(float(frame.time) if frame.time is not None else i / rate)
                keys.append(bool(frame.key_frame))
                if i in want:
                    arrays[i] = frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise VideoDecodeError(
                name, f"decoding failed ({type(e).__name__}): truncated or corrupt"
            ) from None
        said = int(stream.frames or 0)
    if not times:
        raise VideoDecodeError(name, "no frames could be decoded")
    if said > len(times):
        raise VideoDecodeError(name, f"truncated: the container says {said} frames, {len(times)} decode")
    return times, keys, arrays, said


def _rate(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 0) or 25.0


def probe(video: str | os.PathLike | bytes, where: str | None = None) -> VideoInfo:
    """Frame count, rate, size and codec, and the keyframes' indices. The stream is decoded to the end: the
    count a container states is checked (a truncated file is caught here), and counted where it says none."""
    container, name = _open(video, where)
    with container:
        stream = container.streams.video[0]
        width, height, codec, rate = stream.width, stream.height, stream.codec_context.name, _rate(stream)
    times, keys, _, said = _scan(video, name)
    n = len(times)
    return VideoInfo(n, rate, n / rate, width, height, codec, said <= 0, [i for i, k in enumerate(keys) if k])


def read_clip(
    video: str | os.PathLike | bytes,
    num_frames: int = 8,
    sampling: str = "uniform",
    fps: float | None = None,
    where: str | None = None,
) -> Clip:
    """Sample frames from a video file (or its bytes): see the module docstring for the samplings.

    Uniform sampling from a container that states its frame count decodes once; otherwise a first pass finds
    the count, timestamps and keyframes and a second converts the sampled frames. Only sampled frames are
    kept in memory. VideoDecodeError for a bad file.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown frame sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if sampling == "fps" and not fps:
        raise ConfigError("sampling='fps' needs fps= (frames per second to keep)")
    if num_frames < 1:
        raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
    container, name = _open(video, where)
    with container:
        stream = container.streams.video[0]
        said, rate = int(stream.frames or 0), _rate(stream)
    picked = uniform_indices(said, num_frames) if sampling == "uniform" and said > 0 else None
    times, keys, arrays, _ = _scan(video, name, picked or ())
    if picked is None:
        if sampling == "uniform":
            picked = uniform_indices(len(times), num_frames)
        elif sampling == "fps":
            picked = fps_indices(times, float(fps), num_frames)
        else:
            picked = thin([i for i, k in enumerate(keys) if k], num_frames)
        _, _, arrays, _ = _scan(video, name, picked)
    frames = np.stack([arrays[i] for i in picked])  # (T, H, W, 3)
    return Clip(frames, [times[i] for i in picked], list(picked), len(times), rate, name)


def write_video(path: str | os.PathLike, frames: np.ndarray | Sequence[np.ndarray], fps: int = 8) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames losslessly: ffv1 in .mkv or libx264rgb at qp 0 in .mp4."""
    av = require_av()
    path = Path(path)
    if path.suffix.lower() not in _LOSSLESS:
        raise ConfigError(f"{path}: lossless video is written as .mkv (ffv1) or .mp4 (libx264rgb qp 0)")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ConfigError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    codec, pix_fmt, options = _LOSSLESS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = dict(options)
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())
    return path


def video_file_problem(path: Path) -> str:
    """Why `path` cannot be a video file without opening it ("video PATH: missing file", ...), or ""."""
    if not is_video(path):
        return f"video {path}: not a video file extension ({', '.join(sorted(VIDEO_EXTENSIONS))})"
    if not path.is_file():
        return f"video {path}: missing file"
    if path.stat().st_size == 0:
        return f"video {path}: empty file"
    return ""


def is_video_manifest(path: str | Path) -> bool:
    """Whether a manifest's rows name videos (a `video` key or column) rather than images."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                if path.suffix.lower() in (".jsonl", ".json"):
                    return '"video"' in line
                cells = line.lower().split("\t" if path.suffix.lower() == ".tsv" else ",")
                return "video" in [c.strip() for c in cells]
    return False


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


# ------------------------------------------------------------------------------------------ manifests and shards


@dataclass
class VideoSample:
    video: Path | bytes  # a file, or a shard member's bytes
    caption: str
    where: str  # FILE:LINE or SHARD:KEY, for messages
    fields: dict = field(default_factory=dict)  # the row's other keys


def read_video_manifest(path: str | os.PathLike) -> tuple[list[VideoSample], list]:
    """(good rows, BadRow list) of a video manifest: JSONL with `{"video": ..., "caption": ...}` per line, or
    CSV / TSV with `video` and `caption` columns; paths relative to the manifest's folder. A row is bad when it
    is malformed, lacks a key, has an empty caption or names a missing, empty or non-video file. The videos are
    not decoded here (`VideoClips` does that, and skips and counts the ones that fail)."""
    from vlmkit.data.manifest import MANIFEST_DELIMITERS, BadRow, _csv_rows, _json_rows, read_utf8

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video manifest not found: {path} (a .jsonl, .csv or .tsv with video and caption)")
    if path.suffix.lower() not in MANIFEST_DELIMITERS:
        raise DataError(f"{path}: unknown manifest extension {path.suffix!r}; use .jsonl, .csv or .tsv")
    delimiter = MANIFEST_DELIMITERS[path.suffix.lower()]
    text = read_utf8(path)
    rows = (
        _json_rows(text, path)
        if delimiter is None
        else _csv_rows(text, path, delimiter, required=("video", "caption"))
    )
    good, bad = [], []
    for line, row, reason in rows:
        if row is not None:
            reason = ""
            video, caption = row.get("video"), row.get("caption")
            if not isinstance(video, str) or not video.strip():
                reason = "missing key 'video'" if video is None else "'video' must be a non-empty path"
            elif not isinstance(caption, str) or not caption.strip():
                reason = "missing key 'caption'" if caption is None else "empty caption"
            else:
                file = path.parent / Path(video.strip()).expanduser()
                reason = video_file_problem(file)
                if not reason:
                    fields = {k: v for k, v in row.items() if k not in ("video", "caption")}
                    good.append(VideoSample(file, caption.strip(), f"{path}:{line}", fields))
                    continue
        bad.append(BadRow(str(path), line, reason))
    return good, bad


def iter_video_shards(urls, stats=None) -> Iterator[VideoSample]:
    """The video samples of WebDataset shards in order: `{key}.mp4|mkv|webm|...` with `{key}.txt` (the caption)
    and an optional `{key}.json`. Samples without a video or caption are skipped and counted in `stats`
    (a `vlmkit.data.shards.SkipStats`); videos are decoded later."""
    import json

    from vlmkit.data.shards.read import _read_shard, _Skip, expand_shards

    exts = frozenset(e.lstrip(".") for e in VIDEO_EXTENSIONS) | {"txt", "json"}
    for url in expand_shards(urls):
        for raw in _read_shard(url, exts):
            if isinstance(raw, _Skip):
                if stats is not None:
                    stats.skip(raw.reason, raw.where, raw.detail)
                continue
            where = f"{raw.url}:{raw.key}"
            ext = next((e for e in sorted(raw.members) if "." + e in VIDEO_EXTENSIONS), None)
            caption = raw.members.get("txt", b"").decode("utf-8", errors="replace").strip()
            if ext is None or not caption:
                if stats is not None:
                    stats.skip("missing_image" if ext is None else "empty_caption", where, "video sample")
                continue
            meta = {}
            if "json" in raw.members:
                try:
                    meta = json.loads(raw.members["json"])
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
            yield VideoSample(raw.members[ext], caption, where, meta if isinstance(meta, dict) else {})


def write_video_shards(
    samples: Sequence[VideoSample], out: str | os.PathLike, shard_size: int = 1000
) -> list[dict]:
    """Video samples (from `read_video_manifest`) into `out/{00000..}.tar`: the video's bytes as they are,
    the caption and the row's other keys. Returns the per-shard stats."""
    from vlmkit.data.shards.write import ShardWriter

    with ShardWriter(out, shard_size=shard_size) as writer:
        for s in samples:
            data = s.video if isinstance(s.video, bytes) else Path(s.video).read_bytes()
            ext = "mkv" if isinstance(s.video, bytes) else Path(s.video).suffix.lstrip(".").lower()
            writer.add_success(data, ext, s.caption, {**s.fields, "source": s.where})
    return writer.stats


def load_video_samples(
    spec: str | os.PathLike, log_: logging.Logger | None = None
) -> tuple[list[VideoSample], list]:
    """Video samples from a manifest or a shard spec, with the bad rows / skipped samples as strings."""
    from vlmkit.data.shards import SkipStats, is_shard_spec

    if is_shard_spec(spec):
        stats = SkipStats(log=log_ or log)
        samples = list(iter_video_shards(spec, stats))
        return samples, [f"{reason} x{n}" for reason, n in stats.as_dict().items() if n]
    samples, bad = read_video_manifest(spec)
    return samples, [str(b) for b in bad]


class VideoClips(torch.utils.data.Dataset):
    """Clips and captions from a video manifest or shards: item -> (uint8 frames (T, 3, S, S), caption, reversed
    caption). A row's optional `reversed_caption` says what the clip shows played backwards ("" when absent).

    Every video is decoded once on construction (`num_frames` sampled uniformly) and kept; a bad file
    (zero bytes, not a video, no video stream, truncated) is skipped, logged as `skipped WHERE: reason` and
    counted in `bad_rows`, as bad images are; DataError when the bad fraction passes `max_bad_fraction`. With a
    training transform every frame of a clip gets the same random crop (drawn from `(seed, epoch, i)`); frames
    are never flipped (a flip would turn "left" into "right").
    """

    def __init__(self, spec, transform, num_frames: int = 8, max_bad_fraction: float = 0.01, seed: int = 0,
                 log_: logging.Logger | None = None, progress: bool = False):  # fmt: skip
        from tqdm import tqdm

        log_ = log_ or log
        self.file, self.transform, self.num_frames, self.seed, self.epoch = (
            str(spec),
            transform,
            num_frames,
            seed,
            0,
        )
        samples, bad = load_video_samples(spec, log_)
        total = len(samples) + len(bad)
        self.samples, self.clips = [], []
        for s in tqdm(samples, desc="decoding videos", unit="video", disable=not progress):
            try:
                clip = read_clip(s.video, num_frames, where=s.where)
            except VideoDecodeError as e:
                bad.append(f"{s.where}: {e.reason}")
                continue
            self.samples.append(s)
            self.clips.append(clip.frames)
        self.bad_rows = bad
        for b in bad:
            log_.warning("skipped %s", b)
        if not self.samples:
            raise DataError(f"no usable videos in {self.file} ({len(bad)} bad rows; see the log)")
        if len(bad) / max(total, 1) > max_bad_fraction:
            raise DataError(
                f"{len(bad)} of {total} rows in {self.file} are bad ({100 * len(bad) / total:.1f}%), above the limit "
                f"of {100 * max_bad_fraction:.1f}%; see the log, fix them or raise --max-bad-fraction"
            )
        self.captions = [s.caption for s in self.samples]
        # what each clip shows played backwards, where the row says (a "reversed_caption" key); "" if not
        self.reversed_captions = [str(s.fields.get("reversed_caption") or "").strip() for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        """(frames (T, 3, S, S), caption, reversed caption or "")."""
        x = frames_tensor(self.clips[i], self.transform, [self.seed, self.epoch, i])
        return x, self.captions[i], self.reversed_captions[i]


def frames_tensor(frames: np.ndarray, transform, seed=None) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames through an ImageTransform, one crop for all: (T, 3, S, S) (uint8 or float,
    as the transform returns)."""
    from PIL import Image

    out = []
    for f in frames:
        rng = np.random.default_rng(seed) if seed is not None else None  # the same draw for every frame
        out.append(transform(Image.fromarray(f), rng))
    return torch.stack(out)
