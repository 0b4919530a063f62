"""Foils from scene metadata: each differs from the true caption in one way and never describes the scene."""

import json
import re

import numpy as np

from vlmkit.data.compositional import FOIL_TYPES, describe, foils_for
from vlmkit.data.synthetic import SHAPES
from vlmkit.data.vqa import relation_holds, write_tasks

LEFT, RIGHT = [2, 20, 14, 32], [40, 20, 52, 32]


def obj(colour, shape, box):
    return {"colour": colour, "shape": shape, "box": box, "size": "small"}


def groups_in(text: str) -> set[tuple[str, str, int]]:
    """(colour, shape, count) of every "two red circles" / "a blue star" phrase."""
    words = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    out = set()
    for count, colour, shape in re.findall(
        r"\b(a|an|one|two|three|four|five) (\w+) (\w+?)s?\b(?= and|,|$)", text
    ):
        out.add((colour, shape, words[count]))
    return out


def test_a_two_object_scene_gets_every_foil_type():
    scene = [obj("red", "circle", LEFT), obj("blue", "star", RIGHT)]
    rows = {r["type"]: r for r in foils_for(scene, np.random.default_rng(0), relation_holds)}
    assert set(rows) == set(FOIL_TYPES)
    assert rows["attribute_swap"]["caption"] == "a red circle and a blue star"
    assert rows["attribute_swap"]["foils"] == [
        {"text": "a blue circle and a red star", "type": "attribute_swap"}
    ]
    relation = rows["relation_swap"]
    assert relation["caption"] in ("a red circle left of a blue star", "a blue star right of a red circle")
    assert relation["foils"][0]["text"] == relation["caption"].replace("left of", "X").replace(
        "right of", "left of"
    ).replace("X", "right of")
    true = groups_in(rows["wrong_count"]["caption"])
    assert true == {("red", "circle", 1), ("blue", "star", 1)}
    assert {c for _, _, c in groups_in(rows["wrong_count"]["foils"][0]["text"])} == {1, 2}


def test_foils_never_describe_the_scene_and_change_one_thing():
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "yellow"]
    for _ in range(200):
        n = int(rng.integers(1, 5))
        scene = [
            obj(
                colours[int(rng.integers(4))],
                SHAPES[int(rng.integers(len(SHAPES)))],
                [int(x) for x in sorted(rng.integers(0, 60, 2))] * 2,
            )
            for _ in range(n)
        ]
        present = {(o["colour"], o["shape"]) for o in scene}
        for row in foils_for(scene, rng, relation_holds):
            foil = row["foils"][0]["text"]
            assert foil != row["caption"]
            if row["type"] in ("attribute_swap", "wrong_colour", "wrong_shape"):
                assert {(c, s) for c, s, _ in groups_in(foil)} - present, (scene, foil)
                assert len(foil.split()) == len(row["caption"].split())
            if row["type"] == "wrong_count":
                assert {(c, s) for c, s, _ in groups_in(foil)} == present


def test_describe_counts_in_words():
    assert describe(
        [{"colour": "red", "shape": "circle", "count": 2}, {"colour": "orange", "shape": "star", "count": 1}]
    ) == ("two red circles and an orange star")


def test_write_tasks_writes_the_compositional_file(shapes_dir, tmp_path):
    import shutil

    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data)
    write_tasks(data, splits=("val",))
    rows = [json.loads(line) for line in (data / "val_compositional.jsonl").read_text().splitlines()]
    assert rows and {r["type"] for r in rows} >= {
        "attribute_swap",
        "wrong_count",
        "wrong_colour",
        "wrong_shape",
    }
    assert all((data / r["image"]).is_file() and r["foils"] for r in rows)
    first = (data / "val_compositional.jsonl").read_bytes()
    write_tasks(data, splits=("val",))
    assert (data / "val_compositional.jsonl").read_bytes() == first  # deterministic
