"""Compositional foils for the shapes scenes: a true caption and captions that differ from it in one way.

A dual encoder compares two vectors and treats a caption much like a bag of words, so "two red circles and a
blue star" and "two blue circles and a red star" look alike to it. Each row of `{split}_compositional.jsonl`
holds an image, a true caption and a foil of one type (`FOIL_TYPES`), written from the scene's metadata:

- attribute_swap: the colours of two groups of objects exchanged ("a blue circle and a red star");
- relation_swap: "a red circle left of a blue star" -> "... right of ...", for objects clearly placed;
- wrong_count: one group's count off by one;
- wrong_colour / wrong_shape: one group's colour (shape) replaced by one that no object in the scene has
  with that shape (colour).

A foil never describes the scene: a swapped or replaced colour-shape pair is never one the scene holds. The
true captions use the training captions' words ("two red circles and a blue star"). `vlmkit eval
compositional` scores how often a model prefers the true caption.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from vlmkit.data.synthetic import COLOURS, SHAPES, _article, count_word, plural

FOIL_TYPES = ("attribute_swap", "relation_swap", "wrong_count", "wrong_colour", "wrong_shape")

_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _groups(objects: list[dict]) -> list[dict]:
    """Objects of one colour and shape, counted, in order of first appearance."""
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (obj["colour"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    return [{"colour": c, "shape": s, "count": n} for (c, s), n in groups.items()]


def _phrase(group: dict) -> str:
    n = group["count"]
    head = _article(group["colour"]) if n == 1 else count_word(n)
    return f"{head} {group['colour']} {plural(group['shape'], n)}"


def describe(groups: list[dict]) -> str:
    """ "two red circles and a blue star": every group, in the training captions' words."""
    phrases = [_phrase(g) for g in groups]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def unique_objects(objects: list[dict]) -> list[dict]:
    """Objects that are the only one of their colour and shape: "the red square" names exactly them."""
    names = Counter((o["colour"], o["shape"]) for o in objects)
    return [o for o in objects if names[(o["colour"], o["shape"])] == 1]


def relation_facts(objects: list[dict], relation_holds) -> list[tuple[dict, dict, str]]:
    """(a, b, relation) for every pair of unique objects and relation that `relation_holds(a, b, relation)`
    judges clearly true."""
    unique = unique_objects(objects)
    return [
        (a, b, rel)
        for a in unique
        for b in unique
        if a is not b
        for rel in _RELATIONS
        if relation_holds(a, b, rel)
    ]


def _choice(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def foils_for(objects: list[dict], rng: np.random.Generator, relation_holds) -> list[dict]:
    """Rows {"caption", "foils": [{"text", "type"}], "type"} for one scene: at most one per foil type.
    `relation_holds(a, b, relation)` judges a spatial relation (True, False, or None when unclear)."""
    groups = _groups(objects)
    present = {(g["colour"], g["shape"]) for g in groups}
    true = describe(groups)
    rows = []

    def row(kind: str, caption: str, foil: str) -> None:
        rows.append({"caption": caption, "foils": [{"text": foil, "type": kind}], "type": kind})

    swaps = [
        (i, j)
        for i, a in enumerate(groups)
        for j, b in enumerate(groups)
        if i < j
        and a["colour"] != b["colour"]
        and a["shape"] != b["shape"]
        and (b["colour"], a["shape"]) not in present
        and (a["colour"], b["shape"]) not in present
    ]
    if swaps:
        i, j = _choice(rng, swaps)
        swapped = [dict(g) for g in groups]
        swapped[i]["colour"], swapped[j]["colour"] = groups[j]["colour"], groups[i]["colour"]
        row("attribute_swap", true, describe(swapped))

    facts = relation_facts(objects, relation_holds)
    if facts:
        a, b, rel = _choice(rng, facts)
        name = lambda o: f"{_article(o['colour'])} {o['colour']} {o['shape']}"
        row("relation_swap", f"{name(a)} {rel} {name(b)}", f"{name(a)} {_RELATIONS[rel]} {name(b)}")

    i = int(rng.integers(len(groups)))
    counted = [dict(g) for g in groups]
    n = groups[i]["count"]
    counted[i]["count"] = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    row("wrong_count", true, describe(counted))

    for kind, key, values in (
        ("wrong_colour", "colour", list(COLOURS)),
        ("wrong_shape", "shape", list(SHAPES)),
    ):
        options = []
        for i, g in enumerate(groups):
            for value in values:
                changed = {**g, key: value}
                if value != g[key] and (changed["colour"], changed["shape"]) not in present:
                    options.append((i, value))
        if options:
            i, value = _choice(rng, options)
            foil = [dict(g) for g in groups]
            foil[i][key] = value
            row(kind, true, describe(foil))
    return rows


__all__ = ["FOIL_TYPES", "describe", "foils_for", "relation_facts", "unique_objects"]
