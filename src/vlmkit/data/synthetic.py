"""The built-in synthetic "shapes" dataset: coloured shapes on a light, optionally speckled background.

(Over 500 lines: scene sampling, rendering, captions and the noisy-pool corruptions share one seeded
generator and one metadata format, and change together.)

Every image comes with structured metadata (colour, shape, size, box and position of each object),
so one dataset serves captioning, contrastive training, classification, counting and VQA. Rendering
uses Pillow and NumPy only. Each image draws from its own seed `(seed, stream, index)`, so the files
are byte-identical for a given seed however many worker processes render them.

Layout written by `generate(out)`:

    out/images/{train,val}/000000.png     scenes with 1 to 4 objects
    out/{train,val}.jsonl                 {"image": "images/train/000000.png", "caption", "objects"}
    out/classification/{train,val}/<colour>_<shape>/000000.png    one object per image
    out/classification/classes.txt        "red circle", ... in sorted-folder order
    out/dataset.json                      generation parameters and vocabulary
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlmkit.errors import ConfigError, DataError

# Saturated colours far apart in RGB: they stay distinguishable after anti-aliasing and against the
# low-saturation background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 215, 25),
    "purple": (145, 55, 195),
    "orange": (245, 125, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
MAX_OBJECTS = 4
MIN_IMAGE_SIZE = 32  # below this the star and the diamond are no longer recognisable

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Prompts in the captions' own register: the captions say "a small red circle", "there is ...".
SHAPES_TEMPLATES = ["a {}.", "there is a {}.", "a picture of a {}.", "one {}.", "an image with a {}."]

# The quickstart's data (and the generative recipes'): half the scenes hold one object, so that colour alone
# cannot tell a pair from the rest of the batch and a contrastive model has to learn shape too (with uniform
# 1-4 objects it learns colour and stalls).
SHAPES_ARGS = dict(
    num_train=6000,
    num_val=500,
    image_size=64,
    background_noise=0.2,
    num_per_class_train=20,
    num_per_class_val=10,
    object_weights=(5, 3, 1, 1),
)

_GENERATOR = "vlmkit.data.synthetic"
_FORMAT_VERSION = 2
_STREAMS = {"train": 0, "val": 1, "classification/train": 2, "classification/val": 3}
_SCALE = {"small": 0.13, "large": 0.2}  # nominal radius as a fraction of the image side
_SIZE_JITTER = 0.1  # +-10% on the radius, so sizes vary within a class but never cross over
_MAX_ROTATION = math.radians(10)  # small enough that a square never reads as a diamond
_COLOUR_JITTER = 12  # per channel, far below the distance between palette colours
_SUPERSAMPLE = 4
_GAP = 1.5  # pixels kept free between two objects' bounding circles
_CHUNK = 200  # images per worker task


@dataclass(frozen=True)
class _Outline:
    """A regular (star) polygon: vertices alternate between `radii`, first one at `start` radians."""

    num_vertices: int
    radii: tuple[float, ...]  # multiples of the nominal radius
    start: float


# A circle is a 64-gon: at 4x supersampling that is smooth, and every shape is drawn the same way.
_OUTLINES = {
    "circle": _Outline(64, (0.95,), 0.0),
    "square": _Outline(4, (1.1,), math.pi / 4),
    "triangle": _Outline(3, (1.15,), -math.pi / 2),
    "star": _Outline(10, (1.2, 0.55), -math.pi / 2),
    "diamond": _Outline(4, (1.2,), 0.0),  # a square on its corner: at 64 px a hexagon looked like a circle
}


def _vertices(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    outline = _OUTLINES[shape]
    theta = outline.start + angle + 2 * math.pi * np.arange(outline.num_vertices) / outline.num_vertices
    r = radius * np.resize(np.asarray(outline.radii), outline.num_vertices)  # (V,)
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)  # (V, 2)


def _position(box: list[int], image_size: int) -> tuple[str, str]:
    """Horizontal and vertical third of the image that holds the box centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    thirds = lambda v, names: names[min(int(3 * v / image_size), 2)]
    return thirds(cx, ("left", "centre", "right")), thirds(cy, ("top", "middle", "bottom"))


def _position_name(hpos: str, vpos: str) -> str:
    if vpos == "middle":
        return hpos
    return vpos if hpos == "centre" else f"{vpos} {hpos}"


