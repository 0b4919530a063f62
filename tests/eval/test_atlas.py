"""The neuron atlas: eta^2 and selectivity on hand-made activations, unit activations against a recomputation from
the block's parts, and `vlmkit atlas` end to end on rendered scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlmkit.cli.main import main
from vlmkit.errors import ConfigError
from vlmkit.eval.atlas import correlation_ratio, selectivity, unit_activations, vocabulary
from vlmkit.models.registry import create_model


def test_correlation_ratio_by_hand():
    assert correlation_ratio(np.array([1.0, 1.0, 3.0, 3.0]), ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert correlation_ratio(np.array([1.0, 3.0, 1.0, 3.0]), ["a", "a", "b", "b"]) == pytest.approx(0.0)
    # group means 2 and 3, overall 2.5: between = 0.25; values 1,3,2,4 around 2.5: total = 1.25
    assert correlation_ratio(np.array([1.0, 3.0, 2.0, 4.0]), ["a", "a", "b", "b"]) == pytest.approx(0.2)
    assert correlation_ratio(np.ones(4), ["a", "b", "a", "b"]) == 0.0


def test_selectivity_finds_the_attribute_a_unit_reads():
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "blue", "green"], ["circle", "square"]
    attrs = [{"colour": colours[i % 3], "shape": shapes[(i // 3) % 2], "size": "small"} for i in range(120)]
    red = np.array([a["colour"] == "red" for a in attrs], dtype=float)
    acts = np.stack([3 * red + 0.1 * rng.standard_normal(120), rng.standard_normal(120)], 1)  # (N, 2)
    s = selectivity(acts, attrs)
    assert s[0]["selective"] and s[0]["attribute"] == "colour" and s[0]["preferred"] == "red"
    assert s[0]["eta2"]["colour"] > 0.95 and s[0]["eta2"]["shape"] < 0.05
    assert not s[1]["selective"]
    assert "position" not in s[0]["eta2"]  # only attributes every row has


@pytest.mark.parametrize("units", ["mlp", "residual"])
def test_unit_activations_against_the_blocks_parts(units):
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32}).eval()
    visual = clip.visual
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = visual.forward_hidden(images, 1)  # the input of block 1
        block = visual.transformer.blocks[1]
        y = x + block.attn(block.ln_1(x))
        hidden = block.mlp.act(block.mlp.fc1(block.ln_2(y)))  # (B, T, 4C)
        out = y + block.mlp(block.ln_2(y))
    expected = (hidden if units == "mlp" else out)[:, 1:].mean(1)
    got = unit_activations(visual, images, 1, units)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(
        unit_activations(visual, images, 1, units, "cls"), (hidden if units == "mlp" else out)[:, 0]
    )
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        unit_activations(visual, images, 7)


def test_vocabulary_counts_words_and_drops_stop_words():
    assert vocabulary(["a red circle", "two red circles and a star", "the star"]) == ["red", "star"]


def test_vlmkit_atlas_end_to_end(tmp_path):
    from vlmkit.data.synthetic import caption_scene, render_scene
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        image, meta = render_scene(rng, image_size=32, num_objects=1 + (i % 4 == 0))
        image.save(tmp_path / f"{i}.png")
        lines.append(
            json.dumps({"image": f"{i}.png", "caption": caption_scene(meta, rng), "objects": meta["objects"]})
        )
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    captions = [json.loads(line)["caption"] for line in lines]
    tok = Tokenizer.train(captions * 5, vocab_size=400, context_length=32)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 2, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.eot_token_id": tok.eot_token_id})  # fmt: skip
    folder = save_pretrained(clip, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    main(["atlas", "--model", str(folder), "--layer", "1", "--data", str(tmp_path / "d.jsonl"),
          "--out", str(tmp_path / "o")])  # fmt: skip
    res = json.loads((tmp_path / "o" / "atlas.json").read_text())
    m = res["metrics"]
    assert m["num_images"] == 24 and m["num_one_object"] == 18 and m["num_units"] == 4 * 128
    assert set(m["selective"]) == {"colour", "shape", "size", "position"}
    unit = res["units"][0]
    assert len(unit["top_images"]) == 8 and unit["top_activations"] == sorted(
        unit["top_activations"], reverse=True
    )
    assert len(unit["words"]) == 5 and all(w in vocabulary(captions) for w in unit["words"])
    html = (tmp_path / "o" / "atlas.html").read_text()
    assert "thumbnails/" in html and "Selective units" in html
