"""The compositional benchmark: scoring rule, scorers of every family against direct computations, the files."""

import json

import pytest
import torch
import torch.nn.functional as F

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, PreprocessConfig, load_image
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.compositional import compositional_accuracy, evaluate_compositional, read_rows
from vlmkit.inference.score import pair_scorer
from vlmkit.models.registry import create_model

TEXTS = [
    "a red circle and a blue star",
    "a blue circle and a red star",
    "two red circles",
    "three red circles",
]


def test_a_row_is_right_only_when_the_caption_beats_every_foil():
    rows = [
        {
            "image": "a",
            "caption": "good",
            "foils": [{"text": "bad", "type": "x"}, {"text": "worse", "type": "x"}],
        },
        {"image": "b", "caption": "good", "foils": [{"text": "better", "type": "y"}]},
        {"image": "c", "caption": "good", "foils": [{"text": "same", "type": "y"}]},  # a tie is wrong
    ]
    value = {"good": 1.0, "bad": 0.5, "worse": 0.0, "better": 2.0, "same": 1.0}
    metrics, preds = compositional_accuracy(
        rows, lambda paths, texts: [value[t] for t in texts], batch_size=2
    )
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["accuracy_by_type"] == {"x": 1.0, "y": 0.0} and metrics["num_by_type"] == {"x": 1, "y": 2}
    assert [p["correct"] for p in preds] == [True, False, False] and preds[1]["foils"][0]["score"] == 2.0


@pytest.fixture(scope="module")
def rows_file(shapes_dir, tmp_path_factory):
    images = sorted((shapes_dir / "images" / "val").glob("*.png"))[:3]
    path = tmp_path_factory.mktemp("comp") / "rows.jsonl"
    rows = [
        {
            "image": str(images[0]),
            "caption": TEXTS[0],
            "foils": [{"text": TEXTS[1], "type": "attribute_swap"}],
        },
        {"image": str(images[1]), "caption": TEXTS[2], "foils": [{"text": TEXTS[3], "type": "wrong_count"}]},
        {
            "image": str(images[2]),
            "caption": TEXTS[1],
            "foils": [{"text": TEXTS[0], "type": "attribute_swap"}],
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS * 4, vocab_size=300, context_length=16, extra_special_tokens=["<|mask|>"])


def pixels(paths, size):
    tf = ImageTransform(PreprocessConfig(image_size=size), train=False)
    return torch.stack([tf(load_image(p)) for p in paths])


def test_dual_encoder_and_fusion_scores_are_the_models_own(rows_file, tokenizer):
    rows = read_rows(rows_file)
    paths, texts = [r["image"] for r in rows], [r["caption"] for r in rows]
    clip = create_model(
        "clip-tiny", **{"text.vocab_size": 300, "text.context_length": 16, "vision.image_size": 32}
    ).eval()
    name, score = pair_scorer(clip, tokenizer, PreprocessConfig(image_size=32))
    with torch.no_grad():
        want = (
            F.normalize(clip.encode_image(pixels(paths, 32)), dim=-1)
            * F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
        ).sum(-1)
    assert name == "cosine" and score(paths, texts) == pytest.approx(want.tolist(), abs=1e-5)
    fusion = create_model("fusion-tiny", **{"text.vocab_size": 300, "vision.image_size": 32}).eval()
    name, score = pair_scorer(fusion, tokenizer, PreprocessConfig(image_size=32))
    with torch.no_grad():
        logits = fusion.itm_logits(tokenizer(texts), fusion.encode_image_tokens(pixels(paths, 32)))
    assert name == "itm" and score(paths, texts) == pytest.approx(
        (logits[:, 1] - logits[:, 0]).tolist(), abs=1e-5
    )
    assert pair_scorer(fusion, tokenizer, PreprocessConfig(image_size=32), scorer="itc")[0] == "itc"
    with pytest.raises(ConfigError, match="scores pairs by cosine"):
        pair_scorer(clip, tokenizer, PreprocessConfig(image_size=32), scorer="itm")


def test_generative_score_is_the_caption_log_likelihood(rows_file, tokenizer):
    from vlmkit.data.chat import coca_turns, render

    coca = create_model("coca-tiny", **{"decoder.vocab_size": 300, "vision.image_size": 32}).eval()
    rows = read_rows(rows_file)
    paths, texts = [r["image"] for r in rows], [r["caption"] for r in rows]
    name, score = pair_scorer(coca, tokenizer, PreprocessConfig(image_size=32))
    got = score(paths, texts)
    # directly: the decoder's log-probabilities of each caption token after [bos], summed
    for i, text in enumerate(texts):
        turns = coca_turns(
            [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": text}], True
        )
        ids, labels = render(turns, tokenizer, "plain", num_image_tokens=0, image_token_id=None)
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            out = coca(pixels([paths[i]], 32), ids_t)
            logp = torch.log_softmax(coca.decoder.lm_head(out.hidden[0]).double(), dim=-1)
        want = sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
        assert got[i] == pytest.approx(want, abs=1e-3)
    assert name == "likelihood"


def test_evaluate_writes_results_predictions_and_a_report(rows_file, tokenizer, tmp_path):
    fusion = create_model("fusion-tiny", **{"text.vocab_size": 300, "vision.image_size": 32}).eval()
    name, score = pair_scorer(fusion, tokenizer, PreprocessConfig(image_size=32))
    r = evaluate_compositional(score, rows_file, out_dir=tmp_path, scorer=name, model_name="m")
    assert r["task"] == "compositional" and r["metrics"]["num_rows"] == 3 and r["metrics"]["scorer"] == "itm"
    assert set(r["metrics"]["accuracy_by_type"]) == {"attribute_swap", "wrong_count"}
    assert len((tmp_path / "compositional_predictions.jsonl").read_text().splitlines()) == 3
    assert "attribute_swap" in (tmp_path / "report.html").read_text()


def test_bad_rows_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"image": "a.png", "caption": "x", "foils": []}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: a row needs"):
        read_rows(f)
    f.write_text("{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:1: invalid JSON"):
        read_rows(f)
