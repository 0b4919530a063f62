"""JSON answers: validation against a schema, retries, and constrained decoding that is valid by construction and
picks what the model's own likelihoods pick."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.interleaved import CHUNK_TOKEN, IMAGE_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.inference import VLMPipeline
from vlmkit.inference.structured import load_schema, parse_and_validate, structured_answers
from vlmkit.models.registry import create_model

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 4}},
          "required": ["colour", "count"]}  # fmt: skip


def test_replies_are_parsed_and_validated_with_the_reason_on_one_line():
    assert parse_and_validate('{"colour": "red", "count": 2}', SCHEMA) == ({"colour": "red", "count": 2}, "")
    assert (
        parse_and_validate('Sure! {"colour": "blue", "count": 0} hope that helps', SCHEMA)[0]["colour"]
        == "blue"
    )
    assert parse_and_validate("red, two", SCHEMA) == (None, "no JSON object in the reply")
    assert parse_and_validate('{"colour": "red", "count": }', SCHEMA)[1].startswith("invalid JSON")
    value, error = parse_and_validate('{"colour": "pink", "count": 2}', SCHEMA)
    assert value is None and error.startswith("colour: 'pink' is not one of")
    assert (
        parse_and_validate('{"colour": "red", "count": 7}', SCHEMA)[1]
        == "count: 7 is greater than the maximum of 4"
    )
    assert "'count' is a required property" in parse_and_validate('{"colour": "red"}', SCHEMA)[1]


def test_a_schema_that_is_not_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        load_schema({"type": "nothing"})
    (tmp_path / "s.json").write_text("{nope")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_schema(tmp_path / "s.json")


@pytest.fixture(scope="module")
def vlm():
    texts = [
        "USER: what colour is the circle? ASSISTANT: red",
        "USER: how many? ASSISTANT: 3 12 40 yes no",
    ] * 20
    tok = Tokenizer.train(
        texts, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN]
    )
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant"}  # fmt: skip
    return VLMPipeline(
        create_model("llava-tiny", **small).eval(), tok, PreprocessConfig(image_size=32), precision="fp32"
    )


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_constrained_answers_are_valid_and_pick_the_models_most_likely_options(vlm, image):
    a = structured_answers(vlm, [image], ["what colour is the circle?"], SCHEMA, retries=1)[0]
    assert a.valid and a.how == "constrained" and a.attempts == 3 and len(a.raw) == 2
    assert parse_and_validate(json.dumps(a.value), SCHEMA)[0] == a.value
    # the choices are the argmax of log p(option | image, question), computed here through the caption scorer
    colours = vlm.log_likelihood([image] * 3, ["red", "green", "blue"], prompt="what colour is the circle?")
    counts = vlm.log_likelihood([image] * 5, [str(i) for i in range(5)], prompt="what colour is the circle?")
    assert a.value == {
        "colour": ["red", "green", "blue"][int(colours.argmax())],
        "count": int(counts.argmax()),
    }


def test_each_property_is_asked_by_its_description_and_unbounded_numbers_are_digits(vlm, image):
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "description": "how many?"},
        "ok": {"type": "boolean", "description": "is it red?"},
        "name": {"type": "string", "maxLength": 12}}}  # fmt: skip
    a = structured_answers(vlm, [image], ["describe it"], schema, retries=0)[0]
    assert a.valid and isinstance(a.value["n"], int) and isinstance(a.value["ok"], bool)
    assert len(a.value["name"]) <= 12
    yes_no = vlm.log_likelihood([image] * 2, ["yes", "no"], prompt="is it red?")
    assert a.value["ok"] == bool(yes_no.argmax() == 0)
    with pytest.raises(ConfigError, match="constrained decoding builds"):
        structured_answers(vlm, [image], ["q"], {"type": "array", "items": {"type": "string"}}, retries=0)


def test_a_valid_reply_is_kept_and_a_retry_counts(vlm, image, monkeypatch):
    replies = iter(["no idea", 'here: {"colour": "green", "count": 1}'])
    monkeypatch.setattr(vlm, "generate", lambda images, convs, config: [next(replies) for _ in convs])
    a = structured_answers(vlm, [image], ["q"], SCHEMA, retries=2)[0]
    assert (a.value, a.how, a.attempts, a.raw) == ({"colour": "green", "count": 1}, "retry", 2,
                                                   ["no idea", 'here: {"colour": "green", "count": 1}'])  # fmt: skip
    replies = iter(["nothing", "still nothing"])
    a = structured_answers(vlm, [image], ["q"], SCHEMA, retries=1, constrain=False)[0]
    assert not a.valid and a.value is None and a.how == "invalid" and a.error == "no JSON object in the reply"
