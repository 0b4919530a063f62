"""Synthetic "moving shapes" videos: clips whose answers live in time, not in any one frame.

Four kinds of clip, drawn with the shapes renderer (`vlmkit.data.synthetic`) on a still background:

    direction     one shape crossing the frame left, right, up or down
    order         two shapes of different colours and kinds, one shown after the other ("a red circle, then a blue
                  star"; asked "which colour appeared first?")
    enter_leave   one shape sliding into the frame from an edge, or out of it
    count         one to four shapes, each shown alone in turn

They are built so that no single frame and no order-free summary answers the temporal questions: a crossing's
start and end points are drawn as a pair and then assigned by direction, so every position is as likely under
"left" as under "right" and the middle frame says nothing; in an `order` clip the middle frame is empty and each
shape is as likely to come first; entering and leaving are each other's reversal. The mean of the frames (or of
their embeddings) is the same for a clip and its reversal, so mean pooling sits at chance on direction, order
and entering/leaving by construction; reversing a clip flips every one of those answers (`REVERSED`).

Layout written by `generate(out)` (videos are lossless: ffv1 in .mkv, pixel-exact when decoded):

    out/videos/{train,val}/000000.mkv
    out/{train,val}.jsonl      {"video", "caption", "kind", "question", "answer", "choices", "choice_captions",
                                "reversed_answer", "reversed_caption" (what the clip shows played backwards), ...}
    out/vqa/{train,val}.jsonl  {"video", "conversations": [question, answer], "type", "answer", "choices",
                                "reversed_answer"}: the clip's question; with more_questions=True also "which colour
                                appeared last?" (order) and "what colour is the shape?" (direction, enter_leave)
    out/classification/val/<class>/000000.mkv   "moving left", ..., "entering", "leaving" (zero-shot)
    out/stills/train.jsonl     single frames of the training clips, captioned with each object's size, colour, shape
                               and position ("a large red circle on the left"): an image tower's pretraining
    out/dataset.json
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlmkit.data.synthetic import (
    _COLOUR_JITTER,
    _OUTLINES,
    _SCALE,
    _SIZE_JITTER,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    _background,
    _position,
    _position_name,
    _position_phrase,
    _vertices,
    draw_polygons,
)
from vlmkit.errors import ConfigError

KINDS = ("direction", "order", "enter_leave", "count")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "entering": "leaving",
    "leaving": "entering",
}
QUESTIONS = {
    "direction": "Which way is the shape moving?",
    "order": "Which colour appeared first?",
    "enter_leave": "Is the shape entering or leaving?",
    "count": "How many shapes appeared?",
}
TEMPORAL_KINDS = ("direction", "order", "enter_leave")  # answers a reversed clip flips
_STREAMS = {"train": 10, "val": 11, "classification/val": 12}
_GENERATOR = "vlmkit.data.synthetic_video"
_FORMAT_VERSION = 6  # bumped whenever the files written for the same arguments change


def _object(rng: np.random.Generator, image_size: int, shape: str | None = None, colour: str | None = None):
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    radius = _SCALE[size] * image_size * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    angle = 0.0 if shape == "circle" else rng.uniform(-math.radians(10), math.radians(10))
    rgb = np.clip(np.asarray(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
    reach = radius * max(_OUTLINES[shape].radii)
    return {"colour": colour, "shape": shape, "size": size, "radius": radius, "angle": angle, "rgb": rgb,
            "reach": reach}  # fmt: skip


def _draw(obj: dict, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(vertices, RGB, the object) of one object in one frame."""
    return _vertices(obj["shape"], cx, cy, obj["radius"], obj["angle"]), obj["rgb"], obj


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _along(axis_pos: float, cross: float, direction: str) -> tuple[float, float]:
    """(x, y) for a position `axis_pos` along the motion axis of `direction` and `cross` across it."""
    return (axis_pos, cross) if DIRECTIONS[direction][1] == 0 else (cross, axis_pos)


