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
    """Rendered conversations and their images: item -> (uint8 images (k, 3, S, S), input_ids, labels,
    is_caption, frame_index (k,)).

    An image row has k = 1 image (frame_index -1); a video row (`"video"`) has its `num_frames` frames sampled
    uniformly (frame_index 0..k-1). Images and clips are decoded once and kept (many questions share one);
    conversations are tokenised on first use by `render_row(row) -> (input_ids, labels)`. A video that fails
    to decode is a DataError naming its row (check video files with `vlmkit video probe`).
    """

    def __init__(
        self, rows: list[dict], transform: ImageTransform, render_row: Callable, num_frames: int = 8
    ):
        self.rows = rows
        self.transform = transform
        self.render_row = render_row
        self.num_frames = num_frames
        self.images: dict[Path, torch.Tensor] = {}
        self.rendered: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:  # the trainer's hook for per-epoch randomness; none here
        pass

    def _pixels(self, row: dict) -> torch.Tensor:
        key = row.get("video", row.get("image"))
        if key not in self.images:
            if "video" in row:
                from vlmkit.data.video import VideoDecodeError, frames_tensor, read_clip

                try:
                    clip = read_clip(row["video"], self.num_frames)
                except VideoDecodeError as e:
                    raise DataError(f"line {row.get('line', '?')}: {e}") from None
                self.images[key] = frames_tensor(clip.frames, self.transform)  # (k, 3, S, S)
            else:
                self.images[key] = self.transform(load_image(row["image"]))[None]  # (1, 3, S, S)
        return self.images[key]

    def __getitem__(self, i: int):
        row = self.rows[i]
        images = self._pixels(row)
        if i not in self.rendered:
            self.rendered[i] = self.render_row(row)
        ids, labels = self.rendered[i]
        frames = torch.arange(len(images)) if "video" in row else torch.full((len(images),), -1)
        return images, ids, labels, row.get("type") == "caption", frames


def collate_conversations(pad_token_id: int, items: list) -> dict[str, torch.Tensor]:
    """ConversationDataset items -> input_ids, attention_mask, labels (right-padded), pixel_values (uint8, every
    row's images in order), frame_index (one per image), is_caption."""
    batch = collate([(it[1], it[2]) for it in items], pad_token_id)
    batch["pixel_values"] = torch.cat([it[0] for it in items])  # (I, 3, S, S) uint8
    batch["frame_index"] = torch.cat([it[4] for it in items])  # (I,)
    batch["is_caption"] = torch.tensor([it[3] for it in items])  # (B,)
    return batch
