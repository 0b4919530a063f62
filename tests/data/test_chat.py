"""Chat templates: the supervised-token mask, image placeholders, truncation, batching."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from vlmkit.data.chat import IMAGE_TOKEN, collate, collate_prompts, generation_prompt, render
from vlmkit.data.tokenizer import EOT_TOKEN, PAD_TOKEN, SOT_TOKEN, Tokenizer
from vlmkit.errors import ConfigError, DataError, NoSupervisedTokensError
from vlmkit.losses.captioning import IGNORE_INDEX, next_token_loss

X = IGNORE_INDEX
WORDS = [PAD_TOKEN, SOT_TOKEN, EOT_TOKEN, IMAGE_TOKEN, "[UNK]"]
WORDS += "be brief USER: ASSISTANT: what colour? red and shape? a circle".split()


@pytest.fixture(scope="module")
def words():
    """One id per whitespace-separated word, so expected ids can be written out by hand."""
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([PAD_TOKEN, SOT_TOKEN, EOT_TOKEN, IMAGE_TOKEN])
    return Tokenizer(backend, context_length=64)


@pytest.fixture(scope="module")
def bpe():
    texts = ["what colour is the circle? red", "what shape is it? a square", "user: hi assistant: hello"] * 4
    return Tokenizer.train(texts, vocab_size=300, context_length=32, extra_special_tokens=[IMAGE_TOKEN])


def ids_of(words: str) -> list[int]:
    return [WORDS.index(w) for w in words.split()]


CHAT = [
    {"from": "system", "value": "be brief"},
    {"from": "human", "value": "<image>\nwhat colour?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "and shape?"},
    {"from": "gpt", "value": "a circle"},
]


def test_vicuna_two_turn_mask_by_hand(words):
    ids, labels = render(CHAT, words, "vicuna", num_image_tokens=3, image_token_id=3)
    # <s> be brief USER: <image>x3 what colour? ASSISTANT: red </s> USER: and shape? ASSISTANT: a circle </s>
    #  0   1   2     3     4 5 6    7     8        9        10   11   12   13   14      15      16   17    18
    expected = [1, *ids_of("be brief USER:"), 3, 3, 3, *ids_of("what colour? ASSISTANT: red"), 2]
    expected += [*ids_of("USER: and shape? ASSISTANT: a circle"), 2]
    assert ids == expected
    supervised = [i for i, label in enumerate(labels) if label != X]
    assert supervised == [10, 11, 16, 17, 18]  # the answers and their end tokens, nothing else
    assert [labels[i] for i in supervised] == [ids[i] for i in supervised]


def test_role_content_turns_equal_from_value(words):
    names = {"system": "system", "human": "user", "gpt": "assistant"}
    chat = [{"role": names[t["from"]], "content": t["value"]} for t in CHAT]
    kw = dict(num_image_tokens=3, image_token_id=3)
    assert render(chat, words, "vicuna", **kw) == render(CHAT, words, "vicuna", **kw)


def test_default_system_prompt_and_generation_prompt(bpe):
    chat = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}]
    ids = generation_prompt(chat, bpe, "vicuna", num_image_tokens=2, image_token_id=3)
    text = bpe.decode([i for i in ids if i != 3])
    assert text.startswith("a chat between a curious human and an artificial intelligence assistant.")
    assert text.endswith("user: what colour is the circle? assistant:")  # the tokenizer lowercases
    assert ids[0] == bpe.sot_token_id and ids.count(3) == 2
    ids2, labels = render(
        chat, bpe, "vicuna", num_image_tokens=2, image_token_id=3, add_generation_prompt=True
    )
    assert ids2 == ids and set(labels) == {X}


def test_supervised_tokens_decode_to_the_answers(bpe):
    chat = [
        {"from": "human", "value": "<image>\nwhat colour is the circle?"},
        {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "what shape is it?"},
        {"from": "gpt", "value": "a square"},
    ]
    for template in ("vicuna", "chatml", "plain"):
        ids, labels = render(chat, bpe, template, num_image_tokens=4, image_token_id=3)
        runs, run = [], []
        for label in labels + [X]:
            if label != X:
                run.append(label)
            elif run:
                runs.append(run)
                run = []
        ends = [bpe.eot_token_id] if template != "chatml" else bpe.encode("<|im_end|>")
        assert [r[-len(ends) :] for r in runs] == [ends, ends], template
        assert [bpe.decode(r[: -len(ends)]) for r in runs] == ["red", "a square"], template


def test_image_expansion(words):
    two = [{"from": "human", "value": "<image> what colour? <image>"}, {"from": "gpt", "value": "red"}]
    ids, _ = render(two, words, "plain", num_image_tokens=5, image_token_id=3)
    assert ids == [1, 3, 3, 3, 3, 3, *ids_of("what colour?"), 3, 3, 3, 3, 3, *ids_of("red"), 2]
    ids, labels = render(two, words, "plain", num_image_tokens=0, image_token_id=None)  # CoCa: dropped
    assert ids == [1, *ids_of("what colour? red"), 2]
    assert labels == [X, X, X, *ids_of("red"), 2]
    with pytest.raises(ConfigError, match="image_token_id"):
        render(two, words, "plain", num_image_tokens=5, image_token_id=None)
    with pytest.raises(DataError, match="turn 1.*user turn"):
        render([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], words, "plain",
               num_image_tokens=1, image_token_id=3)  # fmt: skip


def test_plain_template(words):
    caption = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]
    ids, labels = render(caption, words, "plain", num_image_tokens=2, image_token_id=3)
    assert ids == [1, 3, 3, *ids_of("a red circle"), 2]
    assert labels == [X, X, X, *ids_of("a red circle"), 2]
    empty = [{"from": "human", "value": ""}, {"from": "gpt", "value": "red"}]  # no human text at all
    assert render(empty, words, "plain", num_image_tokens=0, image_token_id=None) == (
        [1, *ids_of("red"), 2],
        [X, *ids_of("red"), 2],
    )


def test_huggingface_content_lists(words):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    ids, _ = render(chat, words, "plain", num_image_tokens=1, image_token_id=3)
    assert ids == [1, 3, *ids_of("what colour? red"), 2]


def test_truncation(words):
    kw = dict(num_image_tokens=3, image_token_id=3)
    full, full_labels = render(CHAT, words, "vicuna", **kw)
    ids, labels = render(CHAT, words, "vicuna", max_len=11, **kw)
    assert ids == full[:11] and labels == full_labels[:11]
    assert render(CHAT, words, "vicuna", max_len=len(full), **kw) == (full, full_labels)
    with pytest.raises(DataError, match="conversation 17: its image tokens end past max_len 6"):
        render(CHAT, words, "vicuna", max_len=6, row=17, **kw)
    with pytest.raises(DataError, match="longer than max_len"):
        render(CHAT[:2], words, "vicuna", max_len=8, add_generation_prompt=True, **kw)


def test_bad_conversations(words):
    kw = dict(num_image_tokens=0, image_token_id=None)
    with pytest.raises(DataError, match="conversation 3 turn 1: unknown role 'bot'"):
        render(
            [{"from": "human", "value": "hi"}, {"from": "bot", "value": "red"}], words, "vicuna", row=3, **kw
        )
    with pytest.raises(DataError, match="non-empty list"):
        render([], words, "vicuna", **kw)
    with pytest.raises(DataError, match="system turn must come first"):
        render([{"from": "human", "value": "hi"}, {"from": "system", "value": "x"}], words, "vicuna", **kw)
    with pytest.raises(ConfigError, match="unknown chat template 'llama9'"):
        render(CHAT, words, "llama9", **kw)


def test_collate_right_pads():
    rows = [([1, 5, 6], [X, 5, 6]), ([1, 7], [X, X])]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 5, 6], [X, X, X]]
    prompts = collate_prompts([[1, 5, 6], [1, 7]], pad_token_id=0)  # generation pads on the left
    assert prompts["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_no_supervised_token_is_an_error(words):
    """A batch whose answers were all cut off (or that has none) fails loudly in the loss."""
    kw = dict(num_image_tokens=3, image_token_id=3)
    rows = [render(CHAT, words, "vicuna", max_len=10, **kw), render(CHAT[:2], words, "vicuna", **kw)]
    batch = collate(rows, pad_token_id=0)
    assert (batch["labels"] == X).all()
    torch.manual_seed(0)
    hidden, head = torch.randn(*batch["input_ids"].shape, 8), torch.nn.Linear(8, len(WORDS))
    with pytest.raises(NoSupervisedTokensError, match="chat template"):
        next_token_loss(hidden, batch["labels"], head)
    rows[1] = render(CHAT, words, "vicuna", **kw)  # one answer is enough
    labels = collate(rows, pad_token_id=0)["labels"]
    hidden = torch.randn(*labels.shape, 8)
    assert torch.isfinite(next_token_loss(hidden, labels, head))
