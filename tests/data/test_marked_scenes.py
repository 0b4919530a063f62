"""`vlmkit data synth --marked-fraction`: scenes with a drawn mark around one object, captioned by that object."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.synthetic import generate
from vlmkit.data.visual_prompts import MARK_COLOUR
from vlmkit.errors import ConfigError


def test_marked_scenes_name_the_marked_object_and_show_the_mark(tmp_path):
    args = dict(num_train=40, num_val=4, num_per_class_train=0, num_per_class_val=0, num_workers=0, progress=False,
                object_weights=(1, 1, 1, 1))  # fmt: skip
    generate(tmp_path / "plain", **args)
    generate(tmp_path / "marked", marked_fraction=0.25, **args)
    plain = [json.loads(x) for x in (tmp_path / "plain" / "train.jsonl").read_text().splitlines()]
    marked = [json.loads(x) for x in (tmp_path / "marked" / "train.jsonl").read_text().splitlines()]
    rows = [(p, m) for p, m in zip(plain, marked) if "mark" in m]
    assert len(rows) == 10  # a quarter of the 40 rows
    for p, m in rows:
        assert len(m["objects"]) >= 2 and m["objects"] == p["objects"]
        obj = m["objects"][m["mark"]["object"]]
        assert obj["colour"] in m["caption"] and obj["shape"] in m["caption"]
        others = {o["shape"] for o in m["objects"]} - {obj["shape"]}
        assert not any(s in m["caption"] for s in others)  # the caption names the marked object alone
        img = np.asarray(Image.open(tmp_path / "marked" / m["image"])).astype(int)
        src = np.asarray(Image.open(tmp_path / "plain" / p["image"])).astype(int)
        changed = np.abs(img - src).sum(-1) > 0
        assert changed.any() and (img[changed].mean(0) < src[changed].mean(0)).all()  # darker: a black line
    for p, m in zip(plain, marked):  # the other rows are untouched
        if "mark" not in m:
            assert m == p
    assert json.loads((tmp_path / "marked" / "dataset.json").read_text())["marked_fraction"] == 0.25
    assert tuple(MARK_COLOUR) == (0, 0, 0)
    with pytest.raises(ConfigError, match="marked_fraction must be in"):
        generate(tmp_path / "bad", marked_fraction=1.5, **args)
