import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageDecodeError,
    ImageTransform,
    PreprocessConfig,
    load_image,
    random_resized_crop_box,
    to_rgb,
)
from vlmkit.errors import ConfigError

BG = (10, 20, 30)


def px(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(to_rgb(img, background=BG).getpixel(xy))


# ---------------------------------------------------------------------------------------------
# to_rgb: every mode


def test_to_rgb_l_and_1():
    assert px(Image.new("L", (2, 2), 77)) == (77, 77, 77)
    assert px(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert px(Image.new("1", (2, 2), 0)) == (0, 0, 0)


def test_to_rgb_rgba_composites_on_background():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (200, 100, 50, 0))  # fully transparent -> background
    img.putpixel((1, 0), (200, 100, 50, 255))  # opaque -> itself
    img.putpixel((2, 0), (200, 100, 50, 128))  # half -> blend
    out = to_rgb(img, background=BG)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == BG
    assert out.getpixel((1, 0)) == (200, 100, 50)
    a = 128 / 255
    want = [200 * a + 10 * (1 - a), 100 * a + 20 * (1 - a), 50 * a + 30 * (1 - a)]
    assert np.abs(np.array(out.getpixel((2, 0))) - want).max() <= 1
    # default background is white
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_la():
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (100, 0))
    img.putpixel((1, 0), (100, 255))
    out = to_rgb(img, background=BG)
    assert out.getpixel((0, 0)) == BG
    assert out.getpixel((1, 0)) == (100, 100, 100)


def test_to_rgb_palette_with_and_without_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    assert px(img, (0, 0)) == (255, 0, 0)
    assert px(img, (1, 0)) == (0, 255, 0)
    img.info["transparency"] = 1  # index 1 is see-through
    assert px(img, (0, 0)) == (255, 0, 0)
    assert px(img, (1, 0)) == BG


def test_to_rgb_palette_transparency_survives_png(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png", transparency=1)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_to_rgb_16_bit_scales_instead_of_clipping(tmp_path):
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = to_rgb(img)
    big_endian = to_rgb(Image.fromarray(a.astype(">u2")))  # mode I;16B
    assert big_endian.getpixel((2, 0)) == (255, 255, 255)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]
    # the same through a 16-bit PNG file
    img.save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((2, 0)) == (255, 255, 255)


