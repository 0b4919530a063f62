"""A deterministic reader of shapes scenes: what objects does an image show, by colour, shape, size and position?

Text-to-image evaluation asks whether a generated picture says what its prompt says. For the shapes data the
answer can be read off the pixels without a learned model:

- objects are the connected components (8-neighbour) of the pixels whose saturation (max - min channel) is at
  least `SATURATION` (the background is a nearly grey tint whose texture is equal on all channels); components
  under `min_area` of the image are noise;
- colour: the palette colour (vlmkit.data.synthetic.COLOURS) nearest the mean of the component's core pixels
  (saturation at least twice the threshold, away from the anti-aliased edge);
- shape: the nearest prototype, in standardised units, of four numbers: fill ratio (area / box area), solidity
  (area / convex-hull area; a star's is low), reach (the farthest pixel from the centroid over the radius of a
  disc of the same area: 1 for a circle, 1.25 for a square) and the vertical offset of the centroid from the box
  centre (a triangle's apex is up); the prototypes are measured on scenes the renderer itself draws at the image's size, so the reader
  follows the renderer;
- size: large when the area is above the geometric mean of the shape's small and large prototypes;
- position: the thirds of the image that hold the box centre, named as the captions name them (the box
  takes in the component's faint anti-aliased rim, as the metadata's box does).

`analyse(image)` lists the objects; `check_against_metadata(jsonl)` measures the reader on real scenes whose
metadata give the answers: its accuracy there is the ceiling of any generated image's score.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from vlmkit.data.synthetic import COLOURS, SHAPES, SIZES, _position_name, render_scene
from vlmkit.data.synthetic import _position as _thirds
from vlmkit.data.transforms import load_image
from vlmkit.errors import DataError

SATURATION = 60  # max - min channel: palette colours are 120-220, the background under 25
MIN_AREA = 0.002  # of the image: smaller components are noise
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (C, 3)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int


def _position(box: tuple[int, int, int, int], image_size: int) -> str:
    return _position_name(*_thirds(list(box), image_size))  # the renderer's own naming


def _features(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(fill, solidity, reach, vertical centroid offset) and the area of one component's mask."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    area = len(xs)
    fill = area / ((x1 - x0) * (y1 - y0))
    try:  # the hull of the pixels' corners, so a one-pixel-wide component still has an area
        corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
        solidity = min(1.0, area / ConvexHull(corners).volume)
    except QhullError:
        solidity = 1.0
    offset = (ys.mean() + 0.5 - (y0 + y1) / 2) / (y1 - y0)
    reach = np.sqrt((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).max() / np.sqrt(area / np.pi)
    return np.array([fill, solidity, reach, offset]), area


def _box(mask: np.ndarray, sat: np.ndarray) -> tuple[int, int, int, int]:
    """The box of a component with its faint rim: the mask grown by a pixel where anything is saturated."""
    rim = ndimage.binary_dilation(mask, np.ones((3, 3), bool)) & (sat >= SATURATION / 4)
    ys, xs = np.nonzero(rim | mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _components(pixels: np.ndarray, min_area: float) -> list[tuple[np.ndarray, np.ndarray, tuple]]:
    """(mask, the core pixels' mean colour, box) of each object."""
    sat = pixels.max(axis=-1) - pixels.min(axis=-1)  # (H, W)
    labels, n = ndimage.label(sat >= SATURATION, structure=np.ones((3, 3), bool))
    out = []
    for i in range(1, n + 1):
        mask = labels == i
        if mask.sum() < min_area * mask.size:
            continue
        core = mask & (sat >= 2 * SATURATION)
        rgb = pixels[core if core.any() else mask].mean(axis=0)
        out.append((mask, rgb, _box(mask, sat)))
    return out


@functools.cache
def _prototypes(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Per shape, the mean features (and the features' spread) and the area between small and large, from
    scenes the renderer draws at `image_size` (fixed seed: the reader is deterministic)."""
    rng = np.random.default_rng(0)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    areas: dict[tuple[str, str], list[int]] = {}
    for shape in SHAPES:
        for _ in range(24):
            image, meta = render_scene(rng, image_size, num_objects=1, shapes=(shape,))
            comps = _components(np.asarray(image, dtype=np.float64), MIN_AREA)
            if len(comps) != 1:
                continue
            f, area = _features(comps[0][0])
            feats[shape].append(f)
            areas.setdefault((shape, meta["objects"][0]["size"]), []).append(area)
    means = np.stack([np.mean(feats[s], axis=0) for s in SHAPES])  # (S, 4)
    spread = (
        np.concatenate([np.asarray(feats[s]) - means[i] for i, s in enumerate(SHAPES)]).std(axis=0) + 1e-3
    )
    cut = {
        s: float(np.sqrt(np.mean(areas.get((s, "small"), [1])) * np.mean(areas.get((s, "large"), [1]))))
        for s in SHAPES
    }
    return means, spread, np.array(SHAPES), cut


def analyse(image: Image.Image | np.ndarray | str | Path, min_area: float = MIN_AREA) -> list[SceneObject]:
    """The objects of a square shapes scene (see the module docstring), left to right."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise DataError(f"the scene reader takes square RGB images, not shape {pixels.shape}")
    size = pixels.shape[0]
    means, spread, names, cut = _prototypes(size)
    objects = []
    for mask, rgb, box in _components(pixels, min_area):
        f, area = _features(mask)
        shape = str(names[np.argmin((((f - means) / spread) ** 2).sum(axis=1))])
        colour = list(COLOURS)[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]
        objects.append(
            SceneObject(colour, shape, SIZES[int(area > cut[shape])], _position(box, size), box, area)
        )
    return sorted(objects, key=lambda o: (o.box[0], o.box[1]))


def _match(found: list[SceneObject], truth: list[dict]) -> list[SceneObject | None]:
    """For each true object, the found object whose box centre lies in its box (nearest centre if several)."""
    out = []
    for t in truth:
        x0, y0, x1, y1 = t["box"]
        inside = [o for o in found
                  if x0 <= (o.box[0] + o.box[2]) / 2 <= x1 and y0 <= (o.box[1] + o.box[3]) / 2 <= y1]  # fmt: skip
        out.append(min(inside, key=lambda o: abs(o.box[0] + o.box[2] - x0 - x1) + abs(o.box[1] + o.box[3] - y0 - y1))
                   if inside else None)  # fmt: skip
    return out


def resized(image: Image.Image, image_size: int) -> np.ndarray:
    """The image as a model of `image_size` pixels sees it (the evaluation transform's antialiased resize)."""
    from vlmkit.data.transforms import ImageTransform, PreprocessConfig

    x = ImageTransform(PreprocessConfig(image_size=image_size), train=False, uint8=True)(image)
    return x.permute(1, 2, 0).numpy()


def check_against_metadata(
    scenes: str | Path, limit: int | None = None, image_size: int | None = None, objects: int | None = None
) -> dict:
    """The reader's accuracy on real scenes (a `vlmkit data synth` JSONL: image + objects): per attribute over
    objects (a missed object counts wrong for all), the object count per image, and all-correct per image.
    `image_size`: read the scenes resized to it (a model's resolution); `objects`: only scenes of that many."""
    scenes = Path(scenes)
    if not scenes.is_file():
        raise DataError(f"scene file not found: {scenes}")
    rows = [json.loads(line) for line in scenes.read_text(encoding="utf-8").splitlines() if line.strip()]
    if objects is not None:
        rows = [r for r in rows if len(r["objects"]) == objects]
    rows = rows[:limit]
    hits = {k: [] for k in ("colour", "shape", "size", "position")}
    count, whole, errors = [], [], []
    for row in rows:
        image = load_image(scenes.parent / row["image"])
        truth = row["objects"]
        if image_size is not None and image_size != image.size[0]:
            scale = image_size / image.size[0]
            image = resized(image, image_size)
            truth = [{**t, "box": [round(v * scale) for v in t["box"]]} for t in truth]
        found = analyse(image)
        matched = _match(found, truth)
        right = True
        for t, o in zip(truth, matched, strict=True):
            for k in hits:
                ok = o is not None and getattr(o, k) == t[k]
                hits[k].append(ok)
                right &= ok
                if not ok and len(errors) < 20:
                    errors.append({"image": row["image"], "attribute": k, "true": t[k],
                                   "read": getattr(o, k) if o is not None else None})  # fmt: skip
        count.append(len(found) == len(truth))
        whole.append(right and len(found) == len(truth))
    return {
        "images": len(rows),
        "objects": len(hits["colour"]),
        "accuracy": {k: float(np.mean(v)) for k, v in hits.items()} | {"count": float(np.mean(count))},
        "all_correct": float(np.mean(whole)),
        "errors": errors,
    }
