"""Image preprocessing read from a Hugging Face `preprocessor_config.json` against transformers' Pillow-based
CLIP and SigLIP image processors, on random images of random sizes and modes (within one grey level)."""

import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.convert.preprocess import preprocess_from_hf, preprocess_to_hf
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

MODES = ("RGB", "L", "RGBA", "LA", "P", "P+transparency", "CMYK", "1")
RESAMPLES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


def random_image(rng: np.random.Generator, mode: str) -> Image.Image:
    w, h = (int(v) for v in rng.integers(3, 150, size=2))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode.startswith("P"):
        img = rgba.convert("RGB").quantize(colors=int(rng.integers(2, 256)))
        if mode == "P+transparency":  # one palette entry is transparent: composited over white
            img.info["transparency"] = int(np.asarray(img)[0, 0])
        return img
    return rgba if mode == "RGBA" else rgba.convert(mode)


def grey_levels(ours: np.ndarray, theirs: np.ndarray, std) -> float:
    """The largest difference of two normalised images, in grey levels (0..255)."""
    return float((np.abs(ours - theirs) * np.asarray(std)[:, None, None] * 255).max())


def check(processor, rng: np.random.Generator, tmp_path, n: int = 3) -> float:
    """Save `processor`, read its JSON with vlmkit, and compare on random images of every mode."""
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    pre = preprocess_from_hf(config, "preprocessor_config.json")
    transform = ImageTransform(pre)
    worst = 0.0
    for mode in MODES:
        for _ in range(n):
            img = random_image(rng, mode)
            theirs = processor(images=[img], return_tensors="np")["pixel_values"][0]
            ours = transform(img).numpy()
            assert ours.shape == theirs.shape == (3, pre.image_size, pre.image_size)
            worst = max(worst, grey_levels(ours, theirs, pre.std))
    assert worst <= 1.0, f"{config}: {worst:.3f} grey levels"
    return worst


@pytest.mark.parametrize("resample", list(RESAMPLES))
def test_clip_image_processor(resample, tmp_path):
    rng = np.random.default_rng(resample)
    for trial in range(2):
        crop = int(rng.integers(8, 48))
        shortest = crop + int(rng.integers(0, 16)) * trial  # equal to the crop, then larger
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": shortest},
            crop_size={"height": crop, "width": crop},
            resample=resample,
            image_mean=rng.uniform(0.3, 0.6, 3).tolist(),
            image_std=rng.uniform(0.2, 0.3, 3).tolist(),
        )
        check(processor, rng, tmp_path / str(trial))


@pytest.mark.parametrize("resample", list(RESAMPLES))
def test_siglip_image_processor(resample, tmp_path):
    rng = np.random.default_rng(10 + resample)
    size = int(rng.integers(8, 48))
    check(SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample), rng, tmp_path)


def test_legacy_integer_sizes(tmp_path):
    # older CLIP checkpoints store "size": 224, "crop_size": 224 and a feature extractor type
    config = {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "size": 40,
        "crop_size": 32,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    pre = preprocess_from_hf(config, "x")
    assert (pre.image_size, pre.resize_size, pre.resize_mode) == (32, 40, "shortest")
    processor = CLIPImageProcessorPil(**{k: v for k, v in config.items() if k != "feature_extractor_type"})
    rng = np.random.default_rng(0)
    for mode in MODES[:4]:
        img = random_image(rng, mode)
        theirs = processor(images=[img], return_tensors="np")["pixel_values"][0]
        assert grey_levels(ImageTransform(pre)(img).numpy(), theirs, pre.std) <= 1.0


@pytest.mark.parametrize(
    "pre, layout, processor_cls",
    [
        (PreprocessConfig(image_size=24, resize_size=30, resize_then_crop=True), "clip", CLIPImageProcessorPil),
        (PreprocessConfig(image_size=20, interpolation="bilinear", resize_then_crop=True), "siglip", CLIPImageProcessorPil),
        (PreprocessConfig(image_size=28, resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3), "siglip", SiglipImageProcessorPil),
        (PreprocessConfig(image_size=16, resize_mode="squash", interpolation="lanczos"), "clip", CLIPImageProcessorPil),
    ],
)  # fmt: skip
def test_export_round_trip(pre, layout, processor_cls, tmp_path):
    """What vlmkit writes, transformers' processor reads as the same preprocessing, and vlmkit reads back."""
    config = preprocess_to_hf(pre, layout)
    assert config["image_processor_type"] == processor_cls.__name__.removesuffix("Pil")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = processor_cls.from_pretrained(tmp_path)
    back = preprocess_from_hf(config, "x")
    assert back == pre
    rng = np.random.default_rng(1)
    for mode in MODES[:5]:
        img = random_image(rng, mode)
        theirs = processor(images=[img], return_tensors="np")["pixel_values"][0]
        assert grey_levels(ImageTransform(pre)(img).numpy(), theirs, pre.std) <= 1.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"crop_size": {"height": 20, "width": 24}}, r"crop_size must be a square"),
        ({"size": {"shortest_edge": 16}}, r"shortest_edge 16 is smaller than crop_size 24"),
        ({"do_center_crop": False}, r"needs do_center_crop true"),
        ({"size": {"shortest_edge": 24, "longest_edge": 40}}, r"size .* is not supported"),
        ({"resample": 5}, r"resample 5 is not supported"),
        ({"do_resize": False}, r"do_resize false is not supported"),
        ({"rescale_factor": 1.0}, r"rescale_factor 1/255"),
        ({"image_processor_type": "ViTImageProcessor"}, r"image_processor_type 'ViTImageProcessor' is not supported"),
    ],
)  # fmt: skip
def test_unsupported_configs(change, match):
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 24},
        "crop_size": {"height": 24, "width": 24},
        **change,
    }
    with pytest.raises(ConfigError, match=rf"^preprocessor_config.json: .*{match}"):
        preprocess_from_hf(config, "preprocessor_config.json")
