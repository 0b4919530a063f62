"""Residual decomposition: the contributions sum to the embedding, mean-ablation of a constant unit changes
nothing, TextSpan on a hand-made case, and `vlmkit decompose` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.errors import ConfigError
from vlmkit.eval.decompose import (
    component_means,
    decompose_image_embedding,
    embed_ablated,
    text_span,
)
from vlmkit.models.registry import create_model


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_the_contributions_sum_to_the_embedding(pool):
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.pool": pool}).eval()
    images = torch.randn(3, 3, 32, 32)
    d = decompose_image_embedding(clip.visual, images)
    with torch.no_grad():
        reference = clip.encode_image(images)
    L, nh = clip.cfg.vision.layers, clip.cfg.vision.heads
    assert d.heads.shape == (3, L, nh, clip.cfg.embed_dim)
    assert (d.total() - reference).abs().max() < 1e-5
    assert (d.layers().sum(1) + d.embed + d.norm_bias - reference).abs().max() < 1e-5
    assert d.heads[:, -1].abs().sum() > 0 and d.mlp[:, 0].abs().sum() > 0  # every term is a real one
    assert (embed_ablated(clip.visual, images, {}) - reference).abs().max() < 1e-5


def test_mean_ablation_leaves_the_output_unchanged_for_a_constant_head():
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32}).eval()
    visual = clip.visual
    C, nh = visual.cfg.width, visual.cfg.heads
    hs = C // nh
    with (
        torch.no_grad()
    ):  # layer 1, head 0 reads no value from its input: its output is its value bias, constant
        visual.transformer.blocks[1].attn.qkv.weight[2 * C : 2 * C + hs] = 0.0
        visual.transformer.blocks[1].attn.qkv.bias[2 * C : 2 * C + hs] = torch.randn(hs)
    batches = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    means = component_means(visual, batches)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        reference = clip.encode_image(images)
    same = embed_ablated(visual, images, {("head", 1, 0): means[("head", 1, 0)]})
    assert (same - reference).abs().max() < 1e-5
    other = embed_ablated(visual, images, {("head", 1, 1): means[("head", 1, 1)]})
    assert (other - reference).abs().max() > 1e-2
    # the layer's mean is the mean of its heads plus the bias
    assert torch.allclose(
        means[("attn", 1, None)],
        means[("head", 1, 0)] + means[("head", 1, 1)] + visual.transformer.blocks[1].attn.proj.bias,
        atol=1e-5,
    )


def test_text_span_by_hand():
    rng = np.random.default_rng(0)
    e = torch.eye(4)
    # contributions vary along e0 (std 2) and e1 (std 1), around a mean of 3 * e3
    a, b = torch.tensor(rng.standard_normal(400)), torch.tensor(rng.standard_normal(400))
    a, b = (a - a.mean()) / a.std(correction=0), (b - b.mean()) / b.std(correction=0)
    b = b - (b @ a) / (a @ a) * a  # exactly uncorrelated
    b = b / b.std(correction=0)
    contributions = (2 * a[:, None] * e[0] + b[:, None] * e[1] + 3 * e[3]).float()
    texts = ["along e1", "along e0 and e2", "along e2", "along e0"]
    emb = torch.stack([e[1], (e[0] + e[2]) / 2**0.5, e[2], e[0]])
    span = text_span(contributions, emb, texts, m=2)
    assert span.texts == ["along e0", "along e1"]
    assert span.explained == pytest.approx([0.8, 0.2], abs=1e-6)
    assert torch.allclose(span.reconstruct(contributions), contributions, atol=1e-5)
    assert torch.allclose(span.mean, 3 * e[3], atol=1e-5)
    # one text: the reconstruction keeps the e0 part and loses the e1 part
    forced = text_span(
        contributions, emb, texts, m=1, order=[0]
    )  # the random-texts control takes what it is given
    assert forced.texts == ["along e1"] and forced.explained == pytest.approx([0.2], abs=1e-6)
    one = text_span(contributions, emb, texts, m=1).reconstruct(contributions)
    assert torch.allclose(one, (2 * a[:, None] * e[0] + 3 * e[3]).float(), atol=1e-5)


def test_an_attention_pooled_tower_is_refused_in_one_line():
    torch.manual_seed(0)
    siglip = create_model("siglip-tiny", **{"vision.image_size": 32, "vision.layers": 1})
    with pytest.raises(ConfigError, match="pools by 'attn'"):
        decompose_image_embedding(siglip.visual, torch.randn(1, 3, 32, 32))


def test_vlmkit_decompose_end_to_end(tmp_path):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    rng = np.random.default_rng(0)
    for name, colour in (("red_circle", (220, 30, 30)), ("blue_square", (30, 30, 220))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            arr = np.full((32, 32, 3), 200, np.uint8)
            arr[8:24, 8:24] = colour
            arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "texts.txt").write_text("red\nblue\ncircle\nsquare\na shape\n")
    tok = Tokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, context_length=16)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 2, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 16,
                                        "text.eot_token_id": tok.eot_token_id})  # fmt: skip
    folder = save_pretrained(clip, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    main(["decompose", "--model", str(folder), "--data", str(tmp_path / "data"), "--texts",
          str(tmp_path / "texts.txt"), "--texts-per-head", "2", "--out", str(tmp_path / "o")])  # fmt: skip
    m = json.loads((tmp_path / "o" / "decomposition.json").read_text())["metrics"]
    assert m["sum_max_abs_error"] < 1e-5 and m["num_images"] == 6
    assert len(m["ablation"]) == 2 * 2 + 2 * 2  # attn and MLP of 2 layers, 2 heads each
    assert all(len(h["texts"]) == 2 for h in m["text_span"]["heads"])
    assert 0 <= m["text_span"]["accuracy_heads_random_texts"] <= 1
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "ablation.png").is_file()