def render_clip(
    rng: np.random.Generator,
    kind: str,
    image_size: int = 64,
    num_frames: int = 16,
    background_noise: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """One clip of `kind` as (T, S, S, 3) uint8 frames, and its metadata (caption, question, answer, choices,
    reversed_answer, objects)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown clip kind {kind!r}; choose from {', '.join(KINDS)}")
    if num_frames < 8:
        raise ConfigError(f"num_frames must be >= 8 for the events to be seen, got {num_frames}")
    S, T = image_size, num_frames
    background = _background(rng, S, background_noise)
    frames: list[list] = [[] for _ in range(T)]  # polygons per frame
    meta: dict = {"kind": kind, "question": QUESTIONS[kind]}
    if kind in ("direction", "enter_leave"):
        obj = _object(rng, S)
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        sign = DIRECTIONS[direction][0] + DIRECTIONS[direction][1]
        low, high = obj["reach"] + 1.0, S - obj["reach"] - 1.0
        cross = rng.uniform(low, high)
        if (
            kind == "direction"
        ):  # an unordered pair of points at least 40% of the frame apart, ordered by direction
            while True:
                u, v = sorted(rng.uniform(low, high, size=2))
                if v - u >= 0.4 * S:
                    break
            start, end = (u, v) if sign > 0 else (v, u)
            meta |= {"caption": f"a {_name(obj)} moving {direction}", "answer": direction,
                     "choices": list(DIRECTIONS), "direction": direction,
                     "choice_captions": [f"a {_name(obj)} moving {d}" for d in DIRECTIONS],
                     "reversed_caption": f"a {_name(obj)} moving {OPPOSITE[direction]}"}  # fmt: skip
        else:  # from just outside the edge it leaves by to a point inside, or the reverse
            inside = rng.uniform(low, high)
            outside = -obj["reach"] - 1.0 if sign < 0 else S + obj["reach"] + 1.0
            entering = bool(rng.integers(2))
            start, end = (outside, inside) if entering else (inside, outside)
            answer = "entering" if entering else "leaving"
            meta |= {"caption": f"a {_name(obj)} {answer}", "answer": answer, "choices": ["entering", "leaving"],
                     "direction": direction if not entering else OPPOSITE[direction],
                     "choice_captions": [f"a {_name(obj)} entering", f"a {_name(obj)} leaving"],
                     "reversed_caption": f"a {_name(obj)} {OPPOSITE[answer]}"}  # fmt: skip
        for t in range(T):
            pos = start + (end - start) * t / (T - 1)
            frames[t].append(_draw(obj, *_along(pos, cross, direction)))
        meta["objects"] = [{k: obj[k] for k in ("colour", "shape", "size")}]
    elif kind == "order":
        # different colours and kinds: "which colour came first?" has one answer
        shapes = rng.choice(len(SHAPES), size=2, replace=False)
        colours = rng.choice(len(COLOURS), size=2, replace=False)
        objs = [
            _object(rng, S, shape=SHAPES[int(k)], colour=list(COLOURS)[int(c)])
            for k, c in zip(shapes, colours)
        ]
        # windows in fractions of the clip: the first before 0.45, the second after 0.55; the middle is empty
        windows = [
            (rng.uniform(0.0, 0.1), rng.uniform(0.35, 0.45)),
            (rng.uniform(0.55, 0.65), rng.uniform(0.9, 1.0)),
        ]
        for obj, (a, b) in zip(objs, windows):
            cx, cy = rng.uniform(obj["reach"] + 1.0, S - obj["reach"] - 1.0, size=2)
            for t in range(T):
                if a <= (t + 0.5) / T < b:
                    frames[t].append(_draw(obj, cx, cy))
        captions = [
            f"a {_name(objs[0])}, then a {_name(objs[1])}",
            f"a {_name(objs[1])}, then a {_name(objs[0])}",
        ]
        meta |= {"caption": captions[0], "answer": objs[0]["colour"], "choice_captions": captions,
                 "reversed_caption": captions[1],
                 "choices": [objs[0]["colour"], objs[1]["colour"]], "reversed_answer": objs[1]["colour"],
                 "objects": [{k: o[k] for k in ("colour", "shape", "size")} for o in objs]}  # fmt: skip
    else:  # count: k shapes, each alone in its slot, visible for the first 55% of it
        k = int(rng.integers(1, 5))
        objs = [_object(rng, S) for _ in range(k)]
        for j, obj in enumerate(objs):
            cx, cy = rng.uniform(obj["reach"] + 1.0, S - obj["reach"] - 1.0, size=2)
            for t in range(T):
                f = (t + 0.5) / T * k - j
                if 0.0 <= f < 0.55:
                    frames[t].append(_draw(obj, cx, cy))
        captions = [
            f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}, one after another" for n in range(1, 5)
        ]
        meta |= {"caption": captions[k - 1], "answer": NUMBER_WORDS[k], "choice_captions": captions,
                 "choices": list(NUMBER_WORDS[1:5]), "count": k,
                 "objects": [{k2: o[k2] for k2 in ("colour", "shape", "size")} for o in objs]}  # fmt: skip
    if kind in ("direction", "enter_leave"):
        meta["reversed_answer"] = OPPOSITE[meta["answer"]]
    # further questions about the clip (vqa/*.jsonl): naming colours is what "which colour came first?" needs,
    # and a model learns it from these; "last" is the other half of the order
    colours = list(COLOURS)
    if kind in ("direction", "enter_leave"):
        meta["more_questions"] = [{"type": "colour", "question": "What colour is the shape?",
                                   "answer": meta["objects"][0]["colour"], "choices": colours}]  # fmt: skip
    elif kind == "order":
        meta["more_questions"] = [{"type": "order", "question": "Which colour appeared last?",
                                   "answer": meta["choices"][1], "reversed_answer": meta["choices"][0],
                                   "choices": meta["choices"]}]  # fmt: skip
    else:
        meta["more_questions"] = []
    video = np.stack([draw_polygons([p[:2] for p in polys], background) for polys in frames])  # (T, S, S, 3)
    meta["_frames"] = frames  # each frame's (vertices, rgb, object): `still_caption` reads them
    return video, meta


def still_caption(meta: dict, t: int, image_size: int) -> str | None:
    """A caption of frame `t` alone naming every object's size, colour, shape and position ("a large red circle on
    the left and a small blue star at the top"), or None when the frame is empty or an object is cut by its edge."""
    phrases = []
    for vertices, _, obj in meta["_frames"][t]:
        (x0, y0), (x1, y1) = vertices.min(axis=0), vertices.max(axis=0)
        if x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size:
            return None
        box = [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]
        position = _position_name(*_position(box, image_size))
        phrases.append(f"a {obj['size']} {obj['colour']} {obj['shape']} {_position_phrase(position)}")
    return " and ".join(phrases) if phrases else None


def _clip_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def generate(
    out: str | Path,
    num_train: int = 2000,
    num_val: int = 400,
    image_size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    kinds: tuple[str, ...] = KINDS,
    num_classification: int = 40,
    background_noise: float = 0.0,
    seed: int = 0,
    stills_per_clip: int = 2,
    more_questions: bool = False,
    progress: bool = True,
) -> Path:
    """Write the moving-shapes dataset (see the module docstring); kinds are cycled so each is equally common.
    Each clip draws from its own seed `(seed, stream, index)`: the same arguments give the same files.
    `more_questions` adds a second question per clip to vqa/*.jsonl (the colour of the shape; which colour appeared
    last): measured, it halves the steps each temporal question gets in a 12-minute run (benchmarks/RESULTS.md)."""
    from vlmkit.data.video import write_video

    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown clip kind {kind!r}; choose from {', '.join(KINDS)}")
    out = Path(out)
    for sub in ("videos", "vqa", "classification", "stills"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    total = num_train + num_val + num_classification * 6
    bar = tqdm(total=total, desc="rendering clips", unit="clip", disable=not progress)
    (out / "stills" / "images").mkdir(parents=True, exist_ok=True)
    stills: list[dict] = []
    for split, count in (("train", num_train), ("val", num_val)):
        rows, vqa = [], []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            rng = _clip_rng(seed, _STREAMS[split], i)
            frames, meta = render_clip(rng, kind, image_size, num_frames, background_noise)
            drawn = meta.pop("_frames")
            rel = f"videos/{split}/{i:06d}.mkv"
            if split == "train":  # stills of the clip with their own captions: an image tower's pretraining
                kept = 0
                for t in rng.choice(num_frames, size=min(num_frames, 6), replace=False).tolist():
                    caption = still_caption({"_frames": drawn}, t, image_size)
                    if caption is not None and kept < stills_per_clip:
                        name = f"images/{i:06d}_{t:02d}.png"  # relative to stills/train.jsonl
                        Image.fromarray(frames[t]).save(out / "stills" / name)
                        stills.append({"image": name, "caption": caption, "clip": i})
                        kept += 1
            write_video(out / rel, frames, fps)
            rows.append({"video": rel, **meta})
            extra = meta["more_questions"] if more_questions else []
            for q in [{k: meta[k] for k in ("question", "answer", "choices", "reversed_answer") if k in meta}
                      | {"type": kind}, *extra]:  # fmt: skip
                vqa.append({"video": f"../{rel}", "type": q["type"], "answer": q["answer"], "choices": q["choices"],
                            **({"reversed_answer": q["reversed_answer"]} if "reversed_answer" in q else {}),
                            "conversations": [{"from": "human", "value": f"<video>\n{q['question']}"},
                                              {"from": "gpt", "value": q["answer"]}]})  # fmt: skip
            bar.update()
        _write_jsonl(out / f"{split}.jsonl", rows)
        (out / "vqa").mkdir(exist_ok=True)
        _write_jsonl(out / "vqa" / f"{split}.jsonl", vqa)
    # zero-shot classification folder: motion classes, clips of the direction and enter_leave kinds
    classes = [f"moving {d}" for d in DIRECTIONS] + ["entering", "leaving"]
    counts = dict.fromkeys(classes, 0)
    i = 0
    while min(counts.values()) < num_classification:
        kind = ("direction", "enter_leave")[i % 2]
        frames, meta = render_clip(_clip_rng(seed, _STREAMS["classification/val"], i), kind, image_size,
                                   num_frames, background_noise)  # fmt: skip
        meta.pop("_frames")
        i += 1
        label = f"moving {meta['answer']}" if kind == "direction" else meta["answer"]
        if counts[label] >= num_classification:
            continue
        write_video(
            out / "classification" / "val" / label.replace(" ", "_") / f"{counts[label]:06d}.mkv", frames, fps
        )
        counts[label] += 1
        bar.update()
    bar.close()
    _write_jsonl(out / "stills" / "train.jsonl", stills)
    args = _info(num_train=num_train, num_val=num_val, image_size=image_size, num_frames=num_frames, fps=fps,
                 kinds=kinds, num_classification=num_classification, background_noise=background_noise, seed=seed,
                 stills_per_clip=stills_per_clip, more_questions=more_questions)  # fmt: skip
    info = {"generator": _GENERATOR, "format_version": _FORMAT_VERSION, "args": args, "codec": "ffv1",
            "questions": QUESTIONS}  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def _info(**args) -> dict:
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(generate).parameters.items()
        if k not in ("out", "progress")
    }
    return {**defaults, **args, "kinds": list(args.get("kinds", KINDS))}


def is_current(out: str | Path, **generate_args) -> bool:
    """Whether `out` holds the dataset `generate(out, **generate_args)` would write."""
    path = Path(out) / "dataset.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (saved.get("generator") == _GENERATOR and saved.get("format_version") == _FORMAT_VERSION
            and saved.get("args") == _info(**generate_args))  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
