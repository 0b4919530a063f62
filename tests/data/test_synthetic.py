"""The synthetic shapes dataset: determinism, layout on disk, captions, and boxes against rendered pixels.

Pixels are checked with an independent reading of the image: the background is nearly grey, so a
pixel whose channels spread widely belongs to an object, and its nearest palette colour names it.
"""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from vlmkit.data import synthetic
from vlmkit.data.synthetic import (
    COLOURS,
    SHAPES,
    SIZES,
    caption_scene,
    count_word,
    generate,
    plural,
    render_scene,
)
from vlmkit.errors import ConfigError, DataError

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (C, 3)
NAMES = list(COLOURS)
SMALL = dict(num_train=12, num_val=6, num_per_class_train=2, num_per_class_val=1, progress=False)
COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def spread(pixels: np.ndarray) -> np.ndarray:
    """max - min over RGB: near 0 for the grey background, large for every palette colour."""
    pixels = pixels.astype(np.int64)
    return pixels.max(axis=-1) - pixels.min(axis=-1)


def nearest_colour(pixels: np.ndarray) -> list[str]:
    distances = ((pixels.reshape(-1, 1, 3).astype(np.float64) - PALETTE) ** 2).sum(-1)  # (N, C)
    return [NAMES[i] for i in distances.argmin(axis=1)]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, generate(out, seed=0, num_workers=0, **SMALL)


def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    monkeypatch.setattr(synthetic, "_CHUNK", 5)  # small chunks, so a real 2-process pool runs
    generate(tmp_path / "again", seed=0, num_workers=2, **SMALL)
    first, again = all_files(root), all_files(tmp_path / "again")
    assert len(first) == 12 + 6 + 30 * 3 + 4
    assert first == again

    generate(tmp_path / "other", seed=1, num_workers=0, **SMALL)
    other = all_files(tmp_path / "other")
    assert other.keys() == first.keys()
    images = [name for name in first if name.endswith(".png")]
    assert sum(first[name] == other[name] for name in images) == 0


def test_splits_draw_from_different_streams(dataset):
    root, paths = dataset
    train, val = read_jsonl(paths["train"]), read_jsonl(paths["val"])
    assert train[0]["objects"] != val[0]["objects"]
    assert (root / train[0]["image"]).read_bytes() != (root / val[0]["image"]).read_bytes()


def test_layout_counts_and_manifests(dataset):
    root, paths = dataset
    assert set(paths) == {"train", "val", "classification_train", "classification_val", "classes", "dataset"}
    assert all(path.exists() for path in paths.values())

    for split, count in (("train", 12), ("val", 6)):
        rows = read_jsonl(paths[split])
        assert len(rows) == count
        assert [row["image"] for row in rows] == [f"images/{split}/{i:06d}.png" for i in range(count)]
        for row in rows:
            assert set(row) == {"image", "caption", "objects"}
            assert 1 <= len(row["objects"]) <= 4
            with Image.open(root / row["image"]) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)

    folders = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)
    assert len(folders) == 30
    for split, per_class in (("classification_train", 2), ("classification_val", 1)):
        assert sorted(p.name for p in paths[split].iterdir()) == folders
        for folder in folders:
            assert len(list((paths[split] / folder).glob("*.png"))) == per_class
    assert paths["classes"].read_text().splitlines() == [f.replace("_", " ") for f in folders]

    record = json.loads(paths["dataset"].read_text())
    assert record["seed"] == 0 and record["num_train"] == 12 and record["num_val"] == 6
    assert record["num_per_class_train"] == 2 and record["image_size"] == 64
    assert record["colours"] == {k: list(v) for k, v in COLOURS.items()}
    assert record["shapes"] == list(SHAPES) and record["sizes"] == list(SIZES)


def test_vocabulary():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 5 and SIZES == ("small", "large")
    # every pair of palette colours far apart, so anti-aliasing and jitter cannot confuse them
    gaps = np.sqrt(((PALETTE[:, None] - PALETTE[None]) ** 2).sum(-1))[np.triu_indices(len(PALETTE), 1)]
    assert gaps.min() > 80
    assert spread(PALETTE).min() > 100


