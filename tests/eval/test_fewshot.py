"""Few-shot evaluation: RICES picks the nearest support images (most similar last); scoring is the model's own
log-likelihood of each candidate; prompts put each demonstration's image before its text; a support set
smaller than the shots asked is one line."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.data.fewshot import write_fewshot
from vlmkit.data.interleaved import CHUNK_TOKEN, IMAGE_TOKEN
from vlmkit.data.synthetic import generate
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import DataError
from vlmkit.eval.fewshot import Example, FewShot, evaluate_fewshot, rices
from vlmkit.models.registry import create_model


def test_rices_orders_the_nearest_last():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    assert rices(torch.tensor([1.0, 0.1]), support, 2) == [2, 0]  # the most similar next to the query
    assert rices(torch.tensor([0.0, 1.0]), support, 3) == [0, 2, 1]
    assert rices(torch.tensor([0.0, 1.0]), support, 0) == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    generate(root, num_train=300, num_val=40, image_size=32, progress=False, num_workers=0)
    paths = write_fewshot(root, documents=50, episodes=6)
    texts = [s["text"] for line in paths["train_interleaved"].read_text().splitlines()
             for s in json.loads(line)["segments"] if "text" in s]  # fmt: skip
    tok = Tokenizer.train(texts + ["Output:"], vocab_size=300, context_length=64,
                          extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN])  # fmt: skip
    torch.manual_seed(0)
    model = create_model(
        "flamingo-tiny", **{"vision.image_size": 32, "decoder.vocab_size": tok.vocab_size, "perceiver.latents": 4,
                            "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chunk_token_id": tok.token_to_id(CHUNK_TOKEN),
                            "decoder.eos_token_id": tok.eot_token_id, "decoder.bos_token_id": tok.sot_token_id,
                            "gate_init": 0.5},
    ).eval()  # fmt: skip
    return root, paths, FewShot(model, tok, PreprocessConfig(image_size=32), batch_size=4)


def test_scores_are_the_models_log_likelihoods(setup):
    root, paths, fs = setup
    query = Example(root / "images/val/000000.png", "", "Output:", "dax")
    demo = Example(root / "images/train/000000.png", "Output: wug", "Output:", "wug")
    scores = fs.score([demo], query, ["dax", "wug"])
    # by hand: the full sequence with each answer, the log-probabilities of the tokens after the shared prompt
    for answer, score in zip(["dax", "wug"], scores, strict=True):
        ids, images = fs.encode([demo], query, answer)
        prompt, _ = fs.encode([demo], query, None)
        with torch.no_grad():
            logp = fs.model(torch.tensor([ids]), fs.pixels(images)[None]).logits[0].log_softmax(-1)
        # the prompt ends in "Output:"; the answer's tokens and the chunk end follow
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)
    assert ids[-1] == fs.cfg.chunk_token_id and images == [demo.image, query.image]


def test_classify_caption_and_vqa_run_and_too_few_support_examples_is_one_line(setup):
    root, paths, fs = setup
    r = evaluate_fewshot(fs, "classify", [0, 2], "random", support=paths["train_classify"],
                         queries=paths["val_episodes"])  # fmt: skip
    assert set(r["results"]) == {0, 2} and r["results"][2]["num_queries"] == 6
    acc = r["results"][0]["accuracy"]
    assert 0 <= acc["low"] <= acc["value"] <= acc["high"] <= 1
    s = evaluate_fewshot(
        fs, "classify", [2], "similar", support=paths["train_classify"], queries=paths["val_episodes"]
    )
    assert s["demos"] == "similar"
    # captions: a caption file made from the scenes (image, caption)
    rows = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()]
    (root / "caps.jsonl").write_text(
        "".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in rows)
    )
    c = evaluate_fewshot(
        fs, "caption", [0, 1], "random", support=root / "caps.jsonl", queries=root / "caps.jsonl", limit=4
    )
    assert c["results"][1]["num_queries"] == 4 and "cider" in c["results"][1]
    with pytest.raises(DataError, match="100 shots asked but the support set has"):
        evaluate_fewshot(
            fs, "caption", [100], "random", support=root / "caps.jsonl", queries=root / "caps.jsonl", limit=1
        )
