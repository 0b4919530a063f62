"""Text tokenizer: byte-level BPE from Hugging Face `tokenizers`, with CLIP-style framing.

Every caption becomes exactly `context_length` ids:

    [<|startoftext|>] content... [<|endoftext|>] [<|pad|>]...

The pad token `<|pad|>` has id 0 (then `<|startoftext|>` = 1, `<|endoftext|>` = 2) so a zero-filled
tensor is all padding. Because the end token is not the largest id, text models find it with
`(ids == eot_token_id).int().argmax(-1)` rather than CLIP's `ids.argmax(-1)`.

The framing, truncation and padding are stored in `tokenizer.json` itself (a TemplateProcessing
post-processor plus the file's truncation and padding settings), so the file alone reproduces the ids,
also when loaded with `tokenizers.Tokenizer.from_file` or transformers' `PreTrainedTokenizerFast`.

Hugging Face tokenizer folders name their special tokens in `tokenizer_config.json` (and
`special_tokens_map.json`): `from_file` reads the start, end and pad tokens from there when the files sit
beside `tokenizer.json` (OpenAI's CLIP: `<|startoftext|>`, `<|endoftext|>`, padding with `<|endoftext|>`),
so the ids equal transformers' `tokenizer(texts, padding="max_length", truncation=True, max_length=L)`.
`save_hf` writes those files for a vlmkit tokenizer.
"""

from __future__ import annotations

import json
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
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_NUM_BYTES = 256  # byte-level BPE always holds every byte


