"""Image loading and preprocessing with Pillow + NumPy (no torchvision).

`load_image` turns a file into an RGB `PIL.Image` or raises `ImageDecodeError` with a short reason.
`ImageTransform` turns an RGB image into a normalised `(3, S, S)` float tensor: shortest-side resize +
centre crop for evaluation (as transformers' `CLIPImageProcessor`), random resized crop for training.
Each crop+resize is a single `Image.resize(..., box=...)` call, so only the pixels that are kept get
resampled.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from vlmkit.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESS_FILE = "preprocess.json"  # written beside a model's weights

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
RESIZE_MODES = ("shortest", "squash")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(ValueError):
    """A file that cannot be used as an image. `reason` is short ("missing file", "empty file", ...)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# decoding


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to uint8 by scaling, never by clipping."""
    if mode.startswith("I;16"):
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    # "I" (int32) and "F" (float32) do not record the bit depth of the data they hold, so infer it
    # from the value range: [0, 1] floats, 8-bit, 16-bit, else stretch min..max.
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.round(np.clip(a, 0.0, 255.0)).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Return `img` upright (EXIF orientation applied) and in RGB mode.

    Transparent pixels are composited over `background`; 16/32-bit and float greyscale are scaled
    (not clipped) to 8 bits. An RGB image with no EXIF rotation is returned as is.
    """
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L")
        return img.convert("RGB")
    # A palette (or L / RGB) image with a `transparency` key hides pixels through that key: go through
    # RGBA so they get the background rather than the palette colour.
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(background))
        out.paste(rgba, mask=rgba.getchannel("A"))  # out = fg * a + bg * (1 - a)
        return out
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV, ...


def check_image_file(path: str | os.PathLike) -> None:
    """Cheap checks before decoding: raise `ImageDecodeError` for a missing, non-regular or empty file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageDecodeError(path, "missing file") from None
    except OSError as e:
        raise ImageDecodeError(path, f"unreadable file ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(path, "not a file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file")


class DecodeFailure(Exception):
    """Why `decode` could not make an image: `kind` is "unrecognised", "too_large" or "corrupt".

    `reason` is the skip reason the data pipelines count it under ("decode_error" or "decompression_bomb")
    and `message` the words every caller reports it with."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind, self.detail = kind, detail

    @property
    def reason(self) -> str:
        return "decompression_bomb" if self.kind == "too_large" else "decode_error"

    @property
    def message(self) -> str:
        return {
            "unrecognised": "not an image file (format not recognised)",
            "too_large": f"image too large: {self.detail}",
            "corrupt": f"truncated or corrupt image: {self.detail}",
        }[self.kind]


def decode(fp, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode the image in the binary file object `fp` to RGB (see `to_rgb`), or `DecodeFailure`.

    Pillow's decompression-bomb guard, `Image.MAX_IMAGE_PIXELS`, refuses images above the limit, not
    only above twice it as Pillow does. With `draft_size` (w, h), a JPEG at least 4x that size in both
    directions is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps it at least twice
    `draft_size`, as `Image.thumbnail` does: much faster, and what follows is still a >= 2x reduction.
    The callers (`load_image`, shard reading and writing) word the failure for their own reports.
    """
    try:
        img = Image.open(fp)  # reads the header only
    except Image.UnidentifiedImageError:
        raise DecodeFailure("unrecognised") from None
    except Image.DecompressionBombError as e:
        raise DecodeFailure("too_large", f"{e} (Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})") from None
    except Exception as e:  # decoders raise many exception types on corrupt bytes
        raise DecodeFailure("corrupt", str(e)) from None
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a data pipeline should refuse.
    # (Checked here rather than by turning the warning into an error: warnings.catch_warnings
    # changes process-wide state, which races when images are decoded on several threads.)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise DecodeFailure(
            "too_large",
            f"{img.width} x {img.height} pixels exceeds limit of {limit} (Image.MAX_IMAGE_PIXELS)",
        )
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (2 * draft_size[0], 2 * draft_size[1]))
        img.load()  # decode now: truncated data fails here, not inside a training step
        return to_rgb(img)
    except Exception as e:
        raise DecodeFailure("corrupt", str(e)) from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read and fully decode an image file as RGB (see `to_rgb`).

    Raises `ImageDecodeError` with reason "missing file", "empty file", "not an image file ...",
    "image too large ..." (Pillow's decompression-bomb guard, `Image.MAX_IMAGE_PIXELS`) or
    "truncated or corrupt image: ...".
    """
    check_image_file(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageDecodeError(path, f"unreadable file ({e.strerror})") from None
    with f:
        try:
            return decode(f)
        except DecodeFailure as e:
            raise ImageDecodeError(path, e.message) from None


# ----------------------------------------------------------------------------------------------
# preprocessing


@dataclass
class PreprocessConfig:
    """How images become model inputs; saved as `preprocess.json` beside a model."""

    image_size: int = 224  # output is (3, image_size, image_size)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    resize_mode: str = "shortest"  # eval: "shortest" side to S then centre crop, or "squash" to S x S
    resize_size: int | None = None  # eval "shortest": resize the short side to this, then crop S (None: S)
    # eval "shortest": resize the whole image, then crop, step for step as transformers' CLIPImageProcessor
    # (set for Hugging Face models). Off, only the kept box is resampled: faster, but Pillow then runs its
    # two 8-bit passes over other rows, which moves bicubic/lanczos results by a few grey levels (more on
    # noise) and makes nearest/box pick neighbouring pixels.
    resize_then_crop: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)  # train: crop area as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # train: crop width / height, sampled log-uniformly

    def __post_init__(self):
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.crop_scale, self.crop_ratio = tuple(self.crop_scale), tuple(self.crop_ratio)
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"preprocess image_size must be a positive integer, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("preprocess mean and std need 3 values each, with std > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"unknown preprocess interpolation {self.interpolation!r}; use one of {list(INTERPOLATIONS)}"
            )
        if self.resize_size is not None and (
            not isinstance(self.resize_size, int) or self.resize_size < self.image_size
        ):
            raise ConfigError(
                f"preprocess resize_size must be an integer >= image_size ({self.image_size}), got {self.resize_size!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"unknown preprocess resize_mode {self.resize_mode!r}; use one of {list(RESIZE_MODES)}"
            )
        s, r = self.crop_scale, self.crop_ratio
        if not (len(s) == 2 and 0 < s[0] <= s[1] <= 1):
            raise ConfigError(f"preprocess crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {s}")
        if not (len(r) == 2 and 0 < r[0] <= r[1]):
            raise ConfigError(f"preprocess crop_ratio must be (lo, hi) with 0 < lo <= hi, got {r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/preprocess.json` and return its path."""
        path = Path(directory) / PREPROCESS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read a `preprocess.json` file, or the one inside a model directory."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESS_FILE
        if not path.is_file():
            raise ConfigError(f"preprocess config not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of preprocess settings")
        return cls.from_dict(d)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop (left, top, right, bottom) as in the standard RandomResizedCrop algorithm.

    Area fraction ~ U(scale), aspect ratio (w / h) ~ log-uniform(ratio); up to 10 tries for a crop that
    fits, else the largest centre crop whose aspect ratio lies within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def shortest_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `short`; the longer side is rounded down, as
    transformers' image processors do."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_box(
    width: int, height: int, size: int, resize_size: int | None = None
) -> tuple[float, float, float, float]:
    """The source box (left, top, right, bottom) that "resize shortest side to `resize_size` (default
    `size`), then centre crop `size`" keeps. The resized long side is rounded down, as transformers'
    CLIPImageProcessor does, and the crop offset is floor((resized - size) / 2).
    """
    new_w, new_h = shortest_side_size(width, height, size if resize_size is None else resize_size)
    sx, sy = width / new_w, height / new_h  # source pixels per resized pixel
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


