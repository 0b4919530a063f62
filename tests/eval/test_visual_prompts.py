"""Visual prompts: the marks, the crop and the blur on hand-made images, and `vlmkit eval visual-prompts`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.data.visual_prompts import MARK_COLOUR, apply_visual_prompt, blur_outside, crop_to_box, draw_mark
from vlmkit.models.registry import create_model


def _noise(seed=0, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_a_box_mark_outlines_the_grown_box_and_leaves_its_inside():
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    out = np.asarray(draw_mark(image, [20, 20, 40, 40], "box", width=1.0, margin=0.25))
    # grown by 5 px each side: the outline runs along x = 15 and y = 15 (4x supersampled, 1 px wide)
    assert (out[30, 15] == MARK_COLOUR).all() and (out[15, 30] == MARK_COLOUR).all()
    assert (out[30, 30] == 200).all() and (out[5, 5] == 200).all()  # inside and far outside untouched
    circle = np.asarray(draw_mark(image, [20, 20, 40, 40], "circle", width=1.0, margin=0.25))
    assert (circle[15, 15] == 200).all() and (circle[30, 15] < 100).all()  # no corner, a left edge
    with pytest.raises(ValueError, match="'circle' or 'box'"):
        draw_mark(image, [0, 0, 1, 1], "arrow")


def test_the_crop_is_square_holds_the_box_and_stays_inside():
    image = _noise()
    crop = crop_to_box(image, [50, 2, 62, 30], margin=0.0)  # 12 x 28 near the right edge
    assert crop.size == (28, 28)
    # the crop's pixels are the image's, from x = 64 - 28 (pushed back inside) and y = 2
    assert np.array_equal(np.asarray(crop), np.asarray(image)[2:30, 36:64])


def test_blur_keeps_the_box_and_blurs_the_rest():
    image = _noise()
    out = np.asarray(blur_outside(image, [16, 16, 32, 32], margin=0.0)).astype(int)
    src = np.asarray(image).astype(int)
    assert np.array_equal(out[17:31, 17:31], src[17:31, 17:31])
    assert np.abs(out[:10, :10] - src[:10, :10]).mean() > 30 and out[:10, :10].std() < src[:10, :10].std() / 2
    with pytest.raises(ValueError, match="unknown visual prompt"):
        apply_visual_prompt(image, [0, 0, 8, 8], "arrow")


def test_vlmkit_eval_visual_prompts_end_to_end(tmp_path):
    from vlmkit.data.synthetic import render_scene
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    rng = np.random.default_rng(3)
    lines, counts = [], []
    for i in range(6):
        image, meta = render_scene(rng, image_size=32, num_objects=2 + i % 2)
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "x", "objects": meta["objects"]}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    tok = Tokenizer.train(["a red circle.", "a blue square."] * 10, vocab_size=300, context_length=16)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 16,
                                        "text.eot_token_id": tok.eot_token_id})  # fmt: skip
    folder = save_pretrained(clip, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    main(["eval", "visual-prompts", "--model", str(folder), "--data", str(tmp_path / "s.jsonl"), "--out",
          str(tmp_path / "o")])  # fmt: skip
    m = json.loads((tmp_path / "o" / "visual_prompts.json").read_text())["metrics"]
    assert list(m["prompts"]) == ["none", "circle", "box", "crop", "blur"]
    from vlmkit.eval.saliency_eval import queries, read_scenes

    qs = queries(read_scenes(tmp_path / "s.jsonl"))
    counts = [q["objects"] for q in qs]
    assert m["num_queries"] == len(qs) and m["chance_among_scene_objects"] == pytest.approx(
        np.mean([1 / c for c in counts])
    )
    for r in m["prompts"].values():
        assert 0 <= r["right"] + r["other_object"] <= 1
    assert (tmp_path / "o" / "examples.png").is_file() and (tmp_path / "o" / "report.html").is_file()
