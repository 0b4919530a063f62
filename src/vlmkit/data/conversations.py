"""Conversation files as training data: rows of LLaVA-format conversations with their images, rendered with
a chat template into token ids and labels (see `vlmkit.data.vqa` for the file format)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from vlmkit.data.chat import collate
from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.errors import DataError


def split_files(spec: str | None) -> list[str]:
    """`"a.jsonl::b.jsonl"` -> `["a.jsonl", "b.jsonl"]`."""
    return [s for s in (spec or "").split("::") if s.strip()]


def read_rows(spec: str) -> list[dict]:
    """Every usable row of the "::"-joined conversation files (bad rows are logged and counted there)."""
    from vlmkit.data.vqa import read_conversations

    rows = []
    for file in split_files(spec):
        rows += list(read_conversations(file))
    if not rows:
        raise DataError(f"no conversation files in {spec!r}")
    return rows


class ConversationDataset(torch.utils.data.Dataset):
    """Rendered conversations and their images: item -> (uint8 image (3, S, S), input_ids, labels, is_caption).

    Images are decoded once and kept (many questions share one image); conversations are tokenised on
    first use by `render_row(row) -> (input_ids, labels)`.
    """

    def __init__(self, rows: list[dict], transform: ImageTransform, render_row: Callable):
        self.rows = rows
        self.transform = transform
        self.render_row = render_row
        self.images: dict[Path, torch.Tensor] = {}
        self.rendered: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:  # the trainer's hook for per-epoch randomness; none here
        pass

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = self.images.get(row["image"])
        if image is None:
            image = self.images[row["image"]] = self.transform(load_image(row["image"]))
        if i not in self.rendered:
            self.rendered[i] = self.render_row(row)
        ids, labels = self.rendered[i]
        return image, ids, labels, row.get("type") == "caption"


def collate_conversations(pad_token_id: int, items: list) -> dict[str, torch.Tensor]:
    """ConversationDataset items -> input_ids, attention_mask, labels (right-padded), pixel_values (uint8),
    is_caption."""
    batch = collate([(ids, labels) for _, ids, labels, _ in items], pad_token_id)
    batch["pixel_values"] = torch.stack([it[0] for it in items])  # (B, 3, S, S) uint8
    batch["is_caption"] = torch.tensor([it[3] for it in items])  # (B,)
    return batch
