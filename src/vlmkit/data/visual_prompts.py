"""Visual prompts: referring to one object of a scene by drawing on the image, or by cutting the rest away.

- `draw_mark(image, box, "circle" | "box")`: an ellipse or a rectangle around the box (grown by `margin` of its
  size), `width` pixels wide at 64 px, scaled with the image (CLIP answers to a red circle because web images have
  them; a model trained on synthetic scenes reads a mark only if marked scenes were in its training);
- `crop_to_box(image, box)`: the box (grown by `margin`) alone, made square around its centre;
- `blur_outside(image, box)`: everything outside the box blurred (Gaussian, radius scaled with the image).

Boxes are (x0, y0, x1, y1) in the image's pixels with exclusive x1, y1, as the scene metadata stores them.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

MARK_COLOUR = (0, 0, 0)  # black: no object of the synthetic palette has it
VISUAL_PROMPTS = ("circle", "box", "crop", "blur")


def _grown(box, image_size: tuple[int, int], margin: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    w, h = image_size
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(w), x1 + dx), min(float(h), y1 + dy)


def draw_mark(image: Image.Image, box, kind: str = "circle", colour=MARK_COLOUR, width: float = 1.5,
              margin: float = 0.25) -> Image.Image:  # fmt: skip
    """A copy of `image` with an ellipse ("circle") or rectangle ("box") drawn around `box`."""
    if kind not in ("circle", "box"):
        raise ValueError(f"a mark is 'circle' or 'box', not {kind!r}")
    out = image.convert("RGB")
    scale = 4  # the line drawn at 4x as a coverage mask and reduced: anti-aliased, of a fractional width
    x0, y0, x1, y1 = (v * scale for v in _grown(box, out.size, margin))
    line = max(1, round(width * scale * max(out.size) / 64))
    mark = Image.new("L", (out.width * scale, out.height * scale), 0)
    draw = ImageDraw.Draw(mark)
    (draw.ellipse if kind == "circle" else draw.rectangle)([x0, y0, x1 - 1, y1 - 1], outline=255, width=line)
    alpha = mark.reduce(scale)
    return Image.composite(Image.new("RGB", out.size, tuple(colour)), out, alpha)


def crop_to_box(image: Image.Image, box, margin: float = 0.25) -> Image.Image:
    """The box grown by `margin`, made square around its centre (within the image)."""
    x0, y0, x1, y1 = _grown(box, image.size, margin)
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = image.size
    left = min(max(0.0, cx - side / 2), max(0.0, w - side))
    top = min(max(0.0, cy - side / 2), max(0.0, h - side))
    return image.convert("RGB").crop((round(left), round(top), round(left + side), round(top + side)))


def blur_outside(image: Image.Image, box, radius: float = 3.0, margin: float = 0.25) -> Image.Image:
    """Everything outside the box (grown by `margin`) blurred with a Gaussian of `radius` pixels at 64 px."""
    image = image.convert("RGB")
    blurred = image.filter(ImageFilter.GaussianBlur(radius * max(image.size) / 64))
    keep = Image.new("L", image.size, 0)
    ImageDraw.Draw(keep).rectangle([round(v) for v in _grown(box, image.size, margin)], fill=255)
    return Image.composite(image, blurred, keep)


def apply_visual_prompt(image: Image.Image, box, kind: str, **kwargs) -> Image.Image:
    """One of VISUAL_PROMPTS applied to `image` for `box`."""
    if kind in ("circle", "box"):
        return draw_mark(image, box, kind, **kwargs)
    if kind == "crop":
        return crop_to_box(image, box, **kwargs)
    if kind == "blur":
        return blur_outside(image, box, **kwargs)
    raise ValueError(f"unknown visual prompt {kind!r}; choose from {', '.join(VISUAL_PROMPTS)}")


def mark_rows(out, rows: list[dict], fraction: float, seed: int) -> int:
    """Marked scenes in a training split (`vlmkit data synth --marked-fraction F`): `fraction` of the rows, drawn
    among scenes of two or more objects (never a corrupted row), get a circle or a box around one object, and a
    caption naming that object alone; each records `"mark": {"kind", "object"}` (the object's index). A model
    learns to read marks only from such pairs. Rewrites the images under `out` in place; returns how many."""
    import numpy as np

    from vlmkit.data.synthetic import caption_scene

    rng = np.random.default_rng([seed, 31])
    candidates = [i for i, r in enumerate(rows) if len(r.get("objects", [])) >= 2 and "corruption" not in r]
    n = min(len(candidates), round(fraction * len(rows)))
    for i in sorted(rng.choice(len(candidates), size=n, replace=False).tolist()) if n else []:
        row = rows[candidates[i]]
        j = int(rng.integers(len(row["objects"])))
        kind = ("circle", "box")[int(rng.integers(2))]
        path = Path(out) / row["image"]
        image = draw_mark(Image.open(path).convert("RGB"), row["objects"][j]["box"], kind)
        image.save(path, format="PNG", compress_level=1)
        row["caption"] = caption_scene({"objects": [row["objects"][j]]}, rng)
        row["mark"] = {"kind": kind, "object": j}
    return n


__all__ = [
    "MARK_COLOUR",
    "mark_rows",
    "VISUAL_PROMPTS",
    "apply_visual_prompt",
    "blur_outside",
    "crop_to_box",
    "draw_mark",
]
