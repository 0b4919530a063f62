"""The scene reader: hand-drawn shapes read as drawn, rendered scenes read as their metadata say, and what it
cannot read is one line."""

from __future__ import annotations

import math

import pytest
from PIL import Image, ImageDraw

from vlmkit.data.synthetic import COLOURS, generate
from vlmkit.errors import DataError
from vlmkit.eval.scene_analysis import analyse, check_against_metadata


def _polygon(cx: float, cy: float, r: float, n: int, start: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]  # fmt: skip


def test_hand_drawn_shapes_read_as_drawn():
    image = Image.new("RGB", (64, 64), (215, 212, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse([3, 3, 27, 27], fill=COLOURS["red"])  # a large circle, top left (radius 12 = 0.19 of 64)
    draw.rectangle([48, 26, 59, 37], fill=COLOURS["blue"])  # a small square on the right
    draw.polygon(_polygon(32, 50, 9, 3, -math.pi / 2), fill=COLOURS["green"])  # a small triangle, bottom
    draw.polygon(_polygon(50, 8, 7, 4, 0.0), fill=COLOURS["yellow"])  # a small diamond, top right
    found = {(o.colour, o.shape, o.size, o.position) for o in analyse(image)}
    assert found == {
        ("red", "circle", "large", "top left"),
        ("blue", "square", "small", "right"),
        ("green", "triangle", "small", "bottom"),
        ("yellow", "diamond", "small", "top right"),
    }
    # a star, large, in the middle; a grey blot (unsaturated) is background, a speck is noise
    image = Image.new("RGB", (64, 64), (215, 212, 220))
    draw = ImageDraw.Draw(image)
    outer, inner = _polygon(32, 32, 15, 5, -math.pi / 2), _polygon(32, 32, 7, 5, -math.pi / 2 + math.pi / 5)
    draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=COLOURS["purple"])
    draw.ellipse([2, 2, 14, 14], fill=(120, 120, 125))
    draw.point((60, 60), fill=COLOURS["orange"])
    [star] = analyse(image)
    assert (star.colour, star.shape, star.size, star.position) == ("purple", "star", "large", "centre")


def test_rendered_scenes_read_as_their_metadata_say(tmp_path):
    generate(
        tmp_path, num_train=0, num_val=80, image_size=64, background_noise=0.2, progress=False, num_workers=0
    )
    r = check_against_metadata(tmp_path / "val.jsonl")
    assert r["images"] == 80 and r["objects"] >= 80
    acc = r["accuracy"]
    assert acc["colour"] == 1.0 and acc["size"] >= 0.97 and acc["shape"] >= 0.95 and acc["count"] >= 0.97
    assert acc["position"] >= 0.9 and r["all_correct"] >= 0.85
    assert check_against_metadata(tmp_path / "val.jsonl", limit=5)["images"] == 5


def test_what_it_cannot_read_is_one_line(tmp_path):
    with pytest.raises(DataError, match="square RGB images"):
        analyse(Image.new("RGB", (64, 32)))
    with pytest.raises(DataError, match="scene file not found"):
        check_against_metadata(tmp_path / "nope.jsonl")
    assert analyse(Image.new("RGB", (64, 64), (220, 220, 220))) == []
