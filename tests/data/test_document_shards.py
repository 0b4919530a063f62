"""Interleaved documents in WebDataset shards: written and read back to the same documents (texts, image bytes,
tokens and pixels), bad samples skipped and counted, a truncated shard keeping what precedes the cut."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.interleaved import InterleavedDataset, MemberImage, encode_document, read_documents
from vlmkit.data.shards import SkipStats
from vlmkit.data.shards.documents import read_document_shards, write_document_shards
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import DataError


@pytest.fixture
def docs_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines = [
        {
            "segments": [
                {"text": "intro"},
                {"image": "0.png"},
                {"text": "red one"},
                {"image": "1.png"},
                {"text": "b"},
            ]
        },
        {"texts": [None, "blue one"], "images": ["2.png", None]},
        {"segments": [{"image": "missing.png"}, {"text": "x"}]},  # a bad line: skipped, counted
        {"segments": [{"image": "3.png"}, {"text": "green"}, {"image": "0.png"}, {"text": "again"}]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_documents_round_trip_through_shards(docs_file, tmp_path, word_tokenizer):
    totals = write_document_shards(docs_file, tmp_path / "shards", shard_size=2, progress=False)
    assert totals == {"shards": 2, "documents": 3, "skipped": 1, "out": str(tmp_path / "shards")}
    original = read_documents(docs_file)
    back = read_document_shards(tmp_path / "shards")
    assert len(back) == 3 and not back.bad_rows
    tok = word_tokenizer
    for a, b in zip(original, back, strict=True):
        assert [k for k, _ in a.segments] == [k for k, _ in b.segments]
        for (kind, x), (_, y) in zip(a.segments, b.segments, strict=True):
            if kind == "text":
                assert x == y
            else:
                assert isinstance(y, MemberImage) and y.data == x.read_bytes()
        assert encode_document(a, tok, 3, 4, 64).ids == encode_document(b, tok, 3, 4, 64).ids
    transform = ImageTransform(PreprocessConfig(image_size=16), uint8=True)
    encode = lambda d: encode_document(d, tok, 3, 4, 64)  # noqa: E731
    from_files, from_shards = (
        InterleavedDataset(original, transform, encode),
        InterleavedDataset(back, transform, encode),
    )
    for i in range(3):
        assert torch.equal(from_files[i][0], from_shards[i][0]) and from_files[i][1:] == from_shards[i][1:]


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    good = json.dumps({"segments": [{"image": "0.png"}, {"text": "a red square"}]}).encode()
    _tar(tmp_path / "00000.tar", {
        "a.json": good, "a.0.png": png.getvalue(),
        "b.json": b"{not json", "b.0.png": png.getvalue(),
        "c.json": json.dumps({"segments": [{"image": "1.png"}, {"text": "x"}]}).encode(), "c.0.png": png.getvalue(),
        "d.json": json.dumps({"segments": [{"text": "no image"}]}).encode(),
    })  # fmt: skip
    stats = SkipStats()
    docs = read_document_shards(tmp_path / "00000.tar", stats)
    assert len(docs) == 1 and docs[0].segments[1] == ("text", "a red square")
    assert stats.as_dict()["bad_row"] == 3
    reasons = " | ".join(b.reason for b in docs.bad_rows)
    assert (
        "malformed json member" in reasons
        and "image member 1.png missing" in reasons
        and "no image" in reasons
    )
    with pytest.raises(DataError, match="no usable document in"):
        _tar(tmp_path / "bad.tar", {"b.json": b"{not json"})
        read_document_shards(tmp_path / "bad.tar")


def test_a_truncated_shard_keeps_the_documents_before_the_cut(docs_file, tmp_path):
    write_document_shards(docs_file, tmp_path / "shards", shard_size=10, progress=False)
    whole = (tmp_path / "shards" / "00000.tar").read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) // 2])
    stats = SkipStats()
    docs = read_document_shards(cut, stats)
    assert 1 <= len(docs) < 3 and stats.as_dict()["truncated_tar"] == 1
