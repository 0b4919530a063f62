"""Image preprocessing settings between Hugging Face image processor configs (CLIP, SigLIP) and vlmkit's
`PreprocessConfig`."""

from __future__ import annotations

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError

# PIL resampling filter ids, as image processor configs store them
RESAMPLE_FROM_HF = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}
RESAMPLE_TO_HF = {v: k for k, v in RESAMPLE_FROM_HF.items()}


def _size(value, where: str, key: str) -> dict:
    """A preprocessor size: an int (the shortest edge, as transformers reads it) or a dict."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"shortest_edge": value}
    if isinstance(value, dict):
        return value
    raise ConfigError(f"{where}: {key} must be an integer or an object, got {value!r}")


def preprocess_from_hf(d: dict, where: str) -> PreprocessConfig:
    """The vlmkit PreprocessConfig equal to a CLIP / SigLIP image processor's `preprocessor_config.json`.

    CLIPImageProcessor: resize the shortest edge to `size`, centre crop `crop_size`. SiglipImageProcessor:
    resize to `size` height x width, no crop. Both rescale by 1/255 and normalise with image_mean/std.
    """
    kind = d.get("image_processor_type") or d.get("feature_extractor_type") or ""
    if kind.startswith("CLIP"):
        defaults = dict(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True
        )
        mean_std = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    elif kind.startswith("Siglip"):
        defaults = dict(size={"height": 224, "width": 224}, crop_size=None, do_center_crop=False)
        mean_std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    else:
        raise ConfigError(
            f"{where}: image_processor_type {kind!r} is not supported; vlmkit reads CLIPImageProcessor and SiglipImageProcessor"
        )
    d = {**defaults, **{k: v for k, v in d.items() if v is not None}}
    if not d.get("do_resize", True):
        raise ConfigError(
            f"{where}: do_resize false is not supported (images must be resized to the model's size)"
        )
    if d.get("do_rescale", True) is False or abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ConfigError(f"{where}: only do_rescale true with rescale_factor 1/255 is supported")
    if d.get("do_pad"):
        raise ConfigError(f"{where}: do_pad is not supported")
    resample = d.get("resample", 3)
    if resample not in RESAMPLE_FROM_HF:
        raise ConfigError(
            f"{where}: resample {resample!r} is not supported; use one of {sorted(RESAMPLE_FROM_HF)} ({', '.join(RESAMPLE_FROM_HF.values())})"
        )
    size = _size(d["size"], where, "size")
    crop = _size(d["crop_size"], where, "crop_size") if d.get("do_center_crop") else None
    if crop is not None:
        if "shortest_edge" in crop:  # an int crop_size means a square
            crop = {"height": crop["shortest_edge"], "width": crop["shortest_edge"]}
        if crop.get("height") != crop.get("width") or not isinstance(crop.get("height"), int):
            raise ConfigError(f"{where}: crop_size must be a square (height == width), got {d['crop_size']}")
    if set(size) == {"shortest_edge"}:
        if crop is None:
            raise ConfigError(f"{where}: a shortest_edge resize needs do_center_crop true for a square image")
        resize, image_size, mode = size["shortest_edge"], crop["height"], "shortest"
        if resize < image_size:
            raise ConfigError(f"{where}: size.shortest_edge {resize} is smaller than crop_size {image_size}")
    elif set(size) == {"height", "width"} and size["height"] == size["width"]:
        image_size, resize, mode = size["height"], None, "squash"
        if crop is not None and crop["height"] != image_size:
            raise ConfigError(f"{where}: a square resize followed by a smaller crop is not supported")
    else:
        raise ConfigError(
            f'{where}: size {d["size"]} is not supported; use {{"shortest_edge": N}} or a square height/width'
        )
    mean, std = (d.get("image_mean", mean_std[0]), d.get("image_std", mean_std[1]))
    if not d.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = (tuple([m] * 3) if isinstance(m, (int, float)) else tuple(m) for m in (mean, std))
    try:
        return PreprocessConfig(
            image_size=image_size,
            mean=mean,
            std=std,
            interpolation=RESAMPLE_FROM_HF[resample],
            resize_mode=mode,
            resize_size=resize if resize != image_size else None,
            resize_then_crop=mode == "shortest",
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def preprocess_to_hf(pre: PreprocessConfig, layout: str) -> dict:
    """`preprocessor_config.json` for a vlmkit PreprocessConfig: a CLIPImageProcessor (shortest-edge resize and
    centre crop), or for a SigLIP model with "squash" resizing, a SiglipImageProcessor."""
    common = dict(
        do_resize=True,
        resample=RESAMPLE_TO_HF[pre.interpolation],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(pre.mean),
        image_std=list(pre.std),
        do_convert_rgb=True,
    )
    square = {"height": pre.image_size, "width": pre.image_size}
    if pre.resize_mode == "squash":
        kind = "SiglipImageProcessor" if layout == "siglip" else "CLIPImageProcessor"
        return dict(image_processor_type=kind, size=square, do_center_crop=False, **common)
    return dict(
        image_processor_type="CLIPImageProcessor",
        size={"shortest_edge": pre.resize_size or pre.image_size},
        do_center_crop=True,
        crop_size=square,
        **common,
    )
