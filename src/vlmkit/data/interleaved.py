"""Interleaved documents: text and images in any order, as Flamingo-style models read them (MMC4, OBELICS).

A document file is JSONL, one document per line, in either of two shapes:

    {"segments": [{"text": "Two scenes."}, {"image": "a.png"}, {"text": "a red circle."}, {"image": "b.png"}, ...]}
    {"texts": ["Two scenes.", null, "a red circle.", null], "images": [null, "a.png", null, "b.png"]}   (OBELICS)

Image paths are relative to the file's folder. Documents also come in WebDataset shards
(vlmkit.data.shards.documents), their images held as `MemberImage`s. A bad line (malformed JSON, a segment that is neither, a
missing image file) is skipped, logged as `skipped FILE:LINE: reason` and counted in `.bad_rows`.

Tokens (`encode_document`): [start] then, in order, one `<image>` per image and each text's tokens; the text
after an image is that image's chunk, closed by `<|endofchunk|>` (before the next image, and at the end).
Labels follow OpenFlamingo: not supervised on `<image>`, on text before the first image, and on padding;
the text of each chunk and its `<|endofchunk|>` are. A document longer than the context is cut after its last
whole chunk that fits (counted); an image with no text after it has nothing to predict and is dropped
(counted, as is a document left with nothing to learn).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmkit.data.chat import collate
from vlmkit.data.manifest import BadRow, _json_rows, read_utf8
from vlmkit.data.transforms import (
    DecodeFailure,
    ImageDecodeError,
    ImageTransform,
    check_image_file,
    decode,
    load_image,
)
from vlmkit.errors import DataError
from vlmkit.losses.captioning import IGNORE_INDEX

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
CHUNK_TOKEN = "<|endofchunk|>"


@dataclass(frozen=True, eq=False)
class MemberImage:
    """An image held in a shard: where it is (`shard.tar:key.0.png`, for messages) and its bytes."""

    where: str
    data: bytes = field(repr=False)


def open_image(image: Path | MemberImage):
    """A document image as RGB PIL: a file, or a shard member decoded from its bytes (ImageDecodeError)."""
    if isinstance(image, MemberImage):
        try:
            return decode(io.BytesIO(image.data))
        except DecodeFailure as e:
            raise ImageDecodeError(image.where, f"{e.reason}: {e.message}") from None
    return load_image(image)


@dataclass
class Document:
    """A document's segments in order: ("text", str) or ("image", Path | MemberImage)."""

    segments: list[tuple[str, str | Path | MemberImage]]
    line: int = 0

    @property
    def images(self) -> list[Path | MemberImage]:
        return [value for kind, value in self.segments if kind == "image"]


class Documents(list):
    """The usable documents of a file plus `bad_rows`, the skipped lines."""

    def __init__(self, docs: list[Document], bad_rows: list[BadRow]):
        super().__init__(docs)
        self.bad_rows = bad_rows


def _segments(item) -> list | str:
    """The raw segment list of either shape, or why there is none."""
    if not isinstance(item, dict):
        return 'expected a JSON object like {"segments": [{"text": ...}, {"image": ...}]}'
    if "segments" in item:
        if not isinstance(item["segments"], list):
            return "'segments' must be a list"
        return item["segments"]
    texts, images = item.get("texts"), item.get("images")
    if isinstance(texts, list) and isinstance(images, list):
        if len(texts) != len(images):
            return f"'texts' and 'images' differ in length ({len(texts)} and {len(images)})"
        return [{"image": im} if im is not None else {"text": t} for t, im in zip(texts, images, strict=True)]
    return "no 'segments' (or OBELICS' 'texts' and 'images' lists)"


def _image_file(root: Path):
    """The image resolver of document files: a path under `root` that exists, or why not."""

    def resolve(name: str) -> Path | str:
        path = root / Path(name.strip()).expanduser()
        try:
            check_image_file(path)
        except ImageDecodeError as e:
            return f"image {path}: {e.reason}"
        return path

    return resolve


def parse_document(
    item, root: Path, line: int = 0, image: Callable[[str], Path | MemberImage | str] | None = None
) -> Document | str:
    """A Document, or the reason the item is unusable. `image` turns a segment's image name into the image
    (or the reason it has none); by default a file path under `root`, checked."""
    resolve = image or _image_file(root)
    raw = _segments(item)
    if isinstance(raw, str):
        return raw
    segments: list[tuple[str, str | Path | MemberImage]] = []
    for i, seg in enumerate(raw):
        if isinstance(seg, dict) and isinstance(seg.get("text"), str) and "image" not in seg:
            if seg["text"].strip():
                segments.append(("text", seg["text"].strip()))
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and "text" not in seg:
            found = resolve(seg["image"])
            if isinstance(found, str):
                return f"segment {i}: {found}"
            segments.append(("image", found))
        else:
            return f'segment {i} must be {{"text": "..."}} or {{"image": "path"}}, not {json.dumps(seg)[:60]}'
    if not any(kind == "image" for kind, _ in segments):
        return "the document has no image"
    return Document(segments, line)


