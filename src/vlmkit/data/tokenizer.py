"""Text tokenizer: byte-level BPE from Hugging Face `tokenizers`, with CLIP-style framing.

Every caption becomes exactly `context_length` ids:

    [<|startoftext|>] content... [<|endoftext|>] [<|pad|>]...

The pad token `<|pad|>` has id 0 (then `<|startoftext|>` = 1, `<|endoftext|>` = 2) so a zero-filled
tensor is all padding. Because the end token is not the largest id, text models find it with
`(ids == eot_token_id).int().argmax(-1)` rather than CLIP's `ids.argmax(-1)`.

The framing, truncation and padding are stored in `tokenizer.json` itself (a TemplateProcessing
post-processor plus the file's truncation and padding settings), so the file alone reproduces the ids,
also when loaded with `tokenizers.Tokenizer.from_file` or transformers' `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from vlmkit.errors import ConfigError

PAD_TOKEN = "<|pad|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, SOT_TOKEN, EOT_TOKEN]  # trained in this order: ids 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
_NUM_BYTES = 256  # byte-level BPE always holds every byte


def _json_path(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/tokenizer.json` when `path` is a directory."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


class Tokenizer:
    """Captions -> LongTensor (B, context_length) of `[SOT] tokens [EOT] pad...`.

    Text is normalised as in CLIP: Unicode NFC, lowercase, runs of whitespace collapsed to one space,
    ends stripped. Byte-level BPE has no unknown token: any string encodes and decodes back.

    Truncation: a caption longer than `context_length - 2` tokens keeps its first
    `context_length - 2` tokens, so the sequence is still exactly `context_length` long and its last
    id is `eot_token_id`.
    """

    def __init__(self, backend: _HFTokenizer, context_length: int):
        # A private copy of the `tokenizers.Tokenizer`: framing, truncation and padding are set on it
        # below, and two wrappers with different context lengths must not share those settings.
        self.backend = _HFTokenizer.from_str(backend.to_str())
        backend = self.backend
        ids = {t: backend.token_to_id(t) for t in (SOT_TOKEN, EOT_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"tokenizer has no {missing[0]!r} token; train one with Tokenizer.train")
        self._sot, self._eot = ids[SOT_TOKEN], ids[EOT_TOKEN]
        pad = backend.padding
        if pad is not None:
            self._pad, pad_token = pad["pad_id"], pad["pad_token"]
        elif backend.token_to_id(PAD_TOKEN) is not None:
            self._pad, pad_token = backend.token_to_id(PAD_TOKEN), PAD_TOKEN
        else:
            self._pad, pad_token = self._eot, EOT_TOKEN  # the convention of OpenAI's CLIP files
        self._configure(context_length, pad_token)
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we never use
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def _configure(self, context_length: int, pad_token: str) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"context_length must be an integer >= 2 (SOT + EOT), got {context_length!r}")
        self._context_length = context_length
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
            pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B:1 {EOT_TOKEN}:1",
            special_tokens=[(SOT_TOKEN, self._sot), (EOT_TOKEN, self._eot)],
        )
        # truncation counts the post-processor's two special tokens, so content is cut, never EOT
        self.backend.enable_truncation(max_length=context_length)
        self.backend.enable_padding(length=context_length, pad_id=self._pad, pad_token=pad_token)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        context_length: int = 77,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Learn a byte-level BPE vocabulary of at most `vocab_size` ids (specials and bytes included)."""
        if vocab_size < _NUM_BYTES + len(SPECIAL_TOKENS):
            raise ConfigError(
                f"vocab_size must be at least {_NUM_BYTES + len(SPECIAL_TOKENS)} "
                f"(every byte plus {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
            )
        backend = _HFTokenizer(models.BPE())
        backend.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.Lowercase(),
                normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Strip(),
            ]
        )
        # a prefix space makes a word's first-position token the same as its mid-sentence one
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, context_length)

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int | None = None) -> Tokenizer:
        """Load a `tokenizer.json` (or the one in a directory). `context_length` defaults to the file's."""
        path = _json_path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"{path} is not a tokenizers JSON file: {e}") from None
        if context_length is None:
            if backend.truncation is not None:
                context_length = backend.truncation["max_length"]
            elif backend.padding is not None and backend.padding.get("length"):
                context_length = backend.padding["length"]
            else:
                raise ConfigError(f"{path} stores no context length; pass context_length")
        return cls(backend, context_length)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (to `path`, or inside it when it is a directory); returns the file."""
        path = _json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Encode one caption or a batch; returns LongTensor (B, context_length)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encodings = self._encode_batch(batch)
        if not encodings:
            return torch.empty(0, self._context_length, dtype=torch.long)
        # via NumPy: several times faster than torch.tensor on nested lists
        return torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))  # (B, L)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids of one sequence -> text, up to the first EOT; special tokens dropped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and not isinstance(ids[0], int):
            raise ValueError("decode takes the ids of one sequence; loop over a batch")
        if self._eot in ids:
            ids = ids[: ids.index(self._eot)]
        return self.backend.decode(ids, skip_special_tokens=True).strip()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def sot_token_id(self) -> int:
        return self._sot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def pad_token_id(self) -> int:
        return self._pad

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