def test_to_rgb_int32_and_float():
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert to_rgb(i32).getpixel((1, 0)) == (255, 255, 255)
    i8 = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # 8-bit data kept as is
    assert to_rgb(i8).getpixel((1, 0)) == (200, 200, 200)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert (i32.mode, f.mode) == ("I", "F")
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_to_rgb_cmyk_and_ycbcr():
    assert px(Image.new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    assert px(Image.new("CMYK", (1, 1), (0, 0, 0, 255))) == (0, 0, 0)
    ycc = Image.new("RGB", (1, 1), (200, 30, 60)).convert("YCbCr")
    assert np.abs(np.array(px(ycc)) - [200, 30, 60]).max() <= 2


def test_exif_orientation_applied_once(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # top-left red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    img.save(tmp_path / "rot.png", exif=exif)
    out = load_image(tmp_path / "rot.png")
    assert out.size == (2, 4)
    assert out.getpixel((1, 0)) == (255, 0, 0)  # top-left moved to top-right
    again = to_rgb(out)  # a second pass must not rotate again
    assert again.size == (2, 4) and again.getpixel((1, 0)) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# eval / train transforms against a float64 re-computation


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _weights(in_size: int, out_size: int, lo: float, hi: float) -> np.ndarray:
    """(out_size, in_size) antialiased bicubic weights mapping source span [lo, hi) onto out_size pixels."""
    scale = (hi - lo) / out_size
    stretch = max(scale, 1.0)  # widen the kernel when shrinking (antialiasing)
    centers = lo + (np.arange(out_size) + 0.5) * scale
    w = _bicubic((np.arange(in_size) + 0.5 - centers[:, None]) / stretch)
    return w / w.sum(1, keepdims=True)


def _resize64(a: np.ndarray, out_w: int, out_h: int, box=None) -> np.ndarray:
    """Float64 separable bicubic resize of an (H, W, 3) array (source span `box`, default all of it)."""
    H, W, _ = a.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, W, H)
    t = np.einsum("ow,hwc->hoc", _weights(W, out_w, x0, x1), a.astype(np.float64))
    return np.einsum("oh,hwc->owc", _weights(H, out_h, y0, y1), t)


def _test_image(seed: int, h: int, w: int) -> np.ndarray:
    # Mid-range values: bicubic overshoot never reaches 0 or 255, so 8-bit clipping (whose place
    # between the two passes is a resampler detail) cannot make the reference differ.
    return np.random.default_rng(seed).integers(48, 208, (h, w, 3), dtype=np.uint8)


def _normalise64(a: np.ndarray, mean, std) -> np.ndarray:
    return ((a / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def _eval_reference(a: np.ndarray, S: int, mean, std) -> np.ndarray:
    """Resize the shortest side to S (long side rounded down), then centre crop S x S."""
    H, W, _ = a.shape
    new_w, new_h = (S, int(S * H / W)) if W <= H else (int(S * W / H), S)
    full = _resize64(a, new_w, new_h)
    top, left = (new_h - S) // 2, (new_w - S) // 2
    return _normalise64(full[top : top + S, left : left + S], mean, std)


def _tol(std, levels: float = 1.5) -> float:
    return levels / 255 / min(std)  # `levels` 8-bit steps in normalised units


@pytest.mark.parametrize("hw", [(37, 53), (61, 29), (40, 40), (9, 13)])
def test_eval_transform_matches_float64_reference(hw):
    a = _test_image(0, *hw)
    cfg = PreprocessConfig(image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    x = ImageTransform(cfg, train=False)(Image.fromarray(a))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    ref = _eval_reference(a, 16, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=_tol(IMAGENET_STD))


def test_squash_mode_matches_reference():
    a = _test_image(1, 30, 50)
    cfg = PreprocessConfig(image_size=12, resize_mode="squash")
    x = ImageTransform(cfg)(Image.fromarray(a))
    ref = _normalise64(_resize64(a, 12, 12), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=_tol(OPENAI_CLIP_STD))


def test_eval_transform_matches_transformers_clip_processor():
    clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    a = np.random.default_rng(2).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    ref = clip.CLIPImageProcessorPil()(img, return_tensors="np")["pixel_values"][0]
    x = ImageTransform(PreprocessConfig())(img)
    assert x.shape == ref.shape == (3, 224, 224)
    # the same PIL resampling: at most one 8-bit step apart (crop-box vs resize-then-crop rounding)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=_tol(OPENAI_CLIP_STD, 1.01))


def test_train_transform_is_seeded_crop_of_the_image():
    a = _test_image(3, 48, 64)
    img = Image.fromarray(a)
    cfg = PreprocessConfig(image_size=16)
    t = ImageTransform(cfg, train=True)
    x1 = t(img, np.random.default_rng(7))
    x2 = t(img, np.random.default_rng(7))
    x3 = t(img, np.random.default_rng(8))
    assert torch.equal(x1, x2)
    assert not torch.allclose(x1, x3)
    # the output is exactly the crop the rng picks, cut out then resized (as torchvision's
    # RandomResizedCrop does), checked against the float64 resize of the cut-out
    left, top, right, bottom = random_resized_crop_box(
        64, 48, cfg.crop_scale, cfg.crop_ratio, np.random.default_rng(7)
    )
    ref = _normalise64(_resize64(a[top:bottom, left:right], 16, 16), cfg.mean, cfg.std)
    np.testing.assert_allclose(x1.numpy(), ref, rtol=0, atol=_tol(cfg.std))
    # uint8 output is the same image before normalisation; `normalize` finishes it
    u = ImageTransform(cfg, train=True, uint8=True)(img, np.random.default_rng(7))
    assert u.dtype == torch.uint8 and u.shape == (3, 16, 16)
    torch.testing.assert_close(t.normalize(u), x1, rtol=0, atol=1e-6)
    # every interpolation works, the Pillow-only ones too
    for interpolation in ("nearest", "bilinear", "lanczos", "box"):
        cfg_i = PreprocessConfig(image_size=16, interpolation=interpolation)
        assert ImageTransform(cfg_i, train=True)(img, np.random.default_rng(7)).shape == (3, 16, 16)
    # no rng: a fresh generator each call
    assert t(img).shape == (3, 16, 16)


def test_random_resized_crop_within_bounds():
    rng = np.random.default_rng(0)
    W, H = 300, 200
    scale, ratio = (0.3, 0.6), (3 / 4, 4 / 3)
    boxes = [random_resized_crop_box(W, H, scale, ratio, rng) for _ in range(500)]
    for left, top, right, bottom in boxes:
        w, h = right - left, bottom - top
        assert 0 <= left < right <= W and 0 <= top < bottom <= H
        # integer rounding of w and h moves area and ratio by at most a pixel's worth
        assert scale[0] * 0.97 <= w * h / (W * H) <= scale[1] * 1.03
        assert ratio[0] * 0.97 <= w / h <= ratio[1] * 1.03
    areas = [(r - lft) * (b - t) / (W * H) for lft, t, r, b in boxes]
    assert min(areas) < 0.35 and max(areas) > 0.55  # spans the range, not a constant
    assert len(set(boxes)) > 400


def test_random_resized_crop_falls_back_to_centre_crop():
    # a 1000 x 10 strip: no crop with ratio in [3/4, 4/3] and area >= 50% fits, so centre crop
    box = random_resized_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert box == (493, 0, 506, 10)  # width round(10 * 4/3) = 13, centred


# ---------------------------------------------------------------------------------------------
# config


def test_preprocess_config_round_trip(tmp_path):
    cfg = PreprocessConfig(image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    path = cfg.save(tmp_path)
    assert path.name == "preprocess.json"
    assert json.loads(path.read_text())["image_size"] == 64
    assert PreprocessConfig.load(tmp_path) == cfg
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


def test_preprocess_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'imgsize'"):
        PreprocessConfig.from_dict({"imgsize": 3})
    with pytest.raises(ConfigError, match="interpolation"):
        PreprocessConfig(interpolation="cubic")
    with pytest.raises(ConfigError, match="resize_mode"):
        PreprocessConfig(resize_mode="crop")
    with pytest.raises(ConfigError, match="crop_scale"):
        PreprocessConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="not found"):
        PreprocessConfig.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# load_image failures


def _noise_file(path, fmt):
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


def _reason(path) -> str:
    with pytest.raises(ImageDecodeError) as e:
        load_image(path)
    assert str(path) in str(e.value)
    return e.value.reason


def test_load_image_ok(tmp_path):
    img = load_image(_noise_file(tmp_path / "a.png", "PNG"))
    assert img.mode == "RGB" and img.size == (64, 64)


def test_load_image_failures(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "missing file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert _reason(tmp_path / "empty.png") == "empty file"
    (tmp_path / "text.jpg").write_text("not an image at all")
    assert _reason(tmp_path / "text.jpg").startswith("not an image file")
    for fmt, name in [("PNG", "t.png"), ("JPEG", "t.jpg")]:
        data = _noise_file(tmp_path / name, fmt).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert _reason(tmp_path / name).startswith("truncated or corrupt image")
    data = bytearray(_noise_file(tmp_path / "c.png", "PNG").read_bytes())
    data[100:400] = bytes(300)  # zeros over the compressed pixel data
    (tmp_path / "c.png").write_bytes(bytes(data))
    assert _reason(tmp_path / "c.png").startswith("truncated or corrupt image")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_load_image_decompression_bomb_guard(tmp_path, monkeypatch):
    _noise_file(tmp_path / "big.png", "PNG")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit: Pillow only warns
    assert _reason(tmp_path / "big.png").startswith("image too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow raises
    assert _reason(tmp_path / "big.png").startswith("image too large")
