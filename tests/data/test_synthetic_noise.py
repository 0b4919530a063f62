"""The noisy-pool options of the synthetic dataset: each corruption is what it claims, and only that."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.synthetic import TINY_SIZE, generate, is_current
from vlmkit.errors import ConfigError

FRACTIONS = dict(mismatch_fraction=0.2, duplicate_fraction=0.2, tiny_fraction=0.1, blank_fraction=0.1)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    args = dict(num_train=100, num_val=10, num_per_class_train=0, num_per_class_val=0, image_size=32)
    clean = generate(root / "clean", progress=False, num_workers=0, **args)
    noisy = generate(root / "noisy", progress=False, num_workers=0, **args, **FRACTIONS)
    return root, clean, noisy


def test_each_corruption_has_its_share_and_clean_rows_are_untouched(pools):
    root, clean, noisy = pools
    clean_rows, noisy_rows = read_rows(clean["train"]), read_rows(noisy["train"])
    counts = Counter(row["corruption"] for row in noisy_rows)
    assert counts == {None: 40, "mismatched": 20, "duplicate": 20, "tiny": 10, "blank": 10}
    for a, b in zip(clean_rows, noisy_rows, strict=True):
        if b["corruption"] is None:
            assert a == {k: v for k, v in b.items() if k != "corruption"}
            assert md5(root / "clean" / a["image"]) == md5(root / "noisy" / b["image"])
    # val is never corrupted
    assert read_rows(clean["val"]) == read_rows(noisy["val"])
    assert json.loads(noisy["dataset"].read_text())["noise"] == {
        "mismatched": 0.2, "duplicate": 0.2, "tiny": 0.1, "blank": 0.1,
    }  # fmt: skip


def test_mismatched_rows_carry_another_scenes_caption_over_their_own_image(pools):
    root, clean, noisy = pools
    clean_rows, noisy_rows = read_rows(clean["train"]), read_rows(noisy["train"])
    captions = {row["caption"] for row in clean_rows}
    for a, b in zip(clean_rows, noisy_rows, strict=True):
        if b["corruption"] == "mismatched":
            assert b["caption"] != a["caption"] and b["caption"] in captions
            assert b["objects"] == a["objects"]  # the ground truth still describes the image
            assert md5(root / "clean" / a["image"]) == md5(root / "noisy" / b["image"])


def test_duplicates_are_byte_copies_of_a_few_popular_clean_images_with_their_captions(pools):
    root, _, noisy = pools
    rows = read_rows(noisy["train"])
    by_hash = {md5(root / "noisy" / r["image"]): r for r in rows if r["corruption"] is None}
    dups = [r for r in rows if r["corruption"] == "duplicate"]
    sources = Counter()
    for r in dups:
        source = by_hash[md5(root / "noisy" / r["image"])]  # KeyError if not a copy of a clean image
        assert r["caption"] == source["caption"]
        sources[source["image"]] += 1
    assert len(sources) <= len(dups) // 5  # few sources, many copies each


def test_tiny_and_blank_images(pools):
    root, clean, noisy = pools
    for a, b in zip(read_rows(clean["train"]), read_rows(noisy["train"]), strict=True):
        with Image.open(root / "noisy" / b["image"]) as img:
            pixels = np.asarray(img.convert("RGB"))
        if b["corruption"] == "tiny":
            assert pixels.shape == (TINY_SIZE, TINY_SIZE, 3)
            assert b["caption"] == a["caption"]
        elif b["corruption"] == "blank":
            assert pixels.shape == (32, 32, 3) and (pixels == pixels[0, 0]).all()
            assert b["caption"] == a["caption"]


def test_same_seed_same_pool(pools, tmp_path):
    root, _, noisy = pools
    args = dict(num_train=100, num_val=10, num_per_class_train=0, num_per_class_val=0, image_size=32)
    again = generate(tmp_path / "again", progress=False, num_workers=0, **args, **FRACTIONS)
    assert read_rows(again["train"]) == read_rows(noisy["train"])


@pytest.mark.parametrize(
    "bad",
    [dict(mismatch_fraction=1.2), dict(tiny_fraction=-0.1), dict(mismatch_fraction=0.5, blank_fraction=0.5)],
)
def test_bad_fractions_are_config_errors(tmp_path, bad):
    with pytest.raises(ConfigError, match="fraction"):
        generate(tmp_path / "x", num_train=10, num_val=0, num_per_class_train=0, num_per_class_val=0, **bad)


def test_is_current_compares_the_recorded_settings(pools):
    root, clean, noisy = pools
    args = dict(num_train=100, num_val=10, num_per_class_train=0, num_per_class_val=0, image_size=32)
    assert is_current(root / "noisy", seed=0, **args, **FRACTIONS)
    assert is_current(root / "clean", seed=0, **args)
    assert not is_current(root / "clean", seed=0, **args, **FRACTIONS)
    assert not is_current(root / "noisy", seed=0, **args, **{**FRACTIONS, "tiny_fraction": 0.2})
    assert not is_current(root / "noisy", seed=1, **args, **FRACTIONS)
    assert not is_current(root / "missing", seed=0)
