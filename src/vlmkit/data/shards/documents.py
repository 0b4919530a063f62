"""Interleaved documents (vlmkit.data.interleaved) in WebDataset shards: one sample per document.

    vlmkit data shard-documents --input data/shapes-vqa/train_interleaved.jsonl --out data/doc-shards
    vlmkit train --recipe flamingo-tiny --train-data 'data/doc-shards/{00000..00005}.tar'

A sample is `{key}.json`, the document with each image segment naming its member
(`{"segments": [{"text": "..."}, {"image": "0.png"}, ...]}`), and the images as `{key}.0.png`,
`{key}.1.jpg`, ... (the files' own bytes, not re-encoded), beside the shard writer's `{shard}_stats.json` and
`{shard}.parquet` (one row per document). `read_document_shards` gives the documents back with each image a
`MemberImage`, decoded when a batch uses it. A document whose JSON or image member is missing or broken is
skipped, logged and counted (`SkipStats`), as a bad line of a document file is; a truncated shard keeps the
documents before the cut.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from vlmkit.data.interleaved import Document, Documents, MemberImage, parse_document, read_documents
from vlmkit.data.manifest import BadRow
from vlmkit.data.shards.read import IMAGE_EXTS, SkipStats, _read_shard, expand_shards
from vlmkit.data.shards.write import ShardWriter, _prepare_out_dir
from vlmkit.errors import DataError

log = logging.getLogger(__name__)

DOCUMENT_EXT = "json"


def _is_document_member(ext: str) -> bool:
    """`json`, or an image member `<index>.<image ext>`."""
    index, _, image_ext = ext.partition(".")
    return ext == DOCUMENT_EXT or (index.isdigit() and image_ext.lower() in IMAGE_EXTS)


def write_document_shards(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the usable documents of a document file (bad lines skipped and counted) into shards of
    `shard_size` documents. Returns totals: shards, documents, skipped (bad lines), out."""
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    docs = read_documents(input)
    with ShardWriter(out, shard_size=shard_size) as writer:
        for doc in tqdm(docs, desc="documents", unit="doc", disable=not progress):
            segments, images = [], []
            for kind, value in doc.segments:
                if kind == "text":
                    segments.append({"text": value})
                    continue
                ext = Path(value).suffix.lower().lstrip(".") or "png"
                name = f"{len(images)}.{ext}"
                images.append((name, Path(value).read_bytes()))
                segments.append({"image": name})
            writer.add_members({"segments": segments}, images, source=f"{input}:{doc.line}")
        stats = writer.close()
    return {"shards": len(stats), "documents": len(docs), "skipped": len(docs.bad_rows), "out": str(out)}


def read_document_shards(spec: str | os.PathLike, stats: SkipStats | None = None) -> Documents:
    """Every usable document of the shards `spec` names (a .tar, a brace pattern, a folder of them), in
    order; DataError when none is."""
    stats = stats if stats is not None else SkipStats()
    docs, bad = [], []
    for url in expand_shards(spec):
        for raw in _read_shard(url, _is_document_member):
            where = f"{url}:{getattr(raw, 'key', '')}"
            if not hasattr(raw, "members"):  # a _Skip: the shard is unreadable or truncated
                stats.skip(raw.reason, raw.where, raw.detail)
                bad.append(BadRow(raw.where, 0, f"{raw.reason}: {raw.detail}"))
                continue
            doc = _document(raw.members, where)
            if isinstance(doc, str):
                stats.skip("bad_row", where, doc)
                bad.append(BadRow(where, 0, doc))
            else:
                docs.append(doc)
    if not docs:
        detail = f"{len(bad)} skipped, first {bad[0]}" if bad else "the shards hold no documents"
        raise DataError(f"no usable document in {spec} ({detail})")
    return Documents(docs, bad)


def _document(members: dict[str, bytes], where: str) -> Document | str:
    """The Document of one sample's members (images named by member), or why there is none."""
    if DOCUMENT_EXT not in members:
        return f"no {DOCUMENT_EXT} member"
    try:
        item = json.loads(members[DOCUMENT_EXT].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"malformed {DOCUMENT_EXT} member ({e})"

    def member(name: str) -> MemberImage | str:
        return (
            MemberImage(f"{where}.{name}", members[name])
            if name in members
            else f"image member {name} missing"
        )

    return parse_document(item, Path(), image=member)