# torch resamples uint8 images with antialiasing 3-5x faster than Pillow (vectorised, channels-last);
# its antialiased filters are Pillow's (bicubic with a = -0.5), so the two agree to about a grey level.
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}


class ImageTransform:
    """RGB image -> normalised float tensor (3, S, S); random resized crop when `train`.

    Training uses no horizontal flip, since captions often say "left" and "right". All randomness comes
    from the `rng` passed to each call, so a crop is reproducible from a seed.

    `uint8=True` returns the (3, S, S) uint8 image instead, for data loaders: a quarter of the bytes to
    ship from worker processes, and `normalize` (on the training device) finishes the job.
    """

    def __init__(self, cfg: PreprocessConfig | None = None, train: bool = False, uint8: bool = False):
        self.cfg = cfg if cfg is not None else PreprocessConfig()
        self.train = train
        self.uint8 = uint8
        self.resample = INTERPOLATIONS[self.cfg.interpolation]
        std = torch.tensor(self.cfg.std, dtype=torch.float32).view(3, 1, 1)
        mean = torch.tensor(self.cfg.mean, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add
        self.scale = 1.0 / (255.0 * std)  # (3, 1, 1)
        self.shift = -mean / std  # (3, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (..., 3, S, S) from `uint8=True` -> the normalised float32 tensor."""
        scale, shift = self.scale.to(x.device), self.shift.to(x.device)
        return x.float().mul_(scale).add_(shift)

    def _train_crop(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """The random resized crop as a (3, S, S) uint8 tensor."""
        S = self.cfg.image_size
        left, top, right, bottom = random_resized_crop_box(
            *img.size, self.cfg.crop_scale, self.cfg.crop_ratio, rng
        )
        mode = _TORCH_MODES.get(self.cfg.interpolation)
        if mode is None:  # nearest, box, lanczos: Pillow's
            crop = np.asarray(img.resize((S, S), self.resample, box=(left, top, right, bottom)))
            return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        a = np.asarray(img)[top:bottom, left:right]  # (h, w, 3) uint8 view
        x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None]  # (1, 3, h, w) channels-last, a copy
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode=mode, antialias=True, align_corners=False)
        return x[0].contiguous()  # (3, S, S) uint8

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        img = to_rgb(img)
        S = self.cfg.image_size
        W, H = img.size
        if self.train:
            x = self._train_crop(img, rng if rng is not None else np.random.default_rng())
            return x if self.uint8 else self.normalize(x)
        if self.cfg.resize_mode == "squash":
            box = (0, 0, W, H)
        elif self.cfg.resize_then_crop:
            new_w, new_h = shortest_side_size(W, H, self.cfg.resize_size or S)
            left, top = (new_w - S) // 2, (new_h - S) // 2
            img = img.resize((new_w, new_h), self.resample).crop((left, top, left + S, top + S))
            box = None
        else:
            box = center_crop_box(W, H, S, self.cfg.resize_size)
        if box is not None:
            img = img.resize((S, S), self.resample, box=box)
        x = np.asarray(img).transpose(2, 0, 1)  # (3, S, S) uint8 view
        if self.uint8:
            return torch.from_numpy(np.ascontiguousarray(x))
        # one contiguous float copy, then in-place ops: several times faster than permuting a float tensor
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (3, S, S), 0..255
        return x.mul_(self.scale).add_(self.shift)  # (3, S, S)

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg}, train={self.train})"


def unnormalize(x: torch.Tensor, preprocess) -> torch.Tensor:
    """Normalised (B, 3, S, S) -> uint8 images, inverting the preprocessing's mean and std."""
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return ((x.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
