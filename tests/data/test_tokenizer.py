import random

import pytest
import tokenizers
import torch

from vlmkit.data.tokenizer import EOT_TOKEN, PAD_TOKEN, SOT_TOKEN, Tokenizer
from vlmkit.errors import ConfigError

WORDS = "a photo of the dog cat red blue small large on in grass table car tree running sitting near".split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=320, context_length=16)


def content(tok: Tokenizer, row: torch.Tensor) -> list[int]:
    """The ids between SOT and the first EOT."""
    ids = row.tolist()
    return ids[1 : ids.index(tok.eot_token_id)]


def test_special_ids(tok):
    assert (tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (0, 1, 2)
    assert tok.backend.id_to_token(0) == PAD_TOKEN
    assert tok.backend.id_to_token(1) == SOT_TOKEN
    assert tok.backend.id_to_token(2) == EOT_TOKEN


def test_vocab_size_at_most_requested(tok):
    assert 256 + 3 < tok.vocab_size <= 320
    assert len(tok.backend.get_vocab()) == tok.vocab_size


def test_framing_and_padding(tok):
    ids = tok(["a photo of the dog", "a cat"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    for row, text in zip(ids, ["a photo of the dog", "a cat"]):
        n = len(content(tok, row))
        assert n > 0
        assert row[0] == tok.sot_token_id
        assert row[n + 1] == tok.eot_token_id
        assert (row[n + 2 :] == tok.pad_token_id).all()
        assert tok.decode(row) == text
    # trained on these words: each is a single merged token
    assert len(content(tok, ids[1])) == 2


def test_truncation_keeps_eot_last(tok):
    long = " ".join(corpus(30, seed=1))
    ids = tok(long)
    assert ids.shape == (1, 16)
    assert ids[0, 0] == tok.sot_token_id and ids[0, -1] == tok.eot_token_id
    assert (ids[0] != tok.pad_token_id).all()
    # the content kept is the first 14 tokens of the untruncated encoding
    wide = Tokenizer(tok.backend, context_length=4096)
    full = content(wide, wide(long)[0])
    assert len(full) > 14
    assert ids[0, 1:-1].tolist() == full[:14]
    assert tok.context_length == 16  # the wider copy did not change this one


def test_exact_fit_is_not_truncated(tok):
    fits = " ".join(["dog"] * 14)  # a trained word: one token each, 14 + SOT + EOT = 16
    ids = tok([fits, fits + " dog"])
    assert len(content(tok, ids[0])) == 14 and tok.decode(ids[0]) == fits
    assert torch.equal(ids[0], ids[1])  # one word more is cut back to the same ids


def test_batch_equals_single(tok):
    texts = corpus(20, seed=3) + [""]
    batch = tok(texts)
    assert torch.equal(batch, torch.cat([tok(t) for t in texts]))
    assert torch.equal(tok(tuple(texts)), batch)  # a DataLoader collates captions into a tuple
    assert tok([]).shape == (0, 16)


def test_empty_string(tok):
    ids = tok("")[0]
    assert ids[:2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert (ids[2:] == tok.pad_token_id).all()
    assert tok.decode(ids) == ""


def test_normalisation(tok):
    assert torch.equal(tok("  A   Dog\n\tON the  GRASS "), tok("a dog on the grass"))
    assert torch.equal(tok("cafe\u0301"), tok("caf\u00e9"))  # NFC: e + combining accent == é


def test_unseen_text_is_byte_level(tok):
    text = "zebra über 日本語 🙂 x-ray #42"
    wide = Tokenizer(tok.backend, context_length=64)
    ids = wide(text)[0]
    assert (ids < tok.vocab_size).all()
    assert tok.backend.token_to_id("[UNK]") is None and tok.backend.token_to_id("<unk>") is None
    assert len(content(wide, ids)) > len(text.split())  # unseen words fall apart into bytes
    assert wide.decode(ids) == text


def test_decode_stops_at_eot(tok):
    ids = tok("a red car")[0].clone()
    ids[-1] = tok("dog")[0, 1]  # garbage after EOT, as a generator may produce
    assert tok.decode(ids) == "a red car"
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(tok(["a", "b"]))


def test_save_load_round_trip(tok, tmp_path):
    texts = corpus(50, seed=4) + ["", " ".join(corpus(20, seed=5)), "zebra 🙂"]
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    loaded = Tokenizer.from_file(path)
    assert loaded.context_length == 16
    assert torch.equal(loaded(texts), tok(texts))
    assert (loaded.sot_token_id, loaded.eot_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert Tokenizer.from_file(tmp_path, context_length=8)(texts).shape == (len(texts), 8)
    # the file alone reproduces the ids in the plain `tokenizers` library
    plain = tokenizers.Tokenizer.from_file(str(path))
    assert [e.ids for e in plain.encode_batch(texts)] == tok(texts).tolist()


def test_transformers_loads_the_file(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tok.save(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    texts = corpus(20, seed=6) + [" ".join(corpus(20, seed=7))]
    out = hf(texts, padding="max_length", truncation=True, max_length=16)["input_ids"]
    assert out == tok(texts).tolist()


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(corpus(10), vocab_size=100)
    with pytest.raises(ConfigError, match="context_length"):
        Tokenizer.train(corpus(10), vocab_size=300, context_length=1)
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