def _check_scene_args(image_size: int, num_objects: int | None, background_noise: float) -> None:
    if not isinstance(image_size, Integral) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {MIN_IMAGE_SIZE} (got {image_size!r})")
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ConfigError(f"num_objects must be between 1 and {MAX_OBJECTS} (got {num_objects!r})")
    if not 0.0 <= background_noise <= 1.0:
        raise ConfigError(f"background_noise must be between 0 and 1 (got {background_noise!r})")


def _pick(rng: np.random.Generator, names: tuple[str, ...] | list[str]) -> str:
    return names[int(rng.integers(len(names)))]


def _sample_objects(
    rng: np.random.Generator,
    num_objects: int,
    colours: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
) -> list[tuple[str, str, str]]:
    """(colour, shape, size) per object. Some repeat an earlier colour and shape, so counting occurs.

    `colours` and `shapes` restrict the choice (None: all of them).
    """
    colours = list(COLOURS) if colours is None else list(colours)
    shapes = SHAPES if shapes is None else tuple(shapes)
    objects = []
    for _ in range(num_objects):
        if objects and rng.random() < 0.25:
            colour, shape, size = objects[int(rng.integers(len(objects)))]
            if rng.random() < 0.3:
                size = _pick(rng, SIZES)
        else:
            colour, shape, size = _pick(rng, colours), _pick(rng, shapes), _pick(rng, SIZES)
        objects.append((colour, shape, size))
    return objects


def _place(
    rng: np.random.Generator, objects: list[tuple[str, str, str]], image_size: int
) -> list[tuple[str, str, str, np.ndarray]]:
    """Positions without overlap by rejection sampling; a large object that does not fit becomes small.

    Returns (colour, shape, size, vertices (V, 2) in final-image pixels) per object.
    """
    for _ in range(100):
        placed, circles = [], []  # circles: (cx, cy, bounding radius) of objects placed so far
        for colour, shape, size in objects:
            for size_try in dict.fromkeys((size, "small")):
                radius = _SCALE[size_try] * image_size * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
                angle = 0.0 if shape == "circle" else rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
                reach = radius * max(_OUTLINES[shape].radii)
                low, high = reach + 1.0, image_size - reach - 1.0  # fully inside, 1 px margin
                for _ in range(60):
                    cx, cy = rng.uniform(low, high, size=2)
                    if all(math.hypot(cx - x, cy - y) >= reach + r + _GAP for x, y, r in circles):
                        break
                else:
                    continue
                circles.append((cx, cy, reach))
                placed.append((colour, shape, size_try, _vertices(shape, cx, cy, radius, angle)))
                break
            else:
                break  # this object fits nowhere: start the scene again
        if len(placed) == len(objects):
            return placed
    raise RuntimeError(f"could not place {len(objects)} objects in a {image_size} px image")


def _background(
    rng: np.random.Generator, image_size: int, noise: float, tint: np.ndarray | None = None
) -> np.ndarray:
    """A light, nearly grey tint (or `tint`, (3,) 0..255) plus grey-level texture; (S, S, 3) float32."""
    if tint is None:
        tint = rng.uniform(195, 240) + rng.uniform(-10, 10, size=3)  # (3,) low saturation
    background = np.broadcast_to(tint.astype(np.float32), (image_size, image_size, 3)).copy()
    if noise > 0:
        # Blotches (upsampled coarse noise) plus per-pixel speckle, equal on all channels so the
        # texture adds brightness changes but no colour that could be mistaken for an object.
        coarse = rng.standard_normal((8, 8)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse, "F").resize((image_size, image_size), Image.BICUBIC))
        speckle = rng.standard_normal((image_size, image_size)).astype(np.float32)
        background += (noise * (45 * blotches + 25 * speckle))[..., None]  # (S, S, 1) broadcast
    return background