@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0])
def test_boxes_hold_their_object_and_nothing_lies_outside(noise):
    for seed in range(40):
        image, meta = render_scene(np.random.default_rng(seed), image_size=64, background_noise=noise)
        pixels = np.asarray(image)  # (64, 64, 3)
        assert pixels.shape == (64, 64, 3) and meta["image_size"] == 64
        outside = np.ones((64, 64), dtype=bool)
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            outside[y0:y1, x0:x1] = False
            # position words re-derived from the box centre, by thirds of the image
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            assert obj["hpos"] == ("left", "centre", "right")[min(int(cx * 3 / 64), 2)]
            assert obj["vpos"] == ("top", "middle", "bottom")[min(int(cy * 3 / 64), 2)]
            box = pixels[y0:y1, x0:x1].reshape(-1, 3)
            coloured = box[spread(box) > 80]
            assert len(coloured) >= 0.3 * len(box), (seed, obj)
            colour, votes = Counter(nearest_colour(coloured)).most_common(1)[0]
            assert colour == obj["colour"] and votes >= 0.8 * len(coloured), (seed, obj)
        # anti-aliased edges included, no object colour leaks past its box
        assert spread(pixels[outside]).max() < 30, seed


def test_object_count_is_respected_and_objects_do_not_overlap():
    for k in range(1, 5):
        for seed in range(10):
            image, meta = render_scene(np.random.default_rng(seed), num_objects=k)
            assert len(meta["objects"]) == k
            mask = spread(np.asarray(image)) > 35
            _, components = ndimage.label(mask, structure=np.ones((3, 3)))
            assert components == k, (k, seed)


def test_classification_images_hold_one_object_of_their_class(dataset):
    _, paths = dataset
    for path in sorted(paths["classification_train"].rglob("*.png")):
        colour, shape = path.parent.name.split("_")
        pixels = np.asarray(Image.open(path))
        mask = spread(pixels) > 35
        _, components = ndimage.label(mask, structure=np.ones((3, 3)))
        assert components == 1, path
        votes = Counter(nearest_colour(pixels[spread(pixels) > 80]))
        assert votes.most_common(1)[0][0] == colour, path
        # the outline: a star is concave, a triangle and a diamond fill half their box, the rest fill more
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        corners = np.concatenate([np.stack([xs, ys], 1) + d for d in ([0, 0], [1, 0], [0, 1], [1, 1])])
        solidity = mask.sum() / ConvexHull(corners.astype(np.float64)).volume
        if shape == "star":
            assert solidity < 0.75, path
        else:
            assert solidity > 0.78, path
            assert (fill < 0.62) == (shape in ("triangle", "diamond")), path


def test_every_caption_names_and_counts_every_object():
    phrase = re.compile(r"\b(a|an|one|two|three|four) (small |large )?(\w+) (\w+?)(s?)\b")
    for seed in range(300):
        rng = np.random.default_rng(seed)
        _, meta = render_scene(rng, background_noise=0.3)
        caption = caption_scene(meta, rng)
        want = Counter((o["colour"], o["shape"]) for o in meta["objects"])
        found = {}
        for article, size, colour, shape, s in phrase.findall(caption):
            if colour in COLOURS and shape in SHAPES:
                assert (s == "s") == (COUNTS[article] > 1), caption
                if article in ("a", "an"):
                    assert (article == "an") == ((size or colour)[0] in "aeiou"), caption
                found[(colour, shape)] = COUNTS[article]
        assert found == dict(want), (caption, meta["objects"])


