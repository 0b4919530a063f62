"""Prompt templates for zero-shot classification: the ensemble against an independent recomputation, forward
selection on a hand-made case, the built-in sets, class descriptions, and `vlmkit eval templates`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.prompts import class_embeddings, ensemble, forward_selection, read_descriptions
from vlmkit.eval.templates import CLIP_SELECTED_TEMPLATES, IMAGENET_TEMPLATES, load_templates
from vlmkit.models.registry import create_model


@pytest.fixture(scope="module")
def clip_and_tok():
    from vlmkit.data.tokenizer import Tokenizer

    tok = Tokenizer.train(
        ["a photo of a red circle", "art of the blue square"] * 10, vocab_size=300, context_length=16
    )
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 16,
                                        "text.eot_token_id": tok.eot_token_id}).eval()  # fmt: skip
    return clip, tok


def test_the_ensemble_is_the_mean_of_normalised_embeddings(clip_and_tok):
    clip, tok = clip_and_tok
    classes, templates = ["red circle", "blue square"], ["a photo of a {}.", "art of the {}.", "{}"]
    emb = class_embeddings(clip, tok, classes, templates)
    assert emb.shape == (3, 2, clip.cfg.embed_dim)
    with torch.no_grad():  # one text at a time, in float64
        for c, name in enumerate(classes):
            each = [
                F.normalize(clip.encode_text(tok([t.replace("{}", name)])).double(), dim=-1)[0]
                for t in templates
            ]
            expected = F.normalize(torch.stack(each).mean(0), dim=0)
            torch.testing.assert_close(ensemble(emb)[c].double(), expected, atol=1e-5, rtol=0)


def test_forward_selection_by_hand():
    # two classes on the unit circle; images of class 0 at angle 0, of class 1 at 90 degrees, plus a hard one
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 1])

    def cls(a0, a1):  # class embeddings at angles a0, a1 (degrees)
        r0, r1 = np.radians(a0), np.radians(a1)
        return torch.tensor([[np.cos(r0), np.sin(r0)], [np.cos(r1), np.sin(r1)]], dtype=torch.float32)

    # an ensemble's class angle is the mean of its templates' (equal unit weights), so its boundary is the mean of
    # theirs: image H (53 degrees) needs a boundary below 53, the class-0 images one above 0
    emb = torch.stack([
        cls(55, 145),  # template 0: boundary at 100: B and H wrong, alone 0.5
        cls(25, 115),  # template 1: boundary at 70: H wrong, alone 0.75
        cls(-65, 25),  # template 2: boundary at -20: both class-0 images wrong, alone 0.5
    ])  # fmt: skip
    path = forward_selection(feats, labels, emb)
    assert path["order"] == [1, 2, 0]  # 1 alone is best; with 2 the boundary is at 25: all right
    assert path["curve"] == [
        0.75,
        1.0,
        0.75,
    ]  # adding 0 moves the three-template boundary to 55: H wrong again
    assert path["chosen"] == [1, 2]  # the best prefix, shortest on ties


def test_built_in_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert set(CLIP_SELECTED_TEMPLATES) <= set(IMAGENET_TEMPLATES) and len(CLIP_SELECTED_TEMPLATES) == 7
    assert load_templates(["clip7", "a {}."]) == [*CLIP_SELECTED_TEMPLATES, "a {}."]
    with pytest.raises(ConfigError, match="built-in set"):
        load_templates(["imagenet81"])


def test_descriptions_must_cover_exactly_the_classes(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        json.dumps({"red circle": ["a round red shape"], "blue square": "a blue shape with four corners"})
    )
    assert read_descriptions(p, ["red circle", "blue square"])["blue square"] == [
        "a blue shape with four corners"
    ]
    with pytest.raises(DataError, match=r"no sentences for \['green star'\]"):
        read_descriptions(p, ["red circle", "blue square", "green star"])
    with pytest.raises(DataError, match=r"keys that are not classes: \['blue square'\]"):
        read_descriptions(p, ["red circle"])


def test_vlmkit_eval_templates_end_to_end(clip_and_tok, tmp_path):
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    clip, tok = clip_and_tok
    folder = save_pretrained(clip, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    rng = np.random.default_rng(0)
    for split in ("sel", "test"):
        for name, colour in (("red_circle", (220, 30, 30)), ("blue_square", (30, 30, 220))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                arr = np.clip(np.full((32, 32, 3), colour) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "d.json").write_text(json.dumps({"red circle": ["a red circle", "a round red shape"],
                                                 "blue square": ["a blue square"]}))  # fmt: skip
    main(["eval", "templates", "--model", str(folder), "--data", str(tmp_path / "test"), "--select-data",
          str(tmp_path / "sel"), "--templates", "clip7", "--descriptions", str(tmp_path / "d.json"),
          "--out", str(tmp_path / "o")])  # fmt: skip
    m = json.loads((tmp_path / "o" / "templates.json").read_text())["metrics"]
    assert m["num_templates"] == 7 and len(m["per_template"]) == 7
    assert [p["accuracy"] for p in m["per_template"]] == sorted(
        (p["accuracy"] for p in m["per_template"]), reverse=True
    )
    kinds = [r["prompts"] for r in m["rows"]]
    assert (
        kinds[0] == "all 7 templates (ensemble)"
        and "class descriptions" in kinds
        and "templates + descriptions" in kinds
    )
    assert set(m["selection"]["chosen"]) <= set(CLIP_SELECTED_TEMPLATES) and len(m["selection"]["order"]) == 7
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "templates.png").is_file()
