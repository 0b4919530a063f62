"""Conversations with several images: LLaVA and Flamingo models read one image per <image> marker, in order;
a batch of conversations with different numbers of images answers as each conversation alone; CoCa and a
count that does not match the markers are one line; `vlmkit chat` takes --image more than once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.interleaved import CHUNK_TOKEN, IMAGE_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import DataError
from vlmkit.inference import VLMPipeline
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.registry import create_model

TEXTS = ["Question: what colour is the circle? Short answer: red", "Output: a blue square on the left",
         "USER: is it the same shape? ASSISTANT: yes"] * 20  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(
        TEXTS, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN]
    )


def _flamingo(tok):
    torch.manual_seed(0)
    model = create_model(
        "flamingo-tiny", **{"vision.image_size": 32, "decoder.vocab_size": tok.vocab_size, "perceiver.latents": 4,
                            "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chunk_token_id": tok.token_to_id(CHUNK_TOKEN),
                            "decoder.eos_token_id": tok.eot_token_id, "decoder.bos_token_id": tok.sot_token_id,
                            "gate_init": 0.5},  # non-zero gates: images change the output
    ).eval()  # fmt: skip
    return VLMPipeline(model, tok, PreprocessConfig(image_size=32), precision="fp32")


def _llava(tok):
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 2, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant"}  # fmt: skip
    model = create_model("llava-tiny", **small).eval()
    return VLMPipeline(model, tok, PreprocessConfig(image_size=32), precision="fp32")


def _ask(n: int, question: str = "is it the same shape?") -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n" * n + question}]


def test_flamingo_prompts_put_the_images_first_in_its_vqa_format(tokenizer, images):
    vlm = _flamingo(tokenizer)
    ids = vlm.prompt_ids(_ask(2, "what colour is the circle?"))
    image = vlm.model.cfg.image_token_id
    expected = [tokenizer.sot_token_id, image, image] + tokenizer.encode(
        "Question: what colour is the circle? Short answer:"
    )
    assert ids == expected
    # the generation is the model's own on that prompt and both images
    config = GenerationConfig(max_new_tokens=6, eos_token_id=vlm.end_ids, pad_token_id=tokenizer.pad_token_id)
    got = vlm.generate([images[:2]], [_ask(2, "what colour is the circle?")], config)[0]
    pixels = vlm.pixel_values(images[:2])[None]
    new = vlm.model.generate(torch.tensor([expected]), pixels, config=config)[0].tolist()
    assert got == vlm.decode(new)


@pytest.mark.parametrize("family", ["flamingo", "llava"])
def test_a_batch_of_different_image_counts_answers_as_each_alone(family, tokenizer, images):
    vlm = _flamingo(tokenizer) if family == "flamingo" else _llava(tokenizer)
    config = GenerationConfig(max_new_tokens=5, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    groups = [images[:1], images[:3], [images[2], images[0]]]
    conversations = [_ask(len(g)) for g in groups]
    together = vlm.generate(groups, conversations, config)
    alone = [vlm.generate([g], [c], config)[0] for g, c in zip(groups, conversations, strict=True)]
    assert together == alone
    # the images matter and their order does: swapping two changes the logits of the prompt
    ids = torch.tensor([vlm.prompt_ids(_ask(2))])
    if family == "flamingo":
        a = vlm.model(ids, vlm.pixel_values(images[:2])[None]).logits
        b = vlm.model(ids, vlm.pixel_values(images[:2][::-1])[None]).logits
    else:
        a = vlm.model(ids, vlm.pixel_values(images[:2])).logits
        b = vlm.model(ids, vlm.pixel_values(images[:2][::-1])).logits
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-5)


def test_image_counts_that_differ_from_the_markers_are_one_line(tokenizer, images):
    vlm = _llava(tokenizer)
    with pytest.raises(DataError, match=r"conversation 0 has 1 <image> markers but 2 images"):
        vlm.generate([images[:2]], [_ask(1)])
    with pytest.raises(DataError, match=r"conversation 1 has 2 <image> markers but 1 images"):
        vlm.generate([images[0], images[1]], [_ask(1), _ask(2)])


def test_coca_reads_one_image(tokenizer, images):
    coca = create_model(
        "coca-tiny", **{"decoder.vocab_size": tokenizer.vocab_size, "vision.image_size": 32}
    ).eval()
    vlm = VLMPipeline(coca, tokenizer, PreprocessConfig(image_size=32), precision="fp32")
    with pytest.raises(DataError, match="CoCa reads one image per conversation, not 2"):
        vlm.generate([images[:2]], [_ask(2)])


def test_chat_cli_takes_several_images(tokenizer, images, tmp_path, capsys):
    from vlmkit.cli.main import main
    from vlmkit.models.pretrained import save_pretrained

    vlm = _flamingo(tokenizer)
    folder = save_pretrained(vlm.model, tmp_path / "flamingo", tokenizer, PreprocessConfig(image_size=32))
    main(["chat", "--model", str(folder), "--image", str(images[0]), "--image", str(images[1]),
          "--message", "what colour is the circle?", "--message", "and the square?", "--max-new-tokens", "4",
          "--precision", "fp32"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "user: and the square?" in out


def test_several_images_are_labelled_in_the_prompt_and_one_is_not(tokenizer):
    from vlmkit.data.chat import image_markers

    assert image_markers(1) == f"{IMAGE_TOKEN}\n"
    assert image_markers(2) == f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\n"
    assert image_markers(2, "Picture {}:") == f"Picture 1:{IMAGE_TOKEN}\nPicture 2:{IMAGE_TOKEN}\n"
    assert image_markers(3, None) == f"{IMAGE_TOKEN}\n" * 3
    vlm = _llava(tokenizer)
    ids = vlm.prompt_ids([{"from": "human", "value": image_markers(2) + "is it the same shape?"}])
    n = vlm.num_image_tokens
    image_id = vlm.image_token_id
    # "Image 2:" sits between the two images' tokens, whose counts are unchanged
    first_end = ids.index(image_id) + n
    between = tokenizer.decode(ids[first_end : ids.index(image_id, first_end)])
    assert "image 2:" in between.lower() and ids.count(image_id) == 2 * n


def test_chat_cli_labels_several_images_and_answers_in_json(tokenizer, images, tmp_path, capsys):
    import json

    from vlmkit.cli.main import main
    from vlmkit.models.pretrained import save_pretrained

    vlm = _llava(tokenizer)
    folder = save_pretrained(vlm.model, tmp_path / "llava", tokenizer, PreprocessConfig(image_size=32))
    schema = {"type": "object", "properties": {"same": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}},
              "required": ["same", "colour"]}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(schema))
    main(["chat", "--model", str(folder), "--image", str(images[0]), "--image", str(images[1]), "--message",
          "is it the same shape?", "--json-schema", str(tmp_path / "s.json"), "--retries", "1",
          "--max-new-tokens", "6", "--precision", "fp32"])  # fmt: skip
    out = capsys.readouterr()
    value = json.loads(out.out.splitlines()[1])
    assert (
        set(value) == {"same", "colour"}
        and isinstance(value["same"], bool)
        and value["colour"] in ("red", "blue")
    )
    assert (
        "constrained after 3 attempt(s); valid: True" in out.err
    )  # a random model never writes the JSON itself
