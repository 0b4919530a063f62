"""Training batches from WebDataset shards, with the position in the stream kept for exact resumes.

Each process reads its own share of the shards (or draws them with replacement, `resampled`); each
DataLoader worker reports how many samples of its shards it has consumed and skipped. A checkpoint holds
every process's positions (`state()`, a collective), and a resumed run with the same processes and
workers continues each stream where it stopped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlmkit import distributed as dist
from vlmkit.data.shards import SKIP_REASONS, ShardStream, StreamPosition
from vlmkit.errors import DataError

log = logging.getLogger("vlmkit.train")


class ShardFeed:
    def __init__(self, urls: list[str], cfg, info: dist.DistInfo, transform, device: torch.device):
        self.urls, self.cfg, self.info, self.transform, self.device = urls, cfg, info, transform, device
        world = info.world_size
        self.num_workers = cfg.data.num_workers
        per_rank = len(urls) // world  # the smallest share of shards a process gets
        if not cfg.data.resampled and 0 < per_rank < cfg.data.num_workers:
            self.num_workers = per_rank
            if dist.is_main():
                log.warning(
                    "%d shards per process: using %d DataLoader workers instead of %d "
                    "(each worker reads its own shards)",
                    per_rank,
                    per_rank,
                    cfg.data.num_workers,
                )
        self.skipped_before = Counter()  # this process's skips before the current epoch's stream
        self.stream_epoch = -1
        self.stream_workers: dict[int, tuple[int, tuple[int, ...]]] = {}  # worker -> (consumed, skips)
        self.resume_position: tuple[int, StreamPosition] | None = None

    def restore(self, data: dict | None, step: int, steps_per_epoch: int) -> None:
        """Take this process's data position and skip counts from a checkpoint's trainer state."""
        rank, workers = self.info.rank, max(1, self.num_workers)
        epoch, start = divmod(step, steps_per_epoch)
        if data is None:
            return
        self.skipped_before = Counter(dict(zip(SKIP_REASONS, data["skipped"][rank])))
        same = data["world_size"] == self.info.world_size and data["num_workers"] == workers
        if start and data["epoch"] == epoch and same:
            next_worker = start * self.cfg.grad_accum % workers
            self.resume_position = (epoch, StreamPosition(list(data["consumed"][rank]), next_worker))
        elif start and dist.is_main():
            log.warning(
                "the checkpoint's data position is for %d processes x %d workers, this run has %d x %d: "
                "resuming at about the same place in the epoch, not exactly",
                data["world_size"],
                data["num_workers"],
                self.info.world_size,
                workers,
            )

    def batches(self, epoch: int, start: int, micro_batch: int, collate: Callable[[list], Any]) -> Iterator:
        """This process's micro-batches of `epoch` from global batch `start` on (endless: the stream repeats)."""
        cfg, workers = self.cfg, max(1, self.num_workers)
        self.skipped_before += self._stream_skips()  # close the previous epoch's stream
        position = None
        if start:
            if self.resume_position is not None and self.resume_position[0] == epoch:
                position = self.resume_position[1]
            else:  # no exact position: skip about as many samples as were used
                used = start * cfg.grad_accum * micro_batch // workers
                position = StreamPosition([used] * workers)
        self.resume_position = None
        self.stream_epoch = epoch
        self.stream_workers = (
            {w: (c, (0,) * len(SKIP_REASONS)) for w, c in enumerate(position.consumed)} if position else {}
        )
        stream = ShardStream(
            self.urls,
            self.transform,
            seed=cfg.seed,
            epoch=epoch,
            rank=self.info.rank,
            world_size=self.info.world_size,
            shuffle_buffer=cfg.data.shuffle_buffer,
            repeat=True,
            resampled=cfg.data.resampled,
            position=position,
            track_position=True,
            log=log,
        )
        loader = DataLoader(
            stream,
            batch_size=micro_batch,
            collate_fn=_PositionCollate(collate),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

        def batches():
            for batch, (worker, consumed, skips) in loader:
                self.stream_workers[worker] = (consumed, skips)
                yield batch
            raise DataError(
                f"the shards of process {self.info.rank} gave no usable samples at all "
                f"(skipped: {dict(self.skip_counts())}); see train.log"
            )

        return batches()

    def _stream_skips(self) -> Counter:
        """Skips counted by the current epoch's stream (each worker's latest count)."""
        total = Counter()
        for _, skips in self.stream_workers.values():
            total.update(dict(zip(SKIP_REASONS, skips)))
        return total

    def skip_counts(self) -> Counter:
        """This process's skipped samples so far, by reason."""
        return self.skipped_before + self._stream_skips()

    def total_skips(self) -> dict[str, int]:
        """Samples skipped by all processes, by reason (a collective)."""
        skips = self.skip_counts()
        totals = np.sum(
            gather_ints([skips[r] for r in SKIP_REASONS], self.info, self.device), axis=0
        ).tolist()
        return {r: n for r, n in zip(SKIP_REASONS, totals) if n}

    def state(self) -> dict:
        """Every process's data position and skip counts, for the checkpoint (a collective)."""
        workers = max(1, self.num_workers)
        skips = self.skip_counts()
        consumed = [self.stream_workers.get(w, (0,))[0] for w in range(workers)]
        return {
            "epoch": self.stream_epoch,
            "world_size": self.info.world_size,
            "num_workers": workers,
            "consumed": gather_ints(consumed, self.info, self.device),
            "skipped": gather_ints([skips[r] for r in SKIP_REASONS], self.info, self.device),
        }


class _PositionCollate:
    """The task's collate over (image, caption) plus the stream position of the batch's last sample."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list):
        return self.collate([it[:2] for it in items]), items[-1][2]


def gather_ints(values: list[int], info: dist.DistInfo, device: torch.device) -> list[list[int]]:
    """Each process's `values` (as long on every process), on every process: a collective."""
    world = info.world_size
    if world == 1:
        return [list(values)]
    full = torch.zeros(world, len(values), dtype=torch.float64, device=device)  # exact < 2**53
    full[info.rank] = torch.tensor(values, dtype=torch.float64, device=device)
    full = dist.all_reduce_mean(full) * world
    return full.round().long().cpu().tolist()
