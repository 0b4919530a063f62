"""Attributing a generative model's answer to image regions: the per-layer answer-to-image attention against
Hugging Face's own attentions on the same weights, occlusion against the log-likelihood of a hand-occluded image,
CoCa with and without a pooled memory, and `vlmkit explain` on a LLaVA folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.data.interleaved import CHUNK_TOKEN, IMAGE_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.inference import VLMPipeline
from vlmkit.inference.explain import explain_answer
from vlmkit.losses.captioning import IGNORE_INDEX
from vlmkit.models.registry import create_model

TEXTS = [
    "USER: what colour is the circle? ASSISTANT: red",
    "a blue square on the left",
    "Describe the image.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(
        TEXTS, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN]
    )


def _llava(tok):
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 2, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant"}  # fmt: skip
    model = create_model("llava-tiny", **small).eval()
    with torch.no_grad():  # a larger spread than the init, so attention is far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)
    return VLMPipeline(model, tok, PreprocessConfig(image_size=32), precision="fp32")


def _image(seed=0):
    """Every channel's pixels half 100 and half 200: the mean colour (150) is exact in uint8."""
    rng = np.random.default_rng(seed)
    values = np.array([100, 200] * (32 * 32 // 2), dtype=np.uint8)
    return Image.fromarray(np.stack([rng.permutation(values).reshape(32, 32) for _ in range(3)], -1))


def test_answer_to_image_attention_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from vlmkit.convert.llava import save_hf_llava

    pipe = _llava(tok)
    save_hf_llava(pipe.model, tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    )
    image = _image()
    res = explain_answer(pipe, image, "what colour is the circle?", "red", "attention")
    ids, labels, mask = pipe.scoring_batch(["red"], prompt="what colour is the circle?")
    with torch.no_grad():
        out = hf(
            input_ids=ids,
            pixel_values=pipe.pixel_values([image]),
            attention_mask=mask,
            output_attentions=True,
        )
    queries = (labels[0, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    columns = (ids[0] == pipe.image_token_id).nonzero()[:, 0]
    expected = torch.stack([a[0].mean(0)[queries][:, columns].mean(0) for a in out.attentions]).view(-1, 4, 4)
    assert res.per_layer.shape == (2, 4, 4) and expected.std() > 1e-3  # a map that is not flat
    torch.testing.assert_close(res.per_layer, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.grid, expected.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "coca"])
def test_occlusion_is_the_drop_in_the_answers_log_likelihood(tok, family):
    if family == "llava":
        pipe, question = _llava(tok), "what colour is the circle?"
    else:
        torch.manual_seed(0)
        coca = create_model(
            "coca-tiny", **{"decoder.vocab_size": tok.vocab_size, "vision.image_size": 32}
        ).eval()
        pipe, question = (
            VLMPipeline(coca, tok, PreprocessConfig(image_size=32), precision="fp32"),
            "Describe the image.",
        )
    image = _image(1)
    res = explain_answer(pipe, image, question, "red", "occlusion", boxes=[[8, 16, 24, 32]])
    base = float(pipe.log_likelihood([image], ["red"], prompt=question)[0])
    assert res.log_prob == pytest.approx(base, abs=1e-4)
    for (r, c), box in (((1, 2), (16, 8, 24, 16)), ((3, 0), (0, 24, 8, 32))):
        arr = np.asarray(image).copy()
        arr[box[1] : box[3], box[0] : box[2]] = 150  # the mean colour, by hand
        occluded = float(pipe.log_likelihood([Image.fromarray(arr)], ["red"], prompt=question)[0])
        assert float(res.grid[r, c]) == pytest.approx(base - occluded, abs=1e-4)
    arr = np.asarray(image).copy()
    arr[16:32, 8:24] = 150
    occluded = float(pipe.log_likelihood([Image.fromarray(arr)], ["red"], prompt=question)[0])
    assert res.objects == pytest.approx([base - occluded], abs=1e-4)
    assert res.grid.abs().max() > 1e-4  # occluding changes something


@pytest.mark.parametrize("queries", [0, 4])
def test_coca_maps_reach_the_patch_grid_through_a_pooled_memory(tok, queries):
    torch.manual_seed(0)
    coca = create_model("coca-tiny", **{"decoder.vocab_size": tok.vocab_size, "vision.image_size": 32,
                                        "image_queries": queries}).eval()  # fmt: skip
    pipe = VLMPipeline(coca, tok, PreprocessConfig(image_size=32), precision="fp32")
    for method in ("attention", "grad-attention"):
        res = explain_answer(pipe, _image(), "Describe the image.", "a blue square", method)
        assert res.grid.shape == (4, 4) and res.per_layer.shape[1:] == (4, 4)
        assert (res.per_layer >= 0).all() and res.grid.sum() > 0
    # plain attention is a distribution over the memory; through the pooler it stays one over the ViT's tokens,
    # so the patches hold at most all of it
    att = explain_answer(pipe, _image(), "Describe the image.", "a blue square", "attention")
    assert (att.per_layer.flatten(1).sum(1) <= 1 + 1e-5).all()
    assert all(p.grad is None for p in coca.parameters())  # gradients cleared


def test_bad_requests_are_one_line(tok):
    pipe = _llava(tok)
    with pytest.raises(ConfigError, match="unknown method 'rollout'"):
        explain_answer(pipe, _image(), "q", "red", "rollout")
    with pytest.raises(ConfigError, match="the answer to explain is empty"):
        explain_answer(pipe, _image(), "q", " ", "attention")


def test_vlmkit_explain_on_a_llava_folder(tok, tmp_path, capsys):
    from vlmkit.models.pretrained import save_pretrained

    pipe = _llava(tok)
    folder = save_pretrained(pipe.model, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    image = tmp_path / "x.png"
    _image().resize((48, 40)).save(image)
    main(["explain", "--model", str(folder), "--image", str(image), "--question", "what colour is the circle?",
          "--method", "occlusion", "--box", "0,0,24,20", "--out", str(tmp_path / "o")])  # fmt: skip
    sal = np.load(tmp_path / "o" / "saliency.npy")
    assert sal.shape == (40, 48) and np.isfinite(sal).all()
    meta = json.loads((tmp_path / "o" / "explain.json").read_text())
    assert meta["method"] == "occlusion" and isinstance(meta["answer"], str) and len(meta["box_drops"]) == 1
    main(
        [
            "explain",
            "--model",
            str(folder),
            "--image",
            str(image),
            "--answer",
            "red",
            "--out",
            str(tmp_path / "g"),
        ]
    )
    assert (tmp_path / "g" / "per_layer.png").is_file()
    assert json.loads((tmp_path / "g" / "explain.json").read_text())["method"] == "grad-attention"
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(folder), "--image", str(image), "--method", "rollout",
              "--out", str(tmp_path)])  # fmt: skip
    assert "--method rollout is for dual encoders" in capsys.readouterr().err


def test_vlmkit_eval_saliency_on_a_llava_folder(tok, tmp_path):
    from vlmkit.data.synthetic import render_scene
    from vlmkit.models.pretrained import save_pretrained

    rng = np.random.default_rng(3)
    lines = []
    for i in range(6):
        image, meta = render_scene(rng, image_size=32, num_objects=2 + i % 2)
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "x", "objects": meta["objects"]}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    folder = save_pretrained(_llava(tok).model, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    main(["eval", "saliency", "--model", str(folder), "--data", str(tmp_path / "s.jsonl"), "--limit", "3",
          "--deletion-limit", "1", "--out", str(tmp_path / "o")])  # fmt: skip
    m = json.loads((tmp_path / "o" / "saliency.json").read_text())["metrics"]
    pairs = {(r["method"], r["model"]) for r in m["rows"]}
    for method in ("attention", "grad-attention", "occlusion"):
        assert (method, "trained") in pairs and (method, "random init") in pairs
    assert 0 < m["num_queries"]["2"] <= 3
    trained = [r for r in m["rows"] if r["model"] == "trained"]
    assert all(r["deletion_auc"] is not None and 0 <= r["pointing"] <= 1 for r in trained)