def draw_polygons(polygons: list[tuple[np.ndarray, np.ndarray]], background: np.ndarray) -> np.ndarray:
    """Non-overlapping filled polygons ((V, 2) vertices in pixels, (3,) RGB) over a (S, S, 3) float background,
    anti-aliased: premultiplied colour and coverage drawn at 4x, then box-averaged (the exact area coverage of
    each pixel). Vertices may lie outside the image (a shape partly out of frame). Returns (S, S, 3) uint8."""
    height, width = background.shape[:2]
    big = (width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    colour_layer, coverage_layer = Image.new("RGB", big), Image.new("L", big)
    draw_colour, draw_coverage = ImageDraw.Draw(colour_layer), ImageDraw.Draw(coverage_layer)
    for vertices, rgb in polygons:
        points = [tuple(p) for p in (np.asarray(vertices) * _SUPERSAMPLE).tolist()]
        draw_colour.polygon(points, fill=tuple(int(c) for c in rgb))
        draw_coverage.polygon(points, fill=255)
    # Image.reduce is a box filter, the exact area average (and far faster than a NumPy mean)
    premultiplied = np.asarray(colour_layer.reduce(_SUPERSAMPLE), dtype=np.float32)  # (S, S, 3)
    coverage = np.asarray(coverage_layer.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0  # (S, S)
    pixels = background * (1.0 - coverage[..., None]) + premultiplied  # "over" compositing
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _render(
    rng: np.random.Generator,
    objects: list[tuple[str, str, str]],
    image_size: int,
    background_noise: float,
    tint: np.ndarray | None = None,
) -> tuple[Image.Image, dict]:
    placed = _place(rng, objects, image_size)
    meta_objects, polygons = [], []
    for colour, shape, size, vertices in placed:
        rgb = np.clip(
            np.asarray(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255
        )
        polygons.append((vertices, rgb))
        (x0, y0), (x1, y1) = vertices.min(axis=0), vertices.max(axis=0)
        box = [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]
        hpos, vpos = _position(box, image_size)
        meta_objects.append(
            {
                "colour": colour,
                "shape": shape,
                "size": size,
                "box": box,
                "hpos": hpos,
                "vpos": vpos,
                "position": _position_name(hpos, vpos),
            }
        )
    background = _background(rng, image_size, background_noise, tint)  # (S, S, 3)
    image = Image.fromarray(draw_polygons(polygons, background), "RGB")
    meta = {"objects": meta_objects, "image_size": image_size, "background_noise": background_noise}
    return image, meta


def render_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    num_objects: int | None = None,
    background_noise: float = 0.0,
    colours: tuple[str, ...] | None = None,
    shapes: tuple[str, ...] | None = None,
) -> tuple[Image.Image, dict]:
    """Draw 1 to 4 non-overlapping coloured shapes on a light background.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        image_size: side of the square RGB image in pixels (>= 32).
        num_objects: 1..4, or None for a uniform draw.
        background_noise: 0 (plain tint) to 1 (strong grey texture and speckle).
        colours, shapes: the colours and shapes to draw from (None: all of COLOURS / SHAPES).

    Returns:
        The image and its metadata `{"objects": [...], "image_size": S, "background_noise": x}`.
        Each object is `{"colour", "shape", "size", "box": [x0, y0, x1, y1], "hpos", "vpos",
        "position"}`; the box is in pixels of the returned image with exclusive x1, y1, so
        `pixels[y0:y1, x0:x1]` holds the whole object. hpos is left/centre/right, vpos
        top/middle/bottom (thirds of the image holding the box centre) and position names both,
        e.g. "top left", "left", "top" or "centre".
    """
    _check_scene_args(image_size, num_objects, background_noise)
    if num_objects is None:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    return _render(rng, _sample_objects(rng, num_objects, colours, shapes), image_size, background_noise)


# ----------------------------------------------------------------------------- captions

_TEMPLATES = (
    "{things}",
    "a picture of {things}",
    "there {be} {things}",
    "an image showing {things}",
    "a drawing of {things}",
    "{things} on a {background} background",
    "{total}: {things}",
    "a scene with {things}",
    "{total} on a {background} background: {things}",
)


def plural(noun: str, count: int) -> str:
    """`noun` pluralised when count != 1 ("circle" -> "circles")."""
    return noun if count == 1 else noun + "s"  # every noun in the vocabulary is regular


def count_word(count: int) -> str:
    """Counts as words ("one" .. "ten"); digits beyond."""
    return NUMBER_WORDS[count] if 0 <= count < len(NUMBER_WORDS) else str(count)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _position_phrase(position: str) -> str:
    """ "top left" -> "at the top left", "left" -> "on the left", "centre" -> "in the centre"."""
    if position == "centre":
        return "in the centre"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def _shared(objects: list[dict], key: str) -> str | None:
    """The value of `key` when all objects agree on it, else None."""
    values = {obj.get(key) for obj in objects}
    return values.pop() if len(values) == 1 else None


def _group(objects: list[dict]) -> list[dict]:
    """Objects with the same colour and shape, in order of first appearance.

    A group keeps a size only when all its members share it, and a position phrase only when all
    members lie on the same side (or in the same cell), so the phrase stays true for every member.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["colour"], obj["shape"]), []).append(obj)
    out = []
    for (colour, shape), members in groups.items():
        size, hpos, vpos = (_shared(members, key) for key in ("size", "hpos", "vpos"))
        # "on the left" needs only a shared column, "at the top" only a shared row
        if hpos in ("left", "right") and vpos is None:
            vpos = "middle"
        if vpos in ("top", "bottom") and hpos is None:
            hpos = "centre"
        where = _position_phrase(_position_name(hpos, vpos)) if hpos and vpos else None
        out.append({"colour": colour, "shape": shape, "count": len(members), "size": size, "where": where})
    return out


def _noun_phrase(group: dict, rng: np.random.Generator) -> str:
    words = []
    if group["size"] and rng.random() < 0.5:
        words.append(group["size"])
    words += [group["colour"], plural(group["shape"], group["count"])]
    if group["count"] == 1 and rng.random() < 0.8:
        words.insert(0, _article(words[0]))
    else:
        words.insert(0, count_word(group["count"]))
    if group["where"] and rng.random() < 0.4:
        words.append(group["where"])
    return " ".join(words)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_scene(meta: dict, rng: np.random.Generator) -> str:
    """A caption for `render_scene` metadata, from varied templates.

    Objects of the same colour and shape are grouped and counted in words ("two small red circles on
    the left and a blue star"). Every caption names the colour and shape of every object; size and
    position appear sometimes. Lower case, no final full stop.
    """
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if not objects or not all(isinstance(o, dict) and "colour" in o and "shape" in o for o in objects):
        raise DataError(
            "scene metadata needs a non-empty 'objects' list whose items have 'colour' and 'shape'"
        )
    groups = _group(objects)
    things = _join([_noun_phrase(g, rng) for g in groups])
    noise = meta.get("background_noise", 0.0)
    backgrounds = ("plain", "light", "pale") if not noise else ("speckled", "textured", "grainy")
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(
        things=things,
        be="is" if groups[0]["count"] == 1 else "are",  # agrees with the first noun: "there are two ..."
        total=f"{count_word(len(objects))} {plural('shape', len(objects))}",
        background=_pick(rng, backgrounds),
    )


# ----------------------------------------------------------------------------- dataset on disk


@dataclass(frozen=True)
class _Task:
    """A chunk of images of one split, rendered by one worker."""

    root: str
    split: str  # a key of _STREAMS
    start: int
    stop: int
    seed: int
    image_size: int
    background_noise: float
    num_per_class: int  # classification splits only
    object_weights: tuple[float, ...] | None = None  # relative odds of 1..4 objects; None = uniform
    colours: tuple[str, ...] | None = None  # scene splits: colours to draw from; None = all
    shapes: tuple[str, ...] | None = None  # scene splits: shapes to draw from; None = all


def _class_folders() -> list[str]:
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def _run_task(task: _Task) -> list[dict]:
    """Render and save one chunk; returns its manifest rows (none for classification splits)."""
    root, rows = Path(task.root), []
    folders = _class_folders()
    for index in range(task.start, task.stop):
        rng = np.random.default_rng([task.seed, _STREAMS[task.split], index])
        if task.split.startswith("classification/"):
            folder = folders[index // task.num_per_class]
            colour, shape = folder.split("_")
            objects = [(colour, shape, _pick(rng, SIZES))]
            image, _ = _render(rng, objects, task.image_size, task.background_noise)
            path = root / task.split / folder / f"{index % task.num_per_class:06d}.png"
        else:
            num = None
            if task.object_weights is not None:
                p = np.asarray(task.object_weights, dtype=float)
                num = int(rng.choice(len(p), p=p / p.sum())) + 1
            image, meta = render_scene(
                rng, task.image_size, num, task.background_noise, task.colours, task.shapes
            )
            path = root / "images" / task.split / f"{index:06d}.png"
            relative = path.relative_to(root).as_posix()
            rows.append({"image": relative, "caption": caption_scene(meta, rng), "objects": meta["objects"]})
        image.save(path, format="PNG", compress_level=1)  # noisy images: level 1 is fastest and no bigger
    return rows


def _prepare_output(out: Path) -> None:
    """Make `out`; clear what an earlier run wrote there, and refuse to mix with foreign files."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; pass a folder for the synthetic dataset")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "dataset.json").read_text()).get("generator") == _GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(
                f"{out} is not empty and has no dataset.json from an earlier run; pass a new or empty folder"
            )
        for name in ("images", "classification"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("train.jsonl", "val.jsonl", "dataset.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---- web-scrape noise ---------------------------------------------------------------------------------

NOISE_KINDS = ("mismatched", "duplicate", "tiny", "blank")
TINY_SIZE = 8  # pixels per side of a "tiny" image: an icon or a thumbnail, below any sane minimum side
DUPLICATES_PER_SOURCE = 10  # on average; web duplicates are few images copied many times


def _check_noise(noise: dict[str, float]) -> None:
    for kind, fraction in noise.items():
        if not 0 <= fraction < 1:
            raise ConfigError(
                f"--{kind.replace('mismatched', 'mismatch')}-fraction must be in [0, 1) (got {fraction})"
            )
    if sum(noise.values()) > 0.9:
        raise ConfigError(
            f"the noise fractions add up to {sum(noise.values()):.2f}; keep them at most 0.9 in all"
        )


def corrupt_pool(root: Path, rows: list[dict], noise: dict[str, float], seed: int) -> None:
    """Turn a clean train split into a realistic noisy pool, in place; each row records its `corruption`.

    Disjoint random sets of rows get one kind each:
    - "mismatched": the caption of another scene (alt-text that does not describe the image);
    - "duplicate": a byte-identical copy of a popular image, with that image's caption (about
      `DUPLICATES_PER_SOURCE` copies of each popular image, like banners and stock photos);
    - "tiny": the image shrunk to `TINY_SIZE` px a side (icons, spacers), caption unchanged;
    - "blank": one flat colour, the same for all of them (failed renders, placeholders), caption unchanged.
    The other rows get `"corruption": None`. The same seed gives the same pool.
    """
    rng = np.random.default_rng([seed, 7919])
    n = len(rows)
    order = rng.permutation(n)
    counts = {kind: int(round(noise.get(kind, 0.0) * n)) for kind in NOISE_KINDS}
    chosen, start = {}, 0
    for kind in NOISE_KINDS:
        chosen[kind] = sorted(order[start : start + counts[kind]].tolist())
        start += counts[kind]
    clean = sorted(order[start:].tolist())
    for row in rows:
        row["corruption"] = None
    captions = [row["caption"] for row in rows]
    for i in chosen["mismatched"]:
        j = i
        for _ in range(100):  # another scene, not a twin of this one
            if rows[j]["objects"] != rows[i]["objects"]:
                break
            j = int(rng.integers(n))
        rows[i]["caption"] = captions[j]
        rows[i]["corruption"] = "mismatched"
    if chosen["duplicate"] and clean:
        num_sources = max(1, len(chosen["duplicate"]) // DUPLICATES_PER_SOURCE)
        sources = rng.choice(clean, size=min(num_sources, len(clean)), replace=False)
        for i in chosen["duplicate"]:
            src = int(sources[rng.integers(len(sources))])
            shutil.copyfile(root / rows[src]["image"], root / rows[i]["image"])
            rows[i].update(caption=rows[src]["caption"], objects=rows[src]["objects"], corruption="duplicate")
    for i in chosen["tiny"]:
        path = root / rows[i]["image"]
        with Image.open(path) as img:
            small = img.convert("RGB").resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BOX)
        small.save(path, format="PNG")
        rows[i]["corruption"] = "tiny"
    if chosen["blank"]:
        with Image.open(root / rows[chosen["blank"][0]]["image"]) as img:
            size = img.size
        blank = Image.new("RGB", size, (128, 128, 128))
        for i in chosen["blank"]:
            blank.save(root / rows[i]["image"], format="PNG", compress_level=1)
            rows[i]["corruption"] = "blank"


def _allowed(key: str, excluded, names: tuple[str, ...]) -> tuple[str, ...] | None:
    """The names left after excluding `excluded` (None when nothing is excluded); ConfigError for unknown names."""
    if isinstance(excluded, str):
        excluded = [excluded]
    unknown = sorted(set(excluded) - set(names))
    if unknown:
        raise ConfigError(f"{key}: unknown name {unknown[0]!r}; choose from {', '.join(names)}")
    left = tuple(n for n in names if n not in set(excluded))
    if not left:
        raise ConfigError(f"{key} excludes every one of {', '.join(names)}; keep at least one")
    return left if excluded else None


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, 8)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate(
    out: str | Path,
    num_train: int = 4000,
    num_val: int = 500,
    image_size: int = 64,
    seed: int = 0,
    background_noise: float = 0.3,
    num_per_class_train: int = 20,
    num_per_class_val: int = 10,
    progress: bool = True,
    num_workers: int | None = None,
    object_weights: tuple[float, ...] | None = None,
    mismatch_fraction: float = 0.0,
    duplicate_fraction: float = 0.0,
    tiny_fraction: float = 0.0,
    blank_fraction: float = 0.0,
    exclude_colours: tuple[str, ...] | list[str] = (),
    exclude_shapes: tuple[str, ...] | list[str] = (),
    marked_fraction: float = 0.0,
) -> dict[str, Path]:
    """Write the shapes dataset (scenes with captions, plus a one-object classification split) to `out`.

    The same arguments give byte-identical files, whatever `num_workers`. Train, val and the
    classification splits draw from separate random streams. `out` must be new, empty, or hold an
    earlier output of this function (which is then replaced).

    Args:
        num_train, num_val: scene images with captions.
        num_per_class_train, num_per_class_val: classification images per "<colour> <shape>" class
            (len(COLOURS) * len(SHAPES) classes).
        num_workers: processes that render; None uses up to 8 of the available CPUs, 0 renders here.
        object_weights: relative odds of scenes with 1, 2, 3 and 4 objects (None: uniform). Scenes
            with few objects make colour alone ambiguous within a batch, so a model must learn shape.
        mismatch_fraction, duplicate_fraction, tiny_fraction, blank_fraction: the web-scrape noise
            `corrupt_pool` injects into the train split (disjoint fractions of its rows; see there).
        marked_fraction: train scenes of 2+ objects with a circle or box drawn around one object and a caption
            naming it alone (`vlmkit.data.visual_prompts.mark_rows`): what a model needs to learn to read marks.
        exclude_colours, exclude_shapes: colours and shapes that never occur in the train and val scenes
            (so their captions never name them), while the classification splits keep every class: held-out
            classes for transfer experiments.

    Returns:
        Paths written: "train" and "val" manifests (JSONL), "classification_train" and
        "classification_val" ImageFolder roots, "classes" (classes.txt) and "dataset" (dataset.json).
    """
    _check_scene_args(image_size, None, background_noise)
    for key, value in {
        "num_train": num_train,
        "num_val": num_val,
        "num_per_class_train": num_per_class_train,
        "num_per_class_val": num_per_class_val,
        "seed": seed,
    }.items():
        if not isinstance(value, Integral) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0 (got {value!r})")
    if object_weights is not None:
        object_weights = tuple(float(w) for w in object_weights)
        if len(object_weights) != MAX_OBJECTS or min(object_weights) < 0 or sum(object_weights) <= 0:
            raise ConfigError(
                f"object_weights needs {MAX_OBJECTS} non-negative odds, not all 0 (got {object_weights})"
            )
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 or None (got {num_workers!r})")
    noise = {
        "mismatched": mismatch_fraction,
        "duplicate": duplicate_fraction,
        "tiny": tiny_fraction,
        "blank": blank_fraction,
    }
    _check_noise(noise)
    if not 0.0 <= marked_fraction < 1.0:
        raise ConfigError(f"marked_fraction must be in [0, 1) (got {marked_fraction!r})")
    colours = _allowed("exclude_colours", exclude_colours, tuple(COLOURS))
    shapes = _allowed("exclude_shapes", exclude_shapes, SHAPES)

    out = Path(out)
    _prepare_output(out)
    folders = _class_folders()
    counts = {
        "train": num_train,
        "val": num_val,
        "classification/train": num_per_class_train * len(folders),
        "classification/val": num_per_class_val * len(folders),
    }
    per_class = {"classification/train": num_per_class_train, "classification/val": num_per_class_val}
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for split in per_class:
        for folder in folders:
            (out / split / folder).mkdir(parents=True, exist_ok=True)

    tasks = [
        _Task(
            str(out),
            split,
            start,
            min(start + _CHUNK, count),
            seed,
            image_size,
            background_noise,
            per_class.get(split, 1),
            object_weights,
            colours,
            shapes,
        )
        for split, count in counts.items()
        for start in range(0, count, _CHUNK)
    ]
    total = sum(counts.values())
    workers = _default_workers() if num_workers is None else num_workers
    workers = min(workers, len(tasks)) if total >= 2 * _CHUNK else 0  # a pool costs more than it saves
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    with tqdm(total=total, desc="shapes", unit="img", disable=not progress) as bar:
        if workers > 1:
            # fork where available: workers start in milliseconds and need no re-import
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with context.Pool(workers) as pool:
                results = pool.imap(_run_task, tasks)  # ordered, so manifests do not depend on timing
                for task, task_rows in zip(tasks, results):
                    rows.setdefault(task.split, []).extend(task_rows)
                    bar.update(task.stop - task.start)
        else:
            for task in tasks:
                rows.setdefault(task.split, []).extend(_run_task(task))
                bar.update(task.stop - task.start)

    paths = {
        "train": out / "train.jsonl",
        "val": out / "val.jsonl",
        "classification_train": out / "classification" / "train",
        "classification_val": out / "classification" / "val",
        "classes": out / "classification" / "classes.txt",
        "dataset": out / "dataset.json",
    }
    if any(noise.values()):
        corrupt_pool(out, rows["train"], noise, seed)
    if marked_fraction:
        from vlmkit.data.visual_prompts import mark_rows

        mark_rows(out, rows["train"], marked_fraction, seed)
    _write_jsonl(paths["train"], rows["train"])
    _write_jsonl(paths["val"], rows["val"])
    paths["classes"].write_text("".join(folder.replace("_", " ") + "\n" for folder in folders))
    # Written last: a dataset.json marks a complete output, and records how to make it again.
    record = {
        "generator": _GENERATOR,
        "format_version": _FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "background_noise": background_noise,
        "num_per_class_train": num_per_class_train,
        "num_per_class_val": num_per_class_val,
        "object_weights": list(object_weights) if object_weights else None,
        "noise": {k: v for k, v in noise.items() if v},
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "classes": [folder.replace("_", " ") for folder in folders],
        "files": {key: path.relative_to(out).as_posix() for key, path in paths.items() if key != "dataset"},
    }
    if marked_fraction:  # recorded only when used, as below
        record["marked_fraction"] = marked_fraction
    if colours is not None or shapes is not None:  # recorded only when used: other outputs stay as they were
        record["exclude_colours"] = [c for c in COLOURS if colours is not None and c not in colours]
        record["exclude_shapes"] = [s for s in SHAPES if shapes is not None and s not in shapes]
    paths["dataset"].write_text(json.dumps(record, indent=2) + "\n")
    return paths


def is_current(out: str | Path, **generate_args) -> bool:
    """Whether `out` holds a complete output of `generate(out, **generate_args)`, as its dataset.json
    records it: demos call this to reuse their data rather than write it again. Arguments left out are
    not compared."""
    out = Path(out)
    meta = out / "dataset.json"
    if not meta.is_file() or not (out / "train.jsonl").is_file():
        return False
    saved = json.loads(meta.read_text())
    want = json.loads(json.dumps(generate_args))  # tuples as JSON lists, as saved
    fractions = {f"{'mismatch' if k == 'mismatched' else k}_fraction": k for k in NOISE_KINDS}
    noise = {kind: want.pop(arg) for arg, kind in fractions.items() if arg in want}
    if noise and saved.get("noise", {}) != {k: v for k, v in noise.items() if v}:
        return False
    for key in ("exclude_colours", "exclude_shapes"):  # saved in palette order, and only when used
        if key in want and sorted(want.pop(key)) != sorted(saved.get(key, [])):
            return False
    return all(saved.get(k) == v for k, v in want.items())