def read_documents(path: str | Path) -> Documents:
    """Every usable document of a JSONL file (see the module docstring); DataError when none is."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"document file not found: {path} (expected JSONL of interleaved documents)")
    docs, bad = [], []
    for lineno, item, reason in _json_rows(read_utf8(path), path):
        doc = parse_document(item, path.parent, lineno) if item is not None else reason
        if isinstance(doc, str):
            bad.append(BadRow(str(path), lineno, doc))
        else:
            docs.append(doc)
    for b in bad:
        log.warning("skipped %s", b)
    if not docs:
        detail = f"{len(bad)} bad lines, first {bad[0]}" if bad else "the file has no documents"
        raise DataError(f"no usable document in {path} ({detail})")
    return Documents(docs, bad)


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    images: list[Path | MemberImage]
    notes: list[str] = field(default_factory=list)  # what was cut or dropped ("truncated", "trailing image")


def encode_document(
    doc: Document,
    tokenizer,
    image_token_id: int,
    chunk_token_id: int,
    max_len: int,
    max_images: int | None = None,
    close_last: bool = True,
) -> Encoded:
    """Token ids, labels and the images (in order) of a document, cut to `max_len` tokens and `max_images`
    images at chunk boundaries. `close_last=False` leaves the last chunk open (a few-shot prompt that ends in
    the query's text, for the model to continue). DataError when not even the first chunk fits."""
    segments = list(doc.segments)
    notes = []
    while close_last and segments and segments[-1][0] == "image":  # nothing to predict after it
        segments.pop()
        notes.append("trailing image")
    ids = [tokenizer.sot_token_id] if tokenizer.sot_token_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    images: list[Path | MemberImage] = []
    ends = []  # token count at each chunk boundary, with the images used so far
    for kind, value in segments:
        if kind == "image":
            if images:
                ids.append(chunk_token_id)
                labels.append(chunk_token_id)
                ends.append((len(ids), len(images)))
            ids.append(image_token_id)
            labels.append(IGNORE_INDEX)
            images.append(value)
        else:
            tokens = tokenizer.encode(value)
            ids += tokens
            labels += tokens if images else [IGNORE_INDEX] * len(tokens)
    if images and close_last:
        ids.append(chunk_token_id)
        labels.append(chunk_token_id)
    ends.append((len(ids), len(images)))
    limit = len(ids) if max_len is None else max_len
    cap = len(images) if max_images is None else max_images
    if len(ids) > limit or len(images) > cap:
        fits = [(n, m) for n, m in ends if n <= limit and m <= cap]
        if not fits or fits[-1][1] == 0:
            raise DataError(
                f"line {doc.line}: the document is {len(ids)} tokens and its first image's text does not fit "
                f"the context of {limit}; shorten it or raise the model's max_seq_len"
            )
        n, m = fits[-1]
        ids, labels, images = ids[:n], labels[:n], images[:m]
        notes.append("truncated")
    return Encoded(ids, labels, images, notes)


class InterleavedDataset(torch.utils.data.Dataset):
    """Encoded documents and their images: item -> (uint8 images (M, 3, S, S), input_ids, labels).

    Documents are encoded up front (so truncations and drops are counted before training); images are
    decoded on use and kept (few-shot episodes reuse images)."""

    def __init__(self, docs: list[Document], transform: ImageTransform, encode):
        self.transform = transform
        self.items: list[Encoded] = []
        self.counts = {"documents": len(docs), "truncated": 0, "trailing_images_dropped": 0, "skipped": 0}
        for doc in docs:
            try:
                enc = encode(doc)
            except DataError as e:
                log.warning("skipped %s", e)
                self.counts["skipped"] += 1
                continue
            self.counts["truncated"] += "truncated" in enc.notes
            self.counts["trailing_images_dropped"] += enc.notes.count("trailing image")
            if not any(label != IGNORE_INDEX for label in enc.labels):
                self.counts["skipped"] += 1
                continue
            self.items.append(enc)
        if not self.items:
            raise DataError(f"no document has anything to learn after encoding ({self.counts})")
        self.cache: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:  # the trainer's hook for per-epoch randomness; none here
        pass

    def image(self, image: Path | MemberImage) -> torch.Tensor:
        if isinstance(image, MemberImage):  # a shard's image belongs to one document: not cached
            return self.transform(open_image(image))
        if image not in self.cache:
            self.cache[image] = self.transform(load_image(image))
        return self.cache[image]

    def __getitem__(self, i: int):
        enc = self.items[i]
        images = torch.stack([self.image(p) for p in enc.images])  # (M, 3, S, S) uint8
        return images, enc.ids, enc.labels


def collate_documents(pad_token_id: int, items: list) -> dict[str, torch.Tensor]:
    """InterleavedDataset items -> input_ids, attention_mask, labels (right-padded), pixel_values (B, M, 3, S, S)
    uint8 with each row's images first and zeros after, and num_media (B,)."""
    batch = collate([(ids, labels) for _, ids, labels in items], pad_token_id)
    M = max(images.shape[0] for images, _, _ in items)
    first = items[0][0]
    pixels = torch.zeros((len(items), M, *first.shape[1:]), dtype=first.dtype)
    for b, (images, _, _) in enumerate(items):
        pixels[b, : images.shape[0]] = images
    batch["pixel_values"] = pixels
    batch["num_media"] = torch.tensor([images.shape[0] for images, _, _ in items])
    return batch