def test_caption_grammar_on_a_hand_built_scene():
    def obj(colour, shape, size, hpos, vpos):
        return {"colour": colour, "shape": shape, "size": size, "hpos": hpos, "vpos": vpos}

    meta = {
        "objects": [
            obj("red", "circle", "small", "left", "top"),
            obj("blue", "square", "large", "right", "middle"),
            obj("red", "circle", "small", "left", "bottom"),
            obj("orange", "star", "large", "centre", "middle"),
        ]
    }
    captions = {caption_scene(meta, np.random.default_rng(seed)) for seed in range(400)}
    assert len(captions) > 50  # the templates and optional words really vary
    for caption in captions:
        assert re.search(r"\btwo (small )?red circles( on the left)?\b", caption), caption
        assert re.search(r"\b(a|one) (large )?blue square( on the right)?\b", caption), caption
        assert re.search(
            r"\b(an orange|one (large )?orange|a large orange) star( in the centre)?\b", caption
        ), caption
        assert "red circle " not in caption and "blue squares" not in caption and "a orange" not in caption
        if caption.startswith("there "):
            assert caption.startswith("there are two "), caption
        if "shapes" in caption:
            assert caption.startswith("four shapes"), caption
    assert "two small red circles on the left" in " | ".join(captions)
    assert any("on a" in c and "background" in c for c in captions)

    single = {"objects": [obj("green", "diamond", "small", "centre", "top")]}
    captions = {caption_scene(single, np.random.default_rng(seed)) for seed in range(200)}
    assert any(c.startswith("there is a ") for c in captions)
    assert any(c.startswith("one shape: ") for c in captions)
    assert any(c.endswith("green diamond at the top") for c in captions)
    assert not any("diamonds" in c or "shapes" in c for c in captions)


def test_count_words_and_plurals():
    assert [count_word(n) for n in range(1, 5)] == ["one", "two", "three", "four"]
    assert count_word(12) == "12"
    assert plural("circle", 1) == "circle" and plural("circle", 2) == "circles"
    assert plural("shape", 0) == "shapes"


def test_same_rng_state_gives_same_scene_and_caption():
    a_image, a_meta = render_scene(np.random.default_rng(7), background_noise=0.5)
    b_image, b_meta = render_scene(np.random.default_rng(7), background_noise=0.5)
    assert a_meta == b_meta and a_image.tobytes() == b_image.tobytes()
    c_image, _ = render_scene(np.random.default_rng(8), background_noise=0.5)
    assert c_image.tobytes() != a_image.tobytes()


def test_background_noise_adds_grey_texture():
    def background_std(noise):
        image, _ = render_scene(np.random.default_rng(3), num_objects=1, background_noise=noise)
        pixels = np.asarray(image).astype(np.float64)
        return pixels[spread(pixels) < 30].mean(-1).std()

    assert background_std(0.0) < 1.0
    assert background_std(0.3) > 3.0
    assert background_std(1.0) > 2 * background_std(0.3)


def test_user_mistakes_raise_one_line_errors(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="num_objects"):
        render_scene(rng, num_objects=5)
    with pytest.raises(ConfigError, match="image_size"):
        render_scene(rng, image_size=16)
    with pytest.raises(ConfigError, match="background_noise"):
        render_scene(rng, background_noise=2.0)
    with pytest.raises(DataError, match="objects"):
        caption_scene({"objects": []}, rng)
    with pytest.raises(ConfigError, match="num_train"):
        generate(tmp_path / "x", num_train=-1, progress=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_regenerating_replaces_an_earlier_output(tmp_path):
    generate(tmp_path, num_workers=0, **SMALL)
    paths = generate(tmp_path, num_workers=0, **{**SMALL, "num_train": 3, "num_per_class_train": 1})
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 3
    assert len(read_jsonl(paths["train"])) == 3
    assert len(list(paths["classification_train"].rglob("*.png"))) == 30


def test_object_weights_set_the_number_of_objects(tmp_path):
    paths = generate(tmp_path / "one", num_train=20, num_val=0, image_size=32, num_per_class_train=0,
                     num_per_class_val=0, progress=False, object_weights=(1, 0, 0, 0))  # fmt: skip
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["objects"]) == 1 for r in rows)
    with pytest.raises(ConfigError, match="object_weights"):
        generate(tmp_path / "bad", num_train=1, object_weights=(1, 1), progress=False)
