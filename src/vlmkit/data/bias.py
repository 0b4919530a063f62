"""A shapes benchmark with a known bias, built as Waterbirds and SpuCo-MNIST are: a sensitive attribute `a`
correlated with the label `y` in the training split, balanced over y x a in validation and test.

- label `y`: the shape of the scene's one object (five classes); its colour is drawn uniformly, so colour
  says nothing about y;
- attribute `a`, `background`: the background's tint family, `warm` (peach) or `cool` (light blue), both
  pale enough that no object colour is mistaken for it; the grey texture of the shapes data is kept.
  Each shape has a majority tint (alternating over the sorted shapes: circle warm, diamond cool, ...);
- strength `rho`: in the training split exactly round(rho * n_y) images of each shape y carry its majority
  tint (rho = 0.5: no correlation; 0.95: Waterbirds' strength); validation and test have the same number
  of images in every (shape, tint) cell;
- captions name the object as the shapes data does; with `mention=True` they also name the tint ("... on
  a warm background"), so a text encoder can learn the association too.

Manifest rows carry `label` and the attribute as columns (`{"image", "caption", "label": "circle",
"background": "warm", "objects": [...]}`): `vlmkit audit --attribute background` reads them, as it reads
the same columns of a user's manifest. dataset.json records the mapping, the asked and the measured rho.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlmkit.data.synthetic import COLOURS, SHAPES, SIZES, _check_scene_args, _pick, _prepare_output, _render
from vlmkit.data.synthetic import caption_scene as _caption_scene
from vlmkit.errors import ConfigError

BIAS_ATTRIBUTES = ("background",)
TINTS: dict[str, tuple[int, int, int]] = {"warm": (238, 212, 188), "cool": (188, 212, 238)}
_TINT_JITTER = 8  # per channel: within a family tints vary, between families they never meet
_STREAMS = {"train": 10, "val": 11, "test": 12}  # apart from the shapes data's streams
_GENERATOR = "vlmkit.data.synthetic"  # _prepare_output recognises (and replaces) its own earlier output


def majority_values(attribute: str = "background") -> dict[str, str]:
    """Each shape's majority attribute value: the values alternate over the sorted shapes."""
    values = list(TINTS)
    return {shape: values[i % len(values)] for i, shape in enumerate(sorted(SHAPES))}


def _cells(split: str, n: int, rho: float, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, value) of every image of a split, shuffled: exactly round(rho * n_y) majority images per shape
    in train; equal cells in val and test (the remainder of n spread one image at a time)."""
    shapes, values, majority = sorted(SHAPES), list(TINTS), majority_values()
    per_shape = [n // len(shapes) + (i < n % len(shapes)) for i in range(len(shapes))]
    cells: list[tuple[str, str]] = []
    for shape, n_y in zip(shapes, per_shape, strict=True):
        if split == "train":
            k = round(rho * n_y)
            minority = [v for v in values if v != majority[shape]]
            cells += [(shape, majority[shape])] * k + [
                (shape, minority[i % len(minority)]) for i in range(n_y - k)
            ]
        else:
            cells += [(shape, values[i % len(values)]) for i in range(n_y)]
    order = rng.permutation(len(cells))
    return [cells[i] for i in order]


def _caption(meta: dict, value: str, mention: bool, rng: np.random.Generator) -> str:
    caption = _caption_scene(meta, rng)
    if not mention:
        return caption
    if " background" in caption:  # "... on a textured background" -> "... on a textured warm background"
        return caption.replace(" background", f" {value} background", 1)
    return f"{caption} on a {value} background"


def generate_biased(
    out: str | Path,
    attribute: str = "background",
    strength: float = 0.9,
    mention: bool = False,
    num_train: int = 4000,
    num_val: int = 500,
    num_test: int = 500,
    image_size: int = 64,
    background_noise: float = 0.3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the biased benchmark (see the module docstring) to `out`: train.jsonl, val.jsonl, test.jsonl,
    images/ and dataset.json. The same arguments give the same files."""
    if attribute not in BIAS_ATTRIBUTES:
        raise ConfigError(f"--bias must be one of {', '.join(BIAS_ATTRIBUTES)}, not {attribute!r}")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(
            f"--bias-strength must be in [0, 1] (P(majority attribute | label)), not {strength}"
        )
    for key, value in {
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "seed": seed,
    }.items():
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0 (got {value!r})")
    _check_scene_args(image_size, 1, background_noise)
    out = Path(out)
    _prepare_output(out)
    (out / "test.jsonl").unlink(missing_ok=True)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    rows: dict[str, list[dict]] = {}
    with tqdm(total=sum(counts.values()), desc="biased shapes", unit="img", disable=not progress) as bar:
        for split, n in counts.items():
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            cells = _cells(split, n, strength, np.random.default_rng([seed, _STREAMS[split]]))
            rows[split] = []
            for index, (shape, value) in enumerate(cells):
                rng = np.random.default_rng([seed, _STREAMS[split], 1, index])
                tint = np.asarray(TINTS[value], dtype=np.float32) + rng.integers(
                    -_TINT_JITTER, _TINT_JITTER + 1, 3
                )
                objects = [(_pick(rng, tuple(COLOURS)), shape, _pick(rng, SIZES))]
                image, meta = _render(rng, objects, image_size, background_noise, tint)
                path = out / "images" / split / f"{index:06d}.png"
                image.save(path, format="PNG", compress_level=1)
                rows[split].append(
                    {
                        "image": path.relative_to(out).as_posix(),
                        "caption": _caption(meta, value, mention, rng),
                        "label": shape,
                        attribute: value,
                        "objects": meta["objects"],
                    }
                )
                bar.update(1)
    paths = {split: out / f"{split}.jsonl" for split in counts}
    for split, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[split]), encoding="utf-8")
    majority = majority_values(attribute)
    measured = (
        sum(r[attribute] == majority[r["label"]] for r in rows["train"]) / len(rows["train"])
        if rows["train"]
        else None
    )
    record = {
        "generator": _GENERATOR,
        "kind": "biased",
        "seed": seed,
        "attribute": attribute,
        "values": list(TINTS),
        "tints": {k: list(v) for k, v in TINTS.items()},
        "label": "shape",
        "classes": sorted(SHAPES),
        "majority": majority,
        "strength": strength,
        "measured_strength": measured,
        "captions_mention_attribute": mention,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "background_noise": background_noise,
        "files": {k: p.relative_to(out).as_posix() for k, p in paths.items()},
    }
    paths["dataset"] = out / "dataset.json"
    paths["dataset"].write_text(json.dumps(record, indent=2) + "\n")  # last: marks a complete output
    return paths


__all__ = ["BIAS_ATTRIBUTES", "TINTS", "generate_biased", "majority_values"]
