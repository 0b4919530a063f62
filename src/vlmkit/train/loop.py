"""The training loop for dual encoders (CLIP, SigLIP): one process or many under `torchrun`.

    cfg = get_recipe("clip-tiny", train_data="train.jsonl", out="runs/demo")
    train(cfg)

What it does, in order: set up processes, build (or load) the tokenizer, read and check the data,
build the model, optimizer and schedule, resume if asked, loop (autocast, accumulation, clipping,
logging, periodic evaluation, checkpoints, time budget, signals), then save the final model,
evaluate it and write the HTML report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlmkit.config import save_json, to_dict
from vlmkit.data.manifest import ImageTextDataset
from vlmkit.data.shards import (
    SKIP_REASONS,
    ShardStream,
    SkipStats,
    StreamPosition,
    count_samples,
    expand_shards,
    is_shard_spec,
    iter_captions,
    load_pairs,
)
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.losses import create_loss
from vlmkit.models.clip import CLIP
from vlmkit.models.pretrained import save_pretrained
from vlmkit.models.registry import get_model_config
from vlmkit.nn.lora import DEFAULT_TARGETS, has_lora, merged_copy
from vlmkit.runtime import SpeedCheck, check_precision, configure_threads, cpu_info, resolve_precision
from vlmkit.train import distributed as dist
from vlmkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vlmkit.train.optim import WarmupCosine, create_optimizer, create_scheduler

log = logging.getLogger("vlmkit.train")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as train_config.json beside every checkpoint."""

    model: str = "clip-tiny"  # a name from `vlmkit.models.list_models()`
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. {"vision.layers": 6}
    train_data: str = ""  # JSONL/CSV manifest of {"image", "caption"}, or shards (dir/{00000..00127}.tar)
    val_data: str | None = None  # manifest or shards for periodic loss + retrieval evaluation
    zeroshot_data: str | None = None  # ImageFolder for periodic + final zero-shot evaluation
    zeroshot_templates: list[str] | None = None  # templates or template files; None = defaults
    out: str = "runs/clip"
    tokenizer: str | None = None  # an existing tokenizer.json; None = train byte-level BPE on the captions
    vocab_size: int = 4096  # upper bound for a trained tokenizer
    batch_size: int = 128  # global: across processes and accumulation steps
    grad_accum: int = 1
    epochs: float = 30
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    precision: str = "auto"  # "auto" (bf16 where this device runs it fast, else fp32), "bf16" (autocast,
    # fp32 weights) or "fp32"; see vlmkit.runtime
    time_budget: float | None = None  # minutes of training; the schedule is fitted to the budget
    crop_scale: tuple[float, float] = (0.5, 1.0)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 500  # steps
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    max_bad_fraction: float = 0.01
    num_workers: int = 0
    cache_images: bool = True  # decode once and keep (downscaled) in memory; off for data larger than RAM
    shuffle_buffer: int = 1000  # shards: samples in each reader's shuffle buffer
    resampled: bool = False  # shards: every reader draws shards with replacement (infinite) instead of
    # reading its own disjoint share of them
    compile: bool = False
    grad_checkpointing: bool = False
    resume: bool = False
    # Transfer learning (see vlmkit.train.transfer). `init_from` is a model folder (a vlmkit run or a Hugging
    # Face CLIP/SigLIP folder): its config, tokenizer and preprocessing replace model, model_overrides,
    # tokenizer, vocab_size, mean and std.
    init_from: str | None = None
    lock_image: bool = False  # LiT: freeze the image tower and keep it in eval mode
    freeze: list[str] = field(default_factory=list)  # regexes over parameter names: frozen, not optimised
    lr_scale: dict[str, float] = field(default_factory=dict)  # regex -> lr multiplier; 0 freezes
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the weights; merged when saved
    lora_alpha: float | None = None  # LoRA scaling is lora_alpha / lora_rank; None = lora_rank
    lora_targets: str = DEFAULT_TARGETS  # regex over module names of the Linears to adapt
    lora_also_train: list[str] = field(default_factory=list)  # with LoRA: regexes of params that train too

    def __post_init__(self):
        check_precision(self.precision)
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2: contrastive losses need negatives")
        if self.grad_accum < 1:
            raise ConfigError("grad_accum must be >= 1")
        # `--set freeze=REGEX` gives a string, `--set lr_scale.REGEX=0.1` a string factor
        self.freeze = [self.freeze] if isinstance(self.freeze, str) else list(self.freeze)
        if isinstance(self.lora_also_train, str):
            self.lora_also_train = [self.lora_also_train]
        scales = {}
        for pattern, factor in self.lr_scale.items():
            try:
                scales[pattern] = float(factor)
            except (TypeError, ValueError):
                scales[pattern] = -1.0
            if not scales[pattern] >= 0:
                raise ConfigError(f"lr_scale {pattern!r}: the factor must be a number >= 0, not {factor!r}")
        self.lr_scale = scales
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0 (0 = no LoRA), not {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, not {self.lora_alpha!r}")
        if self.lora_also_train and not self.lora_rank:
            raise ConfigError(
                "lora_also_train needs lora_rank > 0; without LoRA everything not frozen trains"
            )


class Trainer:
    """Holds the state of one run; `fit()` trains. Callbacks `fn(trainer)` run after every step."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callable[[Trainer], None]] | None = None):
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.stop_requested = False
        self.step = 0
        self.out = Path(cfg.out)

    # ---------------------------------------------------------------- setup
    def request_stop(self, reason: str = "") -> None:
        """Finish the current step, save a checkpoint and stop (what SIGINT/SIGTERM do)."""
        if reason and dist.is_main():
            log.warning(reason)
        self.stop_requested = True

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.request_stop(
            f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping"
        )

    def setup(self) -> None:
        cfg = self.cfg
        self.info = dist.init_distributed()
        self.device = self.info.device
        world = self.info.world_size
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ConfigError(
                f"batch_size {cfg.batch_size} is not divisible by processes ({world}) x grad_accum ({cfg.grad_accum})"
            )
        self.micro_batch = cfg.batch_size // (world * cfg.grad_accum)
        if not cfg.train_data:
            raise ConfigError(
                "no training data: pass --train-data MANIFEST (JSONL or CSV of image, caption) or SHARDS"
            )
        self.train_urls = None
        if self._shard_data():
            self.train_urls = expand_shards(cfg.train_data)
            num_pairs = count_samples(self.train_urls)  # from the stats files: fail before any work
        torch.manual_seed(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            _setup_file_log(self.out / "train.log")
        self.threads = configure_threads() if self.device.type == "cpu" else torch.get_num_threads()
        self.precision = resolve_precision(cfg.precision, self.device)
        if world > 1:  # a measured choice could differ between processes; all follow rank 0
            self.precision = dist.broadcast_object(self.precision)
        if dist.is_main() and self.device.type == "cpu":
            log.info("%d intra-op threads on %s", self.threads, cpu_info().describe())
        self.resume_from = latest_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and self.resume_from is None and dist.is_main():
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.out / "checkpoints")

        # Model config first: it fixes the image size and context length the data needs.
        overrides = dict(cfg.model_overrides)
        pretrained = self._load_init_from() if cfg.init_from else None
        self.model_name = pretrained.name if pretrained is not None else cfg.model
        if pretrained is not None:
            self.model_cfg = pretrained.model.cfg
            self.preprocess = replace(pretrained.preprocess, crop_scale=tuple(cfg.crop_scale))
        else:
            self.model_cfg = get_model_config(cfg.model, **overrides)
            self.preprocess = PreprocessConfig(
                image_size=self.model_cfg.vision.image_size,
                mean=tuple(cfg.mean),
                std=tuple(cfg.std),
                crop_scale=tuple(cfg.crop_scale),
            )
        # Training images travel as uint8 and are normalised on the device (see _train_step).
        self.train_transform = ImageTransform(self.preprocess, train=True, uint8=True)
        if pretrained is not None:
            self.tokenizer = pretrained.tokenizer  # a pretrained text tower needs its own tokenizer
        else:
            self.tokenizer = self._build_tokenizer()
            self.model_cfg = get_model_config(cfg.model, **self._tokenizer_overrides(), **overrides)

        if self.train_urls is not None:
            self.train_set = None
            self._setup_shard_state()
        else:
            num_pairs = self._build_train_set()
        if num_pairs < cfg.batch_size:
            raise DataError(
                f"{cfg.train_data}: {num_pairs} usable pairs, fewer than one batch ({cfg.batch_size}); "
                "lower --set batch_size=N"
            )
        self.steps_per_epoch = num_pairs // cfg.batch_size
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.val = self._build_val()

        self.model = (pretrained.model if pretrained is not None else self._new_model()).to(self.device)
        del pretrained
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._prepare_transfer()
        self.optimizer = create_optimizer(
            self.model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps, lr_scale=cfg.lr_scale
        )
        self.schedule = WarmupCosine(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        self.scheduler = create_scheduler(self.optimizer, self.schedule)
        self.loss_fn = self._build_loss()
        self.elapsed_before = 0.0
        if self.resume_from is not None:
            state = self._load_checkpoint(self.resume_from)
            self.step = state["step"]
            self.total_steps = state["total_steps"]
            self.schedule.total = self.total_steps
            self.elapsed_before = state.get("elapsed_s", 0.0)
            if self.train_urls is not None:
                self._restore_shard_state(state.get("data"))
            if dist.is_main():
                log.info("resumed from %s at step %d", self.resume_from, self.step)
        self.train_model = self.model
        if cfg.compile:
            # a graph inductor cannot compile (no C++ compiler on this machine, say) runs eagerly, with a
            # warning, instead of ending the run
            torch._dynamo.config.suppress_errors = True
            self.train_model = torch.compile(self.train_model)
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.train_model, device_ids=ids)
        if dist.is_main():
            save_json(self.resolved_config(), self.out / "train_config.json")

    # Hooks: what differs between model families. This class trains dual encoders; a subclass
    # (vlmkit.train.generative) overrides these for captioning / VQA models.
    def _tokenizer_overrides(self) -> dict[str, Any]:
        """Model-config keys that come from the tokenizer."""
        tok = self.tokenizer
        return {
            "text.vocab_size": tok.vocab_size,
            "text.eot_token_id": tok.eot_token_id,
            "text.pad_token_id": tok.pad_token_id,
        }

    def _shard_data(self) -> bool:
        """Whether train_data names WebDataset shards (else a manifest)."""
        return is_shard_spec(self.cfg.train_data)

    def _context_length(self) -> int:
        return self.model_cfg.text.context_length

    def _training_texts(self) -> list[str]:
        """The texts a new tokenizer is trained on."""
        if self.train_urls is not None:
            return list(iter_captions(self.train_urls))
        from vlmkit.data.manifest import read_manifest

        return [s.caption for s in read_manifest(self.cfg.train_data)[0]]

    def _new_tokenizer(self, texts: list[str]) -> Tokenizer:
        return Tokenizer.train(texts, vocab_size=self.cfg.vocab_size, context_length=self._context_length())

    def _build_train_set(self) -> int:
        """The in-memory training set (manifest data); returns its number of samples."""
        cfg = self.cfg
        self.train_set = ImageTextDataset(
            cfg.train_data,
            self.train_transform,
            max_bad_fraction=cfg.max_bad_fraction,
            seed=cfg.seed,
            log=log,
            cache_images=cfg.cache_images,
            cache_short_side=2 * self.preprocess.image_size,
        )
        return len(self.train_set)

    def _new_model(self) -> torch.nn.Module:
        return CLIP(self.model_cfg)

    def _build_loss(self):
        return create_loss(self.model_cfg.loss)

    def _micro_step_loss(self, batch) -> torch.Tensor:
        """The loss of one micro-batch from the loader (forward under autocast)."""
        images, tokens = batch
        # uint8 from the loader (a quarter of the bytes to ship), normalised here on the device
        images = self.train_transform.normalize(images.to(self.device, non_blocking=True))
        tokens = tokens.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.train_model(images, tokens)
        return self.loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)

    def _load_init_from(self):
        """The `init_from` model folder, loaded (vlmkit run or Hugging Face folder) on this process's device."""
        from vlmkit.models.pretrained import load_pretrained

        cfg = self.cfg
        if cfg.tokenizer:
            raise ConfigError(
                f"tokenizer and init_from are both set; a model from {cfg.init_from} keeps its own tokenizer: "
                "drop --tokenizer"
            )
        pretrained = load_pretrained(cfg.init_from, self.device)
        if pretrained.tokenizer is None:
            raise ConfigError(
                f"{cfg.init_from} has no tokenizer.json; fine-tuning the text tower needs the tokenizer it was "
                "trained with"
            )
        if dist.is_main():
            log.info(
                "init_from %s: model config, tokenizer and preprocessing come from it "
                "(model=%r, model_overrides=%r, vocab_size, mean and std are ignored)",
                cfg.init_from,
                cfg.model,
                cfg.model_overrides,
            )
        return pretrained

    def _prepare_transfer(self) -> None:
        """Freeze (`freeze`, `lock_image`) and add LoRA adapters as the config says; log what trains."""
        from vlmkit.train.transfer import prepare_model

        cfg = self.cfg
        self.transfer = prepare_model(
            self.model,
            freeze=cfg.freeze,
            lock_image=cfg.lock_image,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_targets=cfg.lora_targets,
            lora_also_train=cfg.lora_also_train,
        )
        t = self.transfer
        if dist.is_main() and t.trainable < t.total:
            log.info(
                "training %d of %d parameters (%.2f%%)%s",
                t.trainable,
                t.total,
                100 * t.trainable / t.total,
                f"; LoRA rank {cfg.lora_rank} on {len(t.lora)} Linears" if t.lora else "",
            )

    def _train_mode(self) -> None:
        """Training mode, except a locked image tower (LiT), which stays in eval mode."""
        self.model.train()
        if self.cfg.lock_image:
            self.model.visual.eval()

    def _plain_model(self) -> torch.nn.Module:
        """The model to save: LoRA adapters merged into plain weights (the run itself keeps them)."""
        return merged_copy(self.model) if has_lora(self.model) else self.model

    def _load_checkpoint(self, ckpt: Path) -> dict:
        if not has_lora(self.model):
            return load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        from vlmkit.train.transfer import LORA_FILE, restore_lora

        # model.safetensors holds merged weights: read them into a plain copy, then put the adapters
        # (lora.safetensors) back on the base weights this run starts from (init_from, or the seeded init).
        plain = merged_copy(self.model)
        state = load_checkpoint(ckpt, plain, self.optimizer, self.scheduler)
        restore_lora(self.model, plain.state_dict(), ckpt / LORA_FILE)
        return state

    def resolved_config(self) -> dict:
        return {
            "train": to_dict(self.cfg),
            "model": to_dict(self.model_cfg),
            "preprocess": self.preprocess.to_dict(),
            "precision": self.precision.to_dict(),
        }

    def _build_tokenizer(self) -> Tokenizer:
        cfg, ctx = self.cfg, self._context_length()
        saved = self.out / "tokenizer.json"
        if cfg.tokenizer:
            if not Path(cfg.tokenizer).is_file():
                raise ConfigError(f"tokenizer file not found: {cfg.tokenizer}")
            return Tokenizer.from_file(cfg.tokenizer, context_length=ctx)
        if saved.is_file() and (cfg.resume or not dist.is_main()):
            return Tokenizer.from_file(saved, context_length=ctx)
        if dist.is_main():
            captions = self._training_texts()
            if not captions:
                raise DataError(f"no usable rows in {cfg.train_data}")
            self._new_tokenizer(captions).save(saved)
        dist.barrier()
        return Tokenizer.from_file(saved, context_length=ctx)

    def _build_val(self) -> dict | None:
        """Validation images and captions, preprocessed once and kept in memory."""
        cfg, val = self.cfg, {}
        eval_tf = ImageTransform(self.preprocess, train=False)
        if cfg.val_data:
            if is_shard_spec(cfg.val_data):
                images, captions, paths = load_pairs(cfg.val_data, eval_tf, SkipStats(log=log))
            else:
                ds = ImageTextDataset(cfg.val_data, eval_tf, max_bad_fraction=cfg.max_bad_fraction, log=log)
                images = [ds[i][0] for i in range(len(ds))]
                captions, paths = ds.captions, [str(p) for p in ds.image_paths]
            val["images"] = torch.stack(images)
            val["tokens"] = self.tokenizer(captions)
            # Rows that share an image path (shard samples that share a source) are one image with
            # several captions.
            first_row: dict[str, int] = {}
            for row, p in enumerate(paths):
                first_row.setdefault(p, row)
            index = {p: i for i, p in enumerate(first_row)}
            val["image_rows"] = torch.tensor(list(first_row.values()))
            val["text_to_image"] = torch.tensor([index[p] for p in paths])
        if cfg.zeroshot_data:
            from vlmkit.data.manifest import read_image_folder
            from vlmkit.data.transforms import load_image
            from vlmkit.eval.templates import load_templates

            paths, labels, classnames = read_image_folder(cfg.zeroshot_data)
            val["zs_images"] = torch.stack([eval_tf(load_image(p)) for p in paths])
            val["zs_labels"] = torch.tensor(labels)
            val["zs_classnames"] = classnames
            val["zs_templates"] = load_templates(cfg.zeroshot_templates)
        return val or None

    # ---------------------------------------------------------------- data
    def _batches(self, epoch: int, start: int):
        """This process's micro-batches of `epoch`, from global batch `start` on (for exact resumes)."""
        if self.train_urls is not None:
            return self._shard_batches(epoch, start)
        cfg, world, rank = self.cfg, self.info.world_size, self.info.rank
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        self.train_set.set_epoch(epoch)
        order = []
        for b in range(start, self.steps_per_epoch):
            batch = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            for m in range(cfg.grad_accum):
                chunk = m * world + rank
                order.append(batch[chunk * self.micro_batch : (chunk + 1) * self.micro_batch])
        return DataLoader(
            self.train_set,
            batch_sampler=order,
            collate_fn=self._collate_fn(),
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _collate_fn(self) -> Callable[[list], Any]:
        """Items -> a micro-batch; a plain function of picklable state, for DataLoader workers."""
        return functools.partial(_collate_pairs, self.tokenizer)

    # ---------------------------------------------------------------- shard data
    def _setup_shard_state(self) -> None:
        cfg, world = self.cfg, self.info.world_size
        self.num_workers = cfg.num_workers
        per_rank = len(self.train_urls) // world  # the smallest share of shards a process gets
        if not cfg.resampled and 0 < per_rank < cfg.num_workers:
            self.num_workers = per_rank
            if dist.is_main():
                log.warning(
                    "%d shards per process: using %d DataLoader workers instead of %d "
                    "(each worker reads its own shards)",
                    per_rank,
                    per_rank,
                    cfg.num_workers,
                )
        self.skipped_before = Counter()  # this process's skips before the current epoch's stream
        self.stream_epoch = -1
        self.stream_workers: dict[int, tuple[int, tuple[int, ...]]] = {}  # worker -> (consumed, skips)
        self.resume_position: tuple[int, StreamPosition] | None = None

    def _restore_shard_state(self, data: dict | None) -> None:
        """Take this process's data position and skip counts from a checkpoint's trainer state."""
        rank, workers = self.info.rank, max(1, self.num_workers)
        epoch, start = divmod(self.step, self.steps_per_epoch)
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

    def _shard_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg, workers = self.cfg, max(1, self.num_workers)
        self.skipped_before += self._stream_skips()  # close the previous epoch's stream
        position = None
        if start:
            if self.resume_position is not None and self.resume_position[0] == epoch:
                position = self.resume_position[1]
            else:  # no exact position: skip about as many samples as were used
                used = start * cfg.grad_accum * self.micro_batch // workers
                position = StreamPosition([used] * workers)
        self.resume_position = None
        self.stream_epoch = epoch
        self.stream_workers = (
            {w: (c, (0,) * len(SKIP_REASONS)) for w, c in enumerate(position.consumed)} if position else {}
        )
        stream = ShardStream(
            self.train_urls,
            self.train_transform,
            seed=cfg.seed,
            epoch=epoch,
            rank=self.info.rank,
            world_size=self.info.world_size,
            shuffle_buffer=cfg.shuffle_buffer,
            repeat=True,
            resampled=cfg.resampled,
            position=position,
            track_position=True,
            log=log,
        )
        tokenizer = self.tokenizer

        def collate(items):
            images = torch.stack([it[0] for it in items])  # (B, 3, H, W)
            return images, tokenizer([it[1] for it in items]), items[-1][2]  # (B, T), position

        loader = DataLoader(
            stream,
            batch_size=self.micro_batch,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

        def batches():
            for images, tokens, (worker, consumed, skips) in loader:
                self.stream_workers[worker] = (consumed, skips)
                yield images, tokens
            raise DataError(
                f"the shards of process {self.info.rank} gave no usable samples at all "
                f"(skipped: {dict(self._skip_counts())}); see train.log"
            )

        return batches()

    def _stream_skips(self) -> Counter:
        """Skips counted by the current epoch's stream (each worker's latest count)."""
        total = Counter()
        for _, skips in self.stream_workers.values():
            total.update(dict(zip(SKIP_REASONS, skips)))
        return total

    def _skip_counts(self) -> Counter:
        """This process's skipped samples so far, by reason."""
        return self.skipped_before + self._stream_skips()

    def _gather(self, values: list[int]) -> list[list[int]]:
        """Each process's `values` (as long on every process), on every process: a collective."""
        world = self.info.world_size
        if world == 1:
            return [list(values)]
        full = torch.zeros(world, len(values), dtype=torch.float64, device=self.device)  # exact < 2**53
        full[self.info.rank] = torch.tensor(values, dtype=torch.float64, device=self.device)
        full = dist.all_reduce_mean(full) * world
        return full.round().long().cpu().tolist()

    def _data_state(self) -> dict:
        """Every process's data position and skip counts, for the checkpoint (a collective)."""
        workers = max(1, self.num_workers)
        skips = self._skip_counts()
        return {
            "epoch": self.stream_epoch,
            "world_size": self.info.world_size,
            "num_workers": workers,
            "consumed": self._gather([self.stream_workers.get(w, (0,))[0] for w in range(workers)]),
            "skipped": self._gather([skips[r] for r in SKIP_REASONS]),
        }

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, retrieval recall and zero-shot accuracy on the in-memory validation data."""
        if not self.val or not dist.is_main():
            return {}
        from vlmkit.eval.retrieval import retrieval_metrics
        from vlmkit.eval.zeroshot import build_zeroshot_classifier

        model, metrics = self.model, {}
        was_training = model.training
        model.eval()
        with self.autocast():
            if "images" in self.val:
                img = _encode(model.encode_image, self.val["images"][self.val["image_rows"]], self.device)
                txt = _encode(model.encode_text, self.val["tokens"], self.device)
                r = retrieval_metrics(img, txt, self.val["text_to_image"], ks=(1, 5))
                metrics["val/image_retrieval_recall@1"] = r["image_retrieval_recall@1"]
                metrics["val/text_retrieval_recall@1"] = r["text_retrieval_recall@1"]
                metrics["val/text_retrieval_recall@5"] = r["text_retrieval_recall@5"]
            if "zs_images" in self.val:
                clf = build_zeroshot_classifier(
                    model,
                    self.tokenizer,
                    self.val["zs_classnames"],
                    self.val["zs_templates"],
                    device=self.device,
                    bf16=self.precision.bf16,
                )
                feats = _encode(model.encode_image, self.val["zs_images"], self.device)
                pred = (feats @ clf.to(feats.dtype)).argmax(dim=1)  # both on the CPU
                metrics["val/zeroshot_acc1"] = (pred.cpu() == self.val["zs_labels"]).float().mean().item()
        if was_training:
            self._train_mode()
        return metrics

    def autocast(self):
        return self.precision.autocast(self.device)

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train until the step budget, the time budget or a signal; then save, evaluate, report."""
        self.setup()
        cfg, main = self.cfg, dist.is_main()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.t0 = time.perf_counter()
        self.metrics_file = open(self.out / "metrics.jsonl", "a") if main else None
        self.tensorboard = _tensorboard_writer(self.out) if main else None
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not main, dynamic_ncols=True, desc="train"
        )
        step_times: list[float] = []
        last_saved = self.step
        # about CPU cores shared with other processes: not judged on GPUs, where the host CPU mostly waits
        speed = SpeedCheck(
            self.threads,
            peak_gflops=self.precision.peak_gflops,
            workers=cfg.num_workers,
            done=self.device.type != "cpu",
        )
        try:
            self._train_mode()
            while self.step < self.total_steps and not self.stop_requested:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                loader = iter(self._batches(epoch, start))
                for _ in range(start, self.steps_per_epoch):
                    t_step = time.perf_counter()
                    with self._count_flops(speed, first=not step_times):
                        loss = self._train_step(loader)
                    self.step += 1
                    step_times.append(time.perf_counter() - t_step)
                    lr = self.scheduler.get_last_lr()[0]
                    pairs_s = cfg.batch_size / step_times[-1]
                    self._maybe_fit_budget(step_times)
                    busy = speed.update(len(step_times), step_times[-1], cfg.batch_size)
                    if busy and main:
                        if cfg.time_budget:
                            busy += f" The time budget now fits {self.total_steps} steps."
                        log.warning(busy)
                        bar.write(f"warning: {busy}")
                        bar.set_description("train (machine busy, see above)")
                    if main:
                        bar.total = self.total_steps
                        bar.set_postfix(
                            loss=f"{loss:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs_s:.0f}", refresh=False
                        )
                        bar.update(1)
                        if self.step % cfg.log_every == 0 or self.step == 1:
                            self.log_metrics(
                                {
                                    "epoch": self.step / self.steps_per_epoch,
                                    "train/loss": loss,
                                    "train/lr": lr,
                                    "train/pairs_per_s": pairs_s,
                                }
                            )
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.log_metrics(self.evaluate())
                    for cb in self.callbacks:
                        cb(self)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                        last_saved = self.step
                    if self._should_stop():
                        break
            bar.close()
            if self.step != last_saved:
                self.save()
        except BaseException:
            bar.close()
            # Keep the progress made: the model is between steps unless the optimizer itself failed.
            if self.step > last_saved and not getattr(self, "_in_update", False):
                try:
                    self.save()
                    if main:
                        log.error(
                            "training failed at step %d; progress saved, continue with --resume", self.step
                        )
                except Exception:  # the save itself failed; surface the original error
                    pass
            raise
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return self.finish()

    @contextlib.contextmanager
    def _count_flops(self, speed: SpeedCheck, first: bool):
        """Counts the first step's matmul FLOPs (forward and backward) for the busy-machine check, when that
        check runs (CPUs only) and not under torch.compile (the first step compiles)."""
        if not first or speed.done or self.cfg.compile:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            yield
        speed.flops_per_step = counter.get_total_flops()

    def _train_step(self, loader) -> float:
        cfg, total = self.cfg, 0.0
        for micro in range(cfg.grad_accum):
            batch = next(loader)
            sync = micro == cfg.grad_accum - 1 or not isinstance(self.train_model, DDP)
            ctx = self.train_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss = self._micro_step_loss(batch)
                if not torch.isfinite(loss):
                    raise VlmkitError(
                        f"loss is {loss.item()} at step {self.step + 1}; lower the learning rate (--set lr=...) "
                        "and continue with --resume from the last checkpoint"
                    )
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self._in_update = True
        self.optimizer.step()
        self.scheduler.step()
        self._in_update = False
        self.optimizer.zero_grad(set_to_none=True)
        if self.info.world_size > 1:
            total = dist.all_reduce_mean(torch.tensor(total, device=self.device)).item()
        return total

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _maybe_fit_budget(self, step_times: list[float]) -> None:
        """Fit the cosine schedule to the steps that the time budget leaves (re-estimated as it goes)."""
        budget = self.cfg.time_budget
        if not budget or len(step_times) < 3 or (len(step_times) > 3 and self.step % 10):
            return  # first estimate after 3 steps, then every 10
        per_step = float(np.median(step_times[-50:]))
        left = budget * 60 - self.elapsed()
        fit = self.step + max(1, int(left / per_step * 0.98))
        configured = self.cfg.max_steps or math.ceil(self.cfg.epochs * self.steps_per_epoch)
        total = torch.tensor(float(min(configured, fit)))
        if self.info.world_size > 1:  # every process must follow rank 0's estimate
            total = dist.broadcast_object(total)
        self.total_steps = max(self.step + 1, int(total))
        self.schedule.total = self.total_steps

    def _should_stop(self) -> bool:
        if self.step >= self.total_steps:
            return True
        stop = self.stop_requested
        if self.cfg.time_budget and self.elapsed() >= self.cfg.time_budget * 60:
            stop = True
        if self.info.world_size > 1:  # stop together, or the others would wait forever in all-reduce
            stop = bool(dist.broadcast_object(stop))
        if stop and self.cfg.time_budget and not self.stop_requested and dist.is_main():
            log.info("time budget of %.1f min reached at step %d", self.cfg.time_budget, self.step)
        self.stop_requested = self.stop_requested or stop
        return stop

    def log_metrics(self, metrics: dict) -> None:
        if not metrics or self.metrics_file is None:
            return
        row = {"step": self.step, "time_s": round(self.elapsed(), 2), **metrics}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, self.step)
        if any(k.startswith("val/") for k in metrics):
            log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def trainer_state(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "elapsed_s": self.elapsed(),
            "epoch": self.step // self.steps_per_epoch,
        }

    def save(self) -> None:
        state = self.trainer_state()
        if self.train_urls is not None:
            state["data"] = self._data_state()  # every process takes part
        if dist.is_main():
            path = save_checkpoint(
                self.out,
                self.step,
                self._plain_model(),
                self.optimizer,
                self.scheduler,
                state,
                self.resolved_config(),
                tokenizer=self.tokenizer,
                preprocess=self.preprocess,
                keep_last=self.cfg.keep_last,
                model_name=self.model_name,
            )
            if has_lora(self.model):  # the unmerged adapters, for --resume
                from vlmkit.train.transfer import save_lora

                save_lora(self.model, path)
        dist.barrier()

    def finish(self) -> dict:
        """Save the final model to the run folder, evaluate it, write the report."""
        results: dict = {"step": self.step, "stopped_early": self.step < self.total_steps}
        if self.train_urls is not None:
            skips = self._skip_counts()
            totals = np.sum(self._gather([skips[r] for r in SKIP_REASONS]), axis=0).tolist()
            results["data_skipped"] = {r: n for r, n in zip(SKIP_REASONS, totals) if n}
            if dist.is_main() and results["data_skipped"]:
                log.info("samples skipped during training: %s", results["data_skipped"])
        if dist.is_main():
            save_pretrained(
                self._plain_model(), self.out, self.tokenizer, self.preprocess, name=self.model_name
            )
            final = self.evaluate()
            self.log_metrics(final)
            results.update(final)
            self.metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.run_final_evals()
            from vlmkit.eval.report import write_report

            results["report"] = str(write_report(self.out))
            save_json(results, self.out / "summary.json")
        dist.barrier()
        dist.cleanup()
        return results

    def run_final_evals(self) -> None:
        """CLIP_benchmark-style JSON results (and plots) in <run>/eval/."""
        from vlmkit.eval.features import save_results
        from vlmkit.eval.retrieval import evaluate_retrieval
        from vlmkit.eval.zeroshot import evaluate_zeroshot

        cfg, ev = self.cfg, self.out / "eval"
        ev.mkdir(exist_ok=True)
        self.model.eval()
        common = dict(device=self.device, model_name=str(self.out), bf16=self.precision.bf16)
        if cfg.val_data:
            r = evaluate_retrieval(
                self.model, self.tokenizer, self.preprocess, cfg.val_data, out_dir=ev, **common
            )
            save_results(r, ev / "retrieval.json")
        if cfg.zeroshot_data:
            r = evaluate_zeroshot(
                self.model,
                self.tokenizer,
                self.preprocess,
                cfg.zeroshot_data,
                templates=self.val["zs_templates"],
                out_dir=ev,
                **common,
            )
            save_results(r, ev / "zeroshot.json")


def _collate_pairs(tokenizer: Tokenizer, items: list) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])  # (B, 3, H, W)
    return images, tokenizer([it[1] for it in items])  # (B, T)


def _encode(fn, x: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    out = [
        torch.nn.functional.normalize(fn(x[i : i + batch].to(device)).float(), dim=-1)
        for i in range(0, len(x), batch)
    ]
    return torch.cat(out).cpu()


def _tensorboard_writer(out: Path):
    """A TensorBoard writer in <run>/tensorboard when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _setup_file_log(path: Path) -> None:
    """Everything the trainer logs (skipped rows, evaluations) also goes to <run>/train.log.

    A later run in the same process (the demos train several) takes over: earlier runs' logs are closed.
    """
    logger = logging.getLogger("vlmkit")
    target = str(path.resolve())
    for h in list(logger.handlers):
        if getattr(h, "vlmkit_run_log", False) and h.baseFilename != target:
            logger.removeHandler(h)
            h.close()
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.vlmkit_run_log = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train(cfg: TrainConfig, callbacks: list[Callable[[Trainer], None]] | None = None) -> dict:
    """Train a dual encoder as `cfg` says; returns a summary (final step, validation metrics, report path)."""
    return Trainer(cfg, callbacks).fit()
