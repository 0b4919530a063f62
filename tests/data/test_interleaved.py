"""Interleaved documents: both file shapes, bad lines counted, tokens and labels as OpenFlamingo lays them
out, cuts at chunk boundaries, trailing images dropped; the few-shot files of the shapes data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.interleaved import (
    IGNORE_INDEX,
    Document,
    InterleavedDataset,
    collate_documents,
    encode_document,
    read_documents,
)
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import DataError

IMG, EOC = 3, 4


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / name)
    return tmp_path


def test_both_file_shapes_and_bad_lines(folder):
    lines = [
        {"segments": [{"text": "intro"}, {"image": "a.png"}, {"text": "red one"}]},
        {"texts": [None, "blue one", None, "green"], "images": ["b.png", None, "c.png", None]},
        {"segments": [{"image": "missing.png"}, {"text": "x"}]},
        {"segments": [{"text": "no image at all"}]},
        {"segments": [{"image": "a.png", "text": "both"}]},
    ]
    path = folder / "docs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    docs = read_documents(path)
    assert len(docs) == 2 and docs[1].images == [folder / "b.png", folder / "c.png"]
    reasons = {b.line: b.reason for b in docs.bad_rows}
    assert set(reasons) == {3, 4, 5, 6}
    assert "missing file" in reasons[3] and "no image" in reasons[4] and "malformed JSON" in reasons[6]


def test_tokens_and_labels_follow_openflamingo(folder, word_tokenizer):
    tok = word_tokenizer
    doc = Document([("text", "intro words"), ("image", folder / "a.png"), ("text", "red one"),
                    ("image", folder / "b.png"), ("text", "blue")])  # fmt: skip
    enc = encode_document(doc, tok, IMG, EOC, max_len=100)
    intro, red, one, blue = 10, 12, 13, 14
    assert enc.ids == [1, intro, 11, IMG, red, one, EOC, IMG, blue, EOC]
    # nothing before the first image, nor the <image> tokens, is supervised; the chunk ends are
    assert enc.labels == [
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        red,
        one,
        EOC,
        IGNORE_INDEX,
        blue,
        EOC,
    ]
    assert enc.images == [folder / "a.png", folder / "b.png"]
    # a prompt leaves its last chunk open for the model to continue
    prompt = encode_document(doc, tok, IMG, EOC, max_len=100, close_last=False)
    assert prompt.ids == enc.ids[:-1]


def test_long_documents_are_cut_at_chunk_boundaries_and_trailing_images_dropped(folder, word_tokenizer):
    tok = word_tokenizer
    doc = Document([("image", folder / "a.png"), ("text", "w " * 5), ("image", folder / "b.png"),
                    ("text", "v " * 5), ("image", folder / "c.png")])  # fmt: skip
    enc = encode_document(doc, tok, IMG, EOC, max_len=12)
    assert enc.ids[-1] == EOC and len(enc.ids) == 8 and enc.images == [folder / "a.png"]
    assert enc.notes == ["trailing image", "truncated"]
    assert len(encode_document(doc, tok, IMG, EOC, max_len=100, max_images=1).images) == 1
    with pytest.raises(DataError, match="line 0: the document is .* does not fit the context of 5"):
        encode_document(doc, tok, IMG, EOC, max_len=5)


def test_dataset_counts_and_collates(folder, word_tokenizer):
    tok = word_tokenizer
    docs = [
        Document([("image", folder / "a.png"), ("text", "one two")], 1),
        Document([("image", folder / "a.png"), ("text", "x"), ("image", folder / "b.png"), ("text", "y")], 2),
        Document([("text", "only before"), ("image", folder / "c.png")], 3),  # nothing to learn
    ]
    transform = ImageTransform(PreprocessConfig(image_size=8), uint8=True)
    data = InterleavedDataset(docs, transform, lambda d: encode_document(d, tok, IMG, EOC, 50))
    assert len(data) == 2 and data.counts["skipped"] == 1 and data.counts["trailing_images_dropped"] == 1
    batch = collate_documents(0, [data[0], data[1]])
    assert batch["pixel_values"].shape == (2, 2, 3, 8, 8) and batch["num_media"].tolist() == [1, 2]
    assert batch["pixel_values"][0, 1].abs().sum() == 0  # the padding slot
    assert (
        batch["input_ids"].shape[0] == 2
        and (batch["labels"][0, batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()
    )


def test_fewshot_files_of_the_shapes_data(tmp_path):
    from vlmkit.data.fewshot import TEST_WORDS, TRAIN_WORDS, write_fewshot
    from vlmkit.data.synthetic import generate

    generate(tmp_path, num_train=300, num_val=40, image_size=32, progress=False, num_workers=0)
    paths = write_fewshot(tmp_path, documents=200, episodes=20)
    assert not set(TEST_WORDS) & set(TRAIN_WORDS)
    docs = read_documents(paths["train_interleaved"])
    assert len(docs) == 200
    text = paths["train_interleaved"].read_text()
    words = set(text.replace('"', " ").replace(",", " ").split())
    assert not words & set(TEST_WORDS)  # held-out words appear nowhere in training
    assert any(w in words for w in TRAIN_WORDS)
    episodes = [json.loads(line) for line in paths["val_episodes"].read_text().splitlines()]
    assert len(episodes) == 20
    for e in episodes:
        assert (
            e["label"] in e["classes"] and len(set(e["classes"])) == 2 and set(e["words"]) <= set(TEST_WORDS)
        )
    again = write_fewshot(tmp_path, documents=200, episodes=20)
    assert again["val_episodes"].read_text() == paths["val_episodes"].read_text()  # seeded