def _json_path(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/tokenizer.json` when `path` is a directory."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


class Tokenizer:
    """Captions -> LongTensor (B, context_length) of `[SOT] tokens [EOT] pad...`.

    Text is normalised as in CLIP: Unicode NFC, lowercase, runs of whitespace collapsed to one space,
    ends stripped. Byte-level BPE has no unknown token: any string encodes and decodes back. (A
    tokenizer loaded from a file keeps that file's normalisation and vocabulary; only the framing,
    truncation and padding are set here, from its special tokens.)

    Truncation: a caption longer than `context_length - 2` tokens keeps its first
    `context_length - 2` tokens, so the sequence is still exactly `context_length` long and its last
    id is `eot_token_id`.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        context_length: int,
        *,
        sot_token: str | None = SOT_TOKEN,
        eot_token: str = EOT_TOKEN,
        pad_token: str | None = None,
    ):
        """Wrap a `tokenizers.Tokenizer`. `sot_token` (None: no start token) and `eot_token` frame every
        sequence; `pad_token` defaults to the file's padding token, else `<|pad|>`, else the end token."""
        # A private copy of the `tokenizers.Tokenizer`: framing, truncation and padding are set on it
        # below, and two wrappers with different context lengths must not share those settings.
        self.backend = _HFTokenizer.from_str(backend.to_str())
        backend = self.backend
        ids = {t: backend.token_to_id(t) for t in (sot_token, eot_token) if t is not None}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"tokenizer has no {missing[0]!r} token; train one with Tokenizer.train")
        self._sot_token, self._eot_token = sot_token, eot_token
        self._sot, self._eot = ids.get(sot_token), ids[eot_token]
        pad = backend.padding
        if pad_token is not None:
            if backend.token_to_id(pad_token) is None:
                raise ConfigError(f"tokenizer has no pad token {pad_token!r} in its vocabulary")
            self._pad = backend.token_to_id(pad_token)
        elif pad is not None:
            self._pad, pad_token = pad["pad_id"], pad["pad_token"]
        elif backend.token_to_id(PAD_TOKEN) is not None:
            self._pad, pad_token = backend.token_to_id(PAD_TOKEN), PAD_TOKEN
        else:
            self._pad, pad_token = self._eot, eot_token  # the convention of OpenAI's CLIP files
        self._pad_token = pad_token
        self.hf_tokenizer_class: str | None = None  # set by from_file from a tokenizer_config.json
        self.bert_style = False  # framed by BERT's cls/sep tokens (from_file sets it): save_hf names them so
        self._plain: _HFTokenizer | None = None  # built by `encode` on first use
        self._configure(context_length, pad_token)
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we never use
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def _configure(self, context_length: int, pad_token: str) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"context_length must be an integer >= 2 (SOT + EOT), got {context_length!r}")
        self._context_length = context_length
        sot, eot = self._sot_token, self._eot_token
        start = f"{sot} " if sot is not None else ""
        specials = [(eot, self._eot)] + ([(sot, self._sot)] if sot is not None else [])
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{start}$A {eot}", pair=f"{start}$A {eot} $B:1 {eot}:1", special_tokens=specials
        )
        # truncation counts the post-processor's special tokens, so content is cut, never EOT
        self.backend.enable_truncation(max_length=context_length)
        self.backend.enable_padding(length=context_length, pad_id=self._pad, pad_token=pad_token)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        context_length: int = 77,
        min_frequency: int = 2,
        extra_special_tokens: Sequence[str] = (),
    ) -> Tokenizer:
        """Learn a byte-level BPE vocabulary of at most `vocab_size` ids (specials and bytes included).

        `extra_special_tokens` (e.g. `["<image>"]` for LLaVA's placeholder) get the ids after the pad, start
        and end tokens (3, 4, ...), are never split or normalised, and are dropped by `decode`.
        """
        specials = SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
        if vocab_size < _NUM_BYTES + len(specials):
            raise ConfigError(
                f"vocab_size must be at least {_NUM_BYTES + len(specials)} "
                f"(every byte plus {len(specials)} special tokens), got {vocab_size}"
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
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, context_length)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, context_length: int | None = None, *, for_generation: bool = False
    ) -> Tokenizer:
        """Load a `tokenizer.json` (or the one in a directory). `context_length` defaults to the file's.

        A Hugging Face `tokenizer_config.json` / `special_tokens_map.json` beside the file gives the special
        tokens (bos, eos, pad; BERT's cls and sep where it names no eos) and, as `model_max_length`, the default context length. `for_generation`
        accepts a folder that pads on the left (as generative models' folders do): chat prompts are built
        with `encode` and padded by vlmkit.data.chat, never by `__call__`.
        """
        path = _json_path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"{path} is not a tokenizers JSON file: {e}") from None
        hf = _read_hf_config(path.parent)
        if context_length is None:
            if hf.get("model_max_length"):
                context_length = hf["model_max_length"]
            elif backend.truncation is not None:
                context_length = backend.truncation["max_length"]
            elif backend.padding is not None and backend.padding.get("length"):
                context_length = backend.padding["length"]
            else:
                raise ConfigError(f"{path} stores no context length; pass context_length")
        if not hf:  # a file vlmkit wrote: its own framing says which tokens start and end a text
            sot, eot = _framing(backend)
            tok = cls(backend, context_length, sot_token=sot, eot_token=eot)
            tok.bert_style = (sot, eot) == ("[CLS]", "[SEP]")
            return tok
        where = path.parent / HF_TOKENIZER_CONFIG
        if hf.get("padding_side", "right") != "right" and not for_generation:
            raise ConfigError(f"{where}: padding_side {hf['padding_side']!r} is not supported; use 'right'")
        # BERT-style folders (BLIP's) frame a text as [CLS] ... [SEP] and have no eos_token (a bos_token
        # there, such as BLIP's [DEC], is not the start of an encoded text)
        bert = hf.get("eos_token") is None and hf.get("sep_token") is not None
        sot, eot = (
            (hf.get("cls_token"), hf["sep_token"]) if bert else (hf.get("bos_token"), hf.get("eos_token"))
        )
        if eot is None:
            raise ConfigError(f'{where} names no eos_token; add the end-of-text token as "eos_token"')
        try:
            tok = cls(backend, context_length, sot_token=sot, eot_token=eot, pad_token=hf.get("pad_token"))
        except ConfigError as e:
            raise ConfigError(f"{path} does not fit {where}: {e}") from None
        tok.hf_tokenizer_class = hf.get("tokenizer_class")
        tok.bert_style = bert
        return tok

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (to `path`, or inside it when it is a directory); returns the file."""
        path = _json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    def save_hf(self, directory: str | os.PathLike) -> list[Path]:
        """Write a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

        transformers' `AutoTokenizer.from_pretrained(directory)` then gives the same ids as this tokenizer
        (with `padding="max_length", truncation=True, max_length=context_length`). A tokenizer loaded from a
        CLIP folder keeps its `CLIPTokenizer` class; any other is a plain `PreTrainedTokenizerFast`, which
        uses the file as it is.
        """
        directory = Path(directory)
        path = self.save(directory / TOKENIZER_FILE)
        if self.bert_style:
            special = {
                "cls_token": self._sot_token,
                "sep_token": self._eot_token,
                "pad_token": self._pad_token,
            }
        else:
            special = {
                "bos_token": self._sot_token,
                "eos_token": self._eot_token,
                "pad_token": self._pad_token,
            }
        unk = json.loads(self.backend.to_str())["model"].get("unk_token")
        if unk is not None:
            special["unk_token"] = unk
        special = {k: v for k, v in special.items() if v is not None}
        config = {
            "tokenizer_class": self.hf_tokenizer_class or "PreTrainedTokenizerFast",
            "model_max_length": self._context_length,
            "padding_side": "right",
            **special,
        }
        files = [path, directory / HF_TOKENIZER_CONFIG, directory / HF_SPECIAL_TOKENS_MAP]
        files[1].write_text(json.dumps(config, indent=2) + "\n")
        files[2].write_text(json.dumps(special, indent=2) + "\n")
        return files

    def with_context_length(self, context_length: int) -> Tokenizer:
        """A copy that frames, truncates and pads to `context_length` tokens."""
        if context_length == self._context_length:
            return self
        tok = Tokenizer(
            self.backend,
            context_length,
            sot_token=self._sot_token,
            eot_token=self._eot_token,
            pad_token=self._pad_token,
        )
        tok.hf_tokenizer_class, tok.bert_style = self.hf_tokenizer_class, self.bert_style
        return tok

    def with_swapped_ids(self, a: int, b: int) -> Tokenizer:
        """A copy in which the tokens with ids `a` and `b` trade ids (and nothing else changes).

        A model used with the copy needs the same two rows of its token embedding swapped.
        """
        data = json.loads(self.backend.to_str())
        swap = {a: b, b: a}
        vocab = data["model"].get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            data["model"]["vocab"] = {t: swap.get(i, i) for t, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: the id is the position
            vocab[a], vocab[b] = vocab[b], vocab[a]
        else:
            raise ConfigError(f"cannot renumber a {data['model'].get('type')} tokenizer")
        for added in data.get("added_tokens") or []:
            added["id"] = swap.get(added["id"], added["id"])
        data["post_processor"] = data["padding"] = None  # rebuilt with the new ids below
        tok = Tokenizer(
            _HFTokenizer.from_str(json.dumps(data)),
            self._context_length,
            sot_token=self._sot_token,
            eot_token=self._eot_token,
            pad_token=self._pad_token,
        )
        tok.hf_tokenizer_class, tok.bert_style = self.hf_tokenizer_class, self.bert_style
        return tok

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Encode one caption or a batch; returns LongTensor (B, context_length)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encodings = self._encode_batch(batch)
        if not encodings:
            return torch.empty(0, self._context_length, dtype=torch.long)
        # via NumPy: several times faster than torch.tensor on nested lists
        return torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))  # (B, L)

    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: no start/end tokens, no padding, no truncation (for chat templates)."""
        if self._plain is None:  # a copy without the framing, truncation and padding set on `backend`
            self._plain = _HFTokenizer.from_str(self.backend.to_str())
            self._plain.no_truncation()
            self._plain.no_padding()
        return self._plain.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (e.g. "<image>"), or None when the vocabulary does not have it."""
        return self.backend.token_to_id(token)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids of one sequence -> text, up to the first EOT; special tokens dropped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and not isinstance(ids[0], int):
            raise ValueError("decode takes the ids of one sequence; loop over a batch")
        if self._eot in ids:
            ids = ids[: ids.index(self._eot)]
        text = self.backend.decode(ids, skip_special_tokens=True)
        # OpenAI CLIP's BPE marks word ends with a suffix (</w>) that the byte-level decoder leaves in
        suffix = getattr(self.backend.model, "end_of_word_suffix", None)
        if suffix:
            text = text.replace(suffix, " ")
        return text.strip()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def sot_token_id(self) -> int | None:
        return self._sot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The start, end and pad tokens, under Hugging Face's names (bos_token, eos_token, pad_token)."""
        return {"bos_token": self._sot_token, "eos_token": self._eot_token, "pad_token": self._pad_token}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _framing(backend: _HFTokenizer) -> tuple[str | None, str]:
    """(start, end) tokens of a file's single-text template (`[CLS] $A [SEP]`, `<|startoftext|> $A
    <|endoftext|>`, or `$A </s>`); vlmkit's defaults when the file has no template."""
    post = json.loads(backend.to_str()).get("post_processor") or {}
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return post["cls"][0], post["sep"][0]
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if not single or "SpecialToken" not in single[-1]:
        return SOT_TOKEN, EOT_TOKEN
    first = single[0].get("SpecialToken", {}).get("id")
    return first, single[-1]["SpecialToken"]["id"]


def _token_name(value) -> str | None:
    """A special token in a tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_hf_config(directory: Path) -> dict:
    """Special tokens, model_max_length, padding side and class from a Hugging Face tokenizer folder; {}
    when it has no tokenizer_config.json / special_tokens_map.json. special_tokens_map.json wins, as in
    transformers."""
    out: dict = {}
    for name in (HF_TOKENIZER_CONFIG, HF_SPECIAL_TOKENS_MAP):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token"):
            if key in data:
                out[key] = _token_name(data[key])
        length = data.get("model_max_length")
        if isinstance(length, int) and 2 <= length < 1_000_000:  # transformers writes 1e30 for "no limit"
            out["model_max_length"] = length
        for key in ("tokenizer_class", "padding_side"):
            if isinstance(data.get(key), str):
                out[key] = data[key]
    return out
