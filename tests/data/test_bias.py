"""The biased shapes benchmark: the asked correlation is the measured one, evaluation splits are balanced, the
attribute is really in the pixels, and captions name it only when asked."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.bias import TINTS, generate_biased, majority_values
from vlmkit.data.synthetic import SHAPES
from vlmkit.errors import ConfigError


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("rho", [0.5, 0.7, 0.95])
def test_the_training_split_has_the_asked_correlation_and_evaluation_is_balanced(tmp_path, rho):
    paths = generate_biased(tmp_path, strength=rho, num_train=300, num_val=40, num_test=20, progress=False)
    majority = majority_values()
    train = rows(paths["train"])
    per_shape = Counter(r["label"] for r in train)
    hits = Counter(r["label"] for r in train if r["background"] == majority[r["label"]])
    assert set(per_shape) == set(SHAPES) and all(n == 60 for n in per_shape.values())
    for shape in SHAPES:  # exactly round(rho * n_y) majority images per shape
        assert hits[shape] == round(rho * 60)
    record = json.loads(paths["dataset"].read_text())
    assert record["measured_strength"] == pytest.approx(rho, abs=1 / 60)
    assert record["strength"] == rho and record["majority"] == majority
    for split, n in (("val", 40), ("test", 20)):
        cells = Counter((r["label"], r["background"]) for r in rows(paths[split]))
        assert len(cells) == len(SHAPES) * len(TINTS) and set(cells.values()) == {n // 10}


def background_rgb(root, row) -> np.ndarray:
    """The median colour of the pixels outside the object's box."""
    pixels = np.asarray(Image.open(root / row["image"]).convert("RGB"), dtype=float)
    keep = np.ones(pixels.shape[:2], bool)
    x0, y0, x1, y1 = row["objects"][0]["box"]
    keep[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
    return np.median(pixels[keep], axis=0)


def test_the_attribute_is_in_the_pixels_and_in_captions_only_when_asked(tmp_path):
    plain = generate_biased(tmp_path / "a", num_train=40, num_val=20, num_test=0, progress=False)
    for r in rows(plain["train"]) + rows(plain["val"]):
        r_, _, b = background_rgb(tmp_path / "a", r)
        assert (r_ > b + 20) if r["background"] == "warm" else (b > r_ + 20), r
        assert "warm" not in r["caption"] and "cool" not in r["caption"]
        assert r["objects"][0]["shape"] == r["label"] and len(r["objects"]) == 1
    said = generate_biased(tmp_path / "b", num_train=40, num_val=0, num_test=0, mention=True, progress=False)
    for r in rows(said["train"]):
        other = "cool" if r["background"] == "warm" else "warm"
        assert f"{r['background']} background" in r["caption"] and other not in r["caption"]


def test_the_same_arguments_give_the_same_files(tmp_path):
    a = generate_biased(tmp_path / "a", num_train=30, num_val=10, num_test=10, seed=3, progress=False)
    b = generate_biased(tmp_path / "b", num_train=30, num_val=10, num_test=10, seed=3, progress=False)
    for split in ("train", "val", "test"):
        assert a[split].read_text() == b[split].read_text()
    for r in rows(a["train"]):
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="--bias must be one of background"):
        generate_biased(tmp_path, attribute="gender")
    with pytest.raises(ConfigError, match=r"--bias-strength must be in \[0, 1\]"):
        generate_biased(tmp_path, strength=1.5)
