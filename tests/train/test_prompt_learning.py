"""Learned prompts (CoOp, CoCoOp): gradients reach only the context (and the meta-network), a context initialised
from words reproduces the CLIP's own embedding of the sentence, the class name's position, base-to-new."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.prompt_learner import PromptConfig, PromptLearner
from vlmkit.models.registry import create_model
from vlmkit.train.prompts import base_to_new, few_shot_indices, fit_prompts

NAMES = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def clip_and_tok():
    from vlmkit.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["a photo of a red circle.", "a blue square.", "a green star."] * 10, vocab_size=300,
                          context_length=24)  # fmt: skip
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "text.layers": 2,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 24,
                                        "text.eot_token_id": tok.eot_token_id}).eval()  # fmt: skip
    return clip, tok


@pytest.mark.parametrize("meta_net", [False, True])
def test_gradients_reach_only_the_context(clip_and_tok, meta_net):
    clip, tok = clip_and_tok
    learner = PromptLearner(clip, tok, NAMES, PromptConfig(n_ctx=4, meta_net=meta_net))
    feats = F.normalize(torch.randn(5, clip.cfg.embed_dim), dim=-1)
    F.cross_entropy(learner(feats), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    trainable = {id(p) for p in learner.trainable_parameters()}
    assert trainable == {id(p) for p in learner.parameters() if p.requires_grad}
    if meta_net:
        assert all(p.grad is not None for p in learner.meta_net.parameters())
        t = learner.text_features(feats)
        assert t.shape == (5, 3, clip.cfg.embed_dim) and not torch.allclose(t[0], t[1])  # prompts per image


def test_a_context_from_words_is_the_clips_own_sentence(clip_and_tok):
    clip, tok = clip_and_tok
    learner = PromptLearner(clip, tok, NAMES, PromptConfig(init="a photo of a"))
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tok([f"a photo of a {n}." for n in NAMES])).double(), dim=-1)
        got = learner.text_features().double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_the_class_name_goes_where_asked(clip_and_tok, position):
    clip, tok = clip_and_tok
    learner = PromptLearner(clip, tok, ["red circle"], PromptConfig(n_ctx=4, position=position))
    ids, ctx_at = learner.ids[0].tolist(), learner.positions[0].tolist()
    name = tok.encode("red circle")
    start = ids.index(name[0])
    assert ids[start : start + len(name)] == name
    first = 1 if tok.sot_token_id is not None else 0
    expected = {"end": list(range(first, first + 4)),
                "front": list(range(first + len(name), first + len(name) + 4)),
                "middle": [first, first + 1, first + 2 + len(name), first + 3 + len(name)]}[position]  # fmt: skip
    assert ctx_at == expected
    assert ids[ids.index(tok.eot_token_id) - 1] != tok.pad_token_id  # the full stop before the end token


def test_new_classes_share_the_context_and_per_class_does_not_transfer(clip_and_tok):
    clip, tok = clip_and_tok
    shared = PromptLearner(clip, tok, NAMES, PromptConfig(n_ctx=4))
    other = shared.with_classes(["purple diamond"])
    assert other.ctx is shared.ctx and other.text_features().shape == (1, clip.cfg.embed_dim)
    per_class = PromptLearner(clip, tok, NAMES, PromptConfig(n_ctx=4, per_class=True))
    assert per_class.ctx.shape == (3, 4, clip.cfg.text.width)
    with pytest.raises(ConfigError, match="does not transfer"):
        per_class.with_classes(["purple diamond"])
    with pytest.raises(ConfigError, match="per_class=true is CoOp only"):
        PromptConfig(per_class=True, meta_net=True)


def test_fitting_learns_a_task_the_start_cannot_do(clip_and_tok):
    clip, tok = clip_and_tok
    torch.manual_seed(0)
    learner = PromptLearner(clip, tok, NAMES, PromptConfig(n_ctx=4, per_class=True))
    # images placed at rotated copies of the class embeddings: the starting prompts get every one wrong
    with torch.no_grad():
        t = learner.text_features()
        feats = F.normalize(t[[1, 2, 0]].repeat(4, 1) + 0.05 * torch.randn(12, t.shape[1]), dim=-1)
        labels = torch.arange(3).repeat(4)
        before = float(F.cross_entropy(learner(feats), labels))
        assert (learner(feats).argmax(1) != labels).all()
    history = fit_prompts(learner, feats, labels, epochs=60, lr=0.5, batch_size=12)
    with torch.no_grad():
        assert history[-1] < 0.3 * before and (learner(feats).argmax(1) == labels).all()


def test_few_shot_indices():
    labels = [0] * 5 + [1] * 3 + [2] * 4
    idx = few_shot_indices(labels, 3, seed=1)
    assert sorted(labels[i] for i in idx) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(idx)) == 9
    assert idx == few_shot_indices(labels, 3, seed=1)
    with pytest.raises(DataError, match="class 1 has 3 training images, fewer than 4 shots"):
        few_shot_indices(labels, 4)


def test_base_to_new_end_to_end(clip_and_tok, tmp_path):
    from vlmkit.data.transforms import PreprocessConfig

    clip, tok = clip_and_tok
    rng = np.random.default_rng(0)
    colours = {"red_circle": (220, 30, 30), "blue_square": (30, 30, 220), "green_star": (30, 200, 30),
               "purple_diamond": (150, 40, 200)}  # fmt: skip
    for split in ("train", "test"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                arr = np.clip(np.full((32, 32, 3), colour) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / split / name / f"{i}.png")
    res = base_to_new(clip, tok, PreprocessConfig(image_size=32), tmp_path / "train", tmp_path / "test",
                      PromptConfig(n_ctx=2), shots=2, epochs=2, templates=["a {}."])  # fmt: skip
    m = res["metrics"]
    assert m["base_classes"] == ["blue square", "green star"] and m["new_classes"] == [
        "purple diamond",
        "red circle",
    ]
    for r in (m["hand"], m["learned"]):
        assert 0 <= r["base"] <= 1 and 0 <= r["new"] <= 1
    with pytest.raises(ConfigError, match="are not classes"):
        base_to_new(clip, tok, PreprocessConfig(image_size=32), tmp_path / "train", tmp_path / "test",
                    PromptConfig(n_ctx=2), base_classes=["orange star"], shots=2, epochs=1)  # fmt: skip


@pytest.mark.parametrize("meta_net", [False, True])
def test_vlmkit_train_task_prompt_learning_saves_prompts_that_load_the_same(clip_and_tok, tmp_path, meta_net):
    from vlmkit.cli.main import main
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.train.prompts import load_prompts

    clip, tok = clip_and_tok
    folder = save_pretrained(clip, tmp_path / "clip", tok, PreprocessConfig(image_size=32))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, colour in (
            ("red_circle", (220, 30, 30)),
            ("blue_square", (30, 30, 220)),
            ("green_star", (30, 200, 30)),
        ):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                arr = np.clip(np.full((32, 32, 3), colour) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / split / name / f"{i}.png")
    main(["train", "--task", "prompt-learning", "--init-from", str(folder), "--train-data", str(tmp_path / "train"),
          "--zeroshot-data", str(tmp_path / "test"), "--epochs", "3", "--templates", "a {}.", "--set", "shots=2",
          "--set", "n_ctx=3", "--set", f"meta_net={str(meta_net).lower()}", "--set", "base_classes=red circle,green star",
          "--out", str(tmp_path / "p")])  # fmt: skip
    learner, _ = load_prompts(tmp_path / "p")
    assert learner.classnames == ["red circle", "green star"] and learner.n_ctx == 3
    assert (learner.meta_net is not None) == meta_net
    feats = F.normalize(torch.randn(4, clip.cfg.embed_dim), dim=-1)
    # the loaded context differs from a fresh one (it was trained) and gives the saved run's logits
    import json

    m = json.loads((tmp_path / "p" / "base_to_new.json").read_text())
    assert m["new_classes"] == ["blue square"] and len(m["loss"]) == 3
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "p" / "prompts.safetensors")["ctx"]
    torch.testing.assert_close(learner.ctx.detach(), saved)
    # the API round trip: a trained learner, saved and loaded, gives the same logits
    from vlmkit.train.prompts import base_to_new, save_prompts

    res = base_to_new(clip, tok, PreprocessConfig(image_size=32), tmp_path / "train", tmp_path / "test",
                      PromptConfig(n_ctx=3, meta_net=meta_net), shots=2, epochs=3, templates=["a {}."])  # fmt: skip
    save_prompts(res["learner"], tmp_path / "q", folder, res["metrics"])
    loaded, _ = load_prompts(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats), res["learner"](feats))
        assert not torch.allclose(
            loaded(feats), PromptLearner(clip, tok, loaded.classnames, loaded.cfg)(feats)
        )
    with pytest.raises(SystemExit):
        main(["train", "--task", "prompt-learning", "--init-from", str(folder), "--set", "nctx=3"])
