"""Prompt variants for generative models: reading the prompts file, the conversation each variant builds, and
`vlmkit eval prompts` end to end on a tiny LLaVA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.data.interleaved import CHUNK_TOKEN, IMAGE_TOKEN
from vlmkit.errors import DataError
from vlmkit.inference.prompting import conversation, read_prompt_variants


def test_variants_are_read_and_checked(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        '{"name": "plain"}\n{"name": "sys", "system": "Be brief.", "template": "Q: {question} A:"}\n'
    )
    assert read_prompt_variants(p) == [
        {"name": "plain", "template": "{question}", "system": None},
        {"name": "sys", "template": "Q: {question} A:", "system": "Be brief."},
    ]
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(DataError, match="item 1: the name 'a' is used twice"):
        read_prompt_variants(j)
    p.write_text('{"name": "x", "template": "no placeholder"}\n')
    with pytest.raises(DataError, match=r"line 1: 'template' must contain \{question\}"):
        read_prompt_variants(p)


def test_a_variant_puts_the_system_turn_first_and_the_image_before_the_question():
    v = {"name": "s", "system": "Be brief.", "template": "{question} One word."}
    turns = conversation(v, "what is in {braces}?")
    assert turns[0] == {"from": "system", "value": "Be brief."}
    assert turns[1] == {"from": "human", "value": f"{IMAGE_TOKEN}\nwhat is in {{braces}}? One word."}
    assert conversation({"name": "p", "template": "{question}", "system": None}, "q") == [
        {"from": "human", "value": f"{IMAGE_TOKEN}\nq"}
    ]


def test_vlmkit_eval_prompts_end_to_end(tmp_path):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    texts = [
        "USER: what colour is the circle? ASSISTANT: red",
        "Be brief. USER: one word ASSISTANT: blue",
    ] * 20
    tok = Tokenizer.train(
        texts, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN]
    )
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 1, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant"}  # fmt: skip
    folder = save_pretrained(
        create_model("llava-tiny", **small), tmp_path / "m", tok, PreprocessConfig(image_size=32)
    )
    rows = []
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        rows.append({"image": f"{i}.png", "type": "colour", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]})  # fmt: skip
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["red", "green", "blue"]}},
        "required": ["answer"],
    }
    (tmp_path / "colour.json").write_text(json.dumps(schema))
    (tmp_path / "p.jsonl").write_text('{"name": "plain"}\n{"name": "brief", "system": "Be brief."}\n'
                                      '{"name": "json", "json_schema": "colour.json"}\n')  # fmt: skip
    main(["eval", "prompts", "--model", str(folder), "--prompts", str(tmp_path / "p.jsonl"), "--data",
          str(tmp_path / "v.jsonl"), "--max-new-tokens", "3", "--out", str(tmp_path / "o")])  # fmt: skip
    res = json.loads((tmp_path / "o" / "prompts.json").read_text())["metrics"]["variants"]
    assert [r["name"] for r in res] == ["plain", "brief", "json"] and all(
        0 <= r["accuracy"] <= 1 for r in res
    )
    assert res[2]["json_answers"] == {"constrained": 3} and "json_answers" not in res[0]
    json_preds = [
        json.loads(line)["prediction"]
        for line in (tmp_path / "o" / "json" / "vqa_predictions.jsonl").read_text().splitlines()
    ]
    assert all(p in ("red", "green", "blue") for p in json_preds)
    assert res[2]["accuracy"] == pytest.approx(np.mean([p == "red" for p in json_preds]))
    assert all(set(r["by_type"]) == {"colour"} for r in res)
    for name in ("plain", "brief"):
        preds = (tmp_path / "o" / name / "vqa_predictions.jsonl").read_text().splitlines()
        assert len(preds) == 3
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "prompts.png").is_file()
