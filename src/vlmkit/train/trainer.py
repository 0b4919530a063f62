"""The one training loop, for every model family: one process or many under `torchrun`.

(Over 500 lines: it is the one Trainer; what differs between families lives in `vlmkit.tasks`, shard
streaming in shard_feed.py, stages in stages.py, parallelism in parallelize.py.)

    cfg = get_recipe("clip-tiny", train_data="train.jsonl", out="runs/demo")
    Trainer(cfg).fit()          # or vlmkit.train.train(cfg), which also runs multi-stage recipes

The model's family names a task (`vlmkit.tasks`) that supplies what differs between kinds of training:
the model, its data and collate, the losses of a micro-batch and the evaluation. The Trainer does the rest,
in order: set up processes, build (or load) the tokenizer, read and check the data, build the model,
optimizer and schedule, resume if asked, parallelize (compile, activation checkpointing, DDP or FSDP2),
loop (autocast, accumulation, clipping, logging of every named loss, periodic evaluation, checkpoints, time
budget, signals), then save the final model, evaluate it and write the HTML report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlmkit import distributed as dist
from vlmkit.config import override, save_json, to_dict
from vlmkit.data.shards import count_samples, expand_shards, is_shard_spec
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.models.pretrained import save_pretrained
from vlmkit.models.registry import get_model_config, task_name
from vlmkit.nn.lora import has_lora, merged_copy
from vlmkit.runtime import SpeedCheck, configure_threads, cpu_info, resolve_precision
from vlmkit.tasks import task_class
from vlmkit.train.checkpoint import (
    checkpoint_dirs,
    full_model_state,
    latest_checkpoint,
    load_checkpoint,
    prepare_checkpoint,
    save_checkpoint,
    save_rng,
    save_sharded,
)
from vlmkit.train.config import TrainConfig
from vlmkit.train.optim import WarmupCosine, create_optimizer, create_scheduler
from vlmkit.train.parallelize import TaskModule, parallelize
from vlmkit.train.shard_feed import ShardFeed

log = logging.getLogger("vlmkit.train")


def group_weights(groups: list[tuple[str, ...]], columns: list[str]) -> torch.Tensor:
    """Row weights N / (|G| n_g) that make every group equally likely (a group-balanced sampler)."""
    counts = Counter(groups)
    if dist.is_main():
        small, large = min(counts.values()), max(counts.values())
        log.info(
            "group-balanced sampling over %d groups of (%s): %d to %d rows each",
            len(counts), ", ".join(columns), small, large,
        )  # fmt: skip
    return torch.tensor([len(groups) / (len(counts) * counts[g]) for g in groups], dtype=torch.double)


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

        # The task, from the model's family: a pretrained model's config, or the registry's row for the name.
        pretrained = self._load_init_from() if cfg.transfer.init_from else None
        name = cfg.task.name or (
            task_name(pretrained.model.cfg) if pretrained is not None else cfg.task_name()
        )
        self.task = task_class(name)(self)
        self.task.configure()  # may replace self.cfg
        if self.cfg.transfer.text_init_from and not self.task.reads_text_init_from:
            raise ConfigError(
                f"text_init_from is for flow models; the {self.task.name} task does not read it"
            )
        cfg = self.cfg
        if not cfg.data.train:
            raise ConfigError(
                "no training data: pass --train-data MANIFEST (JSONL or CSV of image, caption) or SHARDS"
            )
        self.train_urls = None
        if self.task.shards and is_shard_spec(cfg.data.train):
            self.train_urls = expand_shards(cfg.data.train)
            num_samples = count_samples(self.train_urls)  # from the stats files: fail before any work

        # Model config first: it fixes the image size and context length the data needs.
        overrides = dict(cfg.model.overrides)
        self.model_name = pretrained.name if pretrained is not None else cfg.model.name
        if pretrained is not None:
            self.model_cfg = pretrained.model.cfg
            self.preprocess = replace(pretrained.preprocess, crop_scale=tuple(cfg.data.crop_scale))
        else:
            self.model_cfg = get_model_config(cfg.model.name, **overrides)
            self.preprocess = PreprocessConfig(
                image_size=getattr(self.model_cfg, "vision", self.model_cfg).image_size,
                mean=tuple(cfg.model.mean),
                std=tuple(cfg.model.std),
                crop_scale=tuple(cfg.data.crop_scale),
            )
        # Training images travel as uint8 and are normalised on the device (see the tasks' losses).
        self.train_transform = ImageTransform(self.preprocess, train=self.task.augment, uint8=True)
        if pretrained is not None:
            self.tokenizer = pretrained.tokenizer  # a pretrained text tower needs its own tokenizer
        else:
            self.tokenizer = self._build_tokenizer()
            from_tokenizer = self.task.tokenizer_overrides(self.tokenizer, self.model_cfg)
            self.model_cfg = get_model_config(cfg.model.name, **from_tokenizer, **overrides)

        self.sample_weights = None
        if self.train_urls is not None:
            if cfg.data.group_balance:
                raise ConfigError("group_balance reads group columns of a manifest; shards have none")
            self.train_set = None
            self.feed = ShardFeed(self.train_urls, cfg, self.info, self.train_transform, self.device)
        else:
            self.train_set = self.task.train_set()
            num_samples = len(self.train_set)
            if cfg.data.group_balance:
                self.sample_weights = group_weights(self.task.sample_groups(), cfg.data.group_columns)
        if num_samples < cfg.batch_size:
            raise DataError(
                f"{cfg.data.train}: {num_samples} usable samples, fewer than one batch ({cfg.batch_size}); "
                "lower --set batch_size=N"
            )
        self.steps_per_epoch = num_samples // cfg.batch_size
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.val = self.task.build_val()

        model = pretrained.model if pretrained is not None else self.task.build_model(self.model_cfg)
        self.model = model.to(self.device)
        del pretrained, model
        self._prepare_transfer()
        self.task.prepare_model(self.model)
        if cfg.parallel.strategy == "fsdp" and world > 1 and has_lora(self.model):
            raise ConfigError("LoRA with parallel=fsdp is not supported; use parallel=ddp (the default)")
        # Before the optimizer: FSDP replaces the parameters with sharded ones.
        self.train_module = parallelize(TaskModule(self.model, self.task), cfg, self.info)
        self.optimizer = create_optimizer(
            self.model,
            cfg.optim.lr,
            cfg.optim.weight_decay,
            tuple(cfg.optim.betas),
            cfg.optim.eps,
            lr_scale=cfg.optim.lr_scale,
        )
        self.schedule = WarmupCosine(cfg.optim.warmup_steps, self.total_steps, cfg.optim.min_lr_ratio)
        self.scheduler = create_scheduler(self.optimizer, self.schedule)
        self.elapsed_before = 0.0
        if self.resume_from is not None:
            state = self._load_checkpoint(self.resume_from)
            self.step = state["step"]
            self.total_steps = state["total_steps"]
            self.schedule.total = self.total_steps
            self.elapsed_before = state.get("elapsed_s", 0.0)
            if self.train_urls is not None:
                self.feed.restore(state.get("data"), self.step, self.steps_per_epoch)
            if dist.is_main():
                log.info("resumed from %s at step %d", self.resume_from, self.step)
        if dist.is_main():
            save_json(self.resolved_config(), self.out / "train_config.json")

    def _build_tokenizer(self) -> Tokenizer:
        cfg, ctx = self.cfg, self.task.context_length(self.model_cfg)
        saved = self.out / "tokenizer.json"
        if cfg.model.tokenizer:
            if not Path(cfg.model.tokenizer).is_file():
                raise ConfigError(f"tokenizer file not found: {cfg.model.tokenizer}")
            return Tokenizer.from_file(cfg.model.tokenizer, context_length=ctx)
        if saved.is_file() and cfg.resume:  # every rank takes this branch, or none does
            return Tokenizer.from_file(saved, context_length=ctx)
        # Rank 0 trains the tokenizer while the others wait at the barrier. (A rank that found the file
        # already written and skipped the barrier would leave rank 0 in it: a hang at the next collective.)
        if dist.is_main():
            texts = self.task.training_texts()
            if not texts:
                raise DataError(f"no usable rows in {cfg.data.train}")
            self.task.new_tokenizer(texts, ctx).save(saved)
        dist.barrier()
        return Tokenizer.from_file(saved, context_length=ctx)

    def _load_init_from(self):
        """The `init_from` model folder, loaded (vlmkit run or Hugging Face folder) on this process's device,
        with `init_overrides` applied to its config."""
        from vlmkit.convert import load_pretrained
        from vlmkit.models.registry import build_model

        cfg = self.cfg
        if cfg.model.tokenizer:
            raise ConfigError(
                f"tokenizer and init_from are both set; a model from {cfg.transfer.init_from} keeps its own tokenizer: "
                "drop --tokenizer"
            )
        pretrained = load_pretrained(cfg.transfer.init_from, self.device)
        if pretrained.tokenizer is None:
            raise ConfigError(
                f"{cfg.transfer.init_from} has no tokenizer.json; fine-tuning the text tower needs the tokenizer it was "
                "trained with"
            )
        if cfg.transfer.init_overrides:
            new_cfg = override(pretrained.model.cfg, cfg.transfer.init_overrides, where="init_overrides")
            model = build_model(new_cfg).to(self.device)
            try:
                # a video pool may be added to an image dual encoder: its temporal transformer starts new
                missing, unexpected = model.load_state_dict(pretrained.model.state_dict(), strict=False)
                if unexpected or any(not k.startswith("temporal.") for k in missing):
                    raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            except RuntimeError as e:  # the last line names a mismatched tensor
                raise ConfigError(
                    f"init_overrides {cfg.transfer.init_overrides} changes the weights of {cfg.transfer.init_from} "
                    f"({str(e).splitlines()[-1].strip()}); only settings that keep them can change"
                ) from None
            pretrained = replace(pretrained, model=model)
        if dist.is_main():
            log.info(
                "init_from %s: model config, tokenizer and preprocessing come from it "
                "(model=%r, model_overrides=%r, vocab_size, mean and std are ignored)",
                cfg.transfer.init_from,
                cfg.model.name,
                cfg.model.overrides,
            )
        return pretrained

    def _prepare_transfer(self) -> None:
        """Freeze (`freeze`, `lock_image`) and add LoRA adapters as the config says; log what trains."""
        from vlmkit.train.transfer import prepare_model

        cfg = self.cfg
        self.transfer = prepare_model(
            self.model,
            freeze=cfg.optim.freeze,
            lock_image=cfg.transfer.lock_image,
            lora_rank=cfg.transfer.lora_rank,
            lora_alpha=cfg.transfer.lora_alpha,
            lora_targets=cfg.transfer.lora_targets,
            lora_also_train=cfg.transfer.lora_also_train,
        )
        t = self.transfer
        if dist.is_main() and t.trainable < t.total:
            log.info(
                "training %d of %d parameters (%.2f%%)%s",
                t.trainable,
                t.total,
                100 * t.trainable / t.total,
                f"; LoRA rank {cfg.transfer.lora_rank} on {len(t.lora)} Linears" if t.lora else "",
            )

    @property
    def sharded(self) -> bool:
        return self.train_module.sharded

    def _plain_model(self) -> torch.nn.Module | None:
        """The model to save and to evaluate in the end: LoRA adapters merged into plain weights (the run itself
        keeps them); for a sharded run, a whole copy on rank 0 (None elsewhere; a collective)."""
        if self.sharded:
            state = full_model_state(self.model)
            if not dist.is_main():
                return None
            plain = self.task.build_model(self.model_cfg)
            plain.load_state_dict(state)
            return plain.to(self.device)
        return merged_copy(self.model) if has_lora(self.model) else self.model

    def _load_checkpoint(self, ckpt: Path) -> dict:
        if not has_lora(self.model):
            return load_checkpoint(
                ckpt, self.model, self.optimizer, self.scheduler, rank=self.info.rank, sharded=self.sharded
            )
        from vlmkit.train.transfer import LORA_FILE, restore_lora

        # model.safetensors holds merged weights: read them into a plain copy, then put the adapters
        # (lora.safetensors) back on the base weights this run starts from (init_from, or the seeded init).
        plain = merged_copy(self.model)
        state = load_checkpoint(ckpt, plain, self.optimizer, self.scheduler, rank=self.info.rank)
        restore_lora(self.model, plain.state_dict(), ckpt / LORA_FILE)
        return state

    def resolved_config(self) -> dict:
        return {
            "train": to_dict(self.cfg),
            "task": self.task.name,
            "model": to_dict(self.model_cfg),
            "preprocess": self.preprocess.to_dict(),
            "precision": self.precision.to_dict(),
        }

    def autocast(self):
        return self.precision.autocast(self.device)

    # ---------------------------------------------------------------- data
    def _batches(self, epoch: int, start: int):
        """This process's micro-batches of `epoch`, from global batch `start` on (for exact resumes)."""
        if self.train_urls is not None:
            return self.feed.batches(epoch, start, self.micro_batch, self.task.collate())
        cfg, world, rank = self.cfg, self.info.world_size, self.info.rank
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        if self.sample_weights is not None:  # group-balanced: an epoch of draws with replacement
            perm = torch.multinomial(self.sample_weights, len(self.train_set), True, generator=g).tolist()
        else:
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
            collate_fn=self.task.collate(),
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's quick evaluation: on rank 0, or on every rank when the model is sharded (the forward
        needs them all); rank 0's metrics are returned, {} elsewhere."""
        if not self.val or not (dist.is_main() or self.sharded):
            return {}
        self.model.eval()
        with self.autocast(), self.train_module.gathered():
            metrics = self.task.evaluate(self.model)
        self.task.train_mode(self.model)
        return metrics if dist.is_main() else {}

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
            workers=cfg.data.num_workers,
            warmup_steps=self.warmup_steps(),
            done=self.device.type != "cpu",
        )
        try:
            self.task.train_mode(self.model)
            while self.step < self.total_steps and not self.stop_requested:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                loader = iter(self._batches(epoch, start))
                for _ in range(start, self.steps_per_epoch):
                    t_step = time.perf_counter()
                    with self._count_flops(speed, first=not step_times):
                        losses = self._train_step(loader)
                    self.step += 1
                    step_times.append(time.perf_counter() - t_step)
                    lr = self.scheduler.get_last_lr()[0]
                    samples_s = cfg.batch_size / step_times[-1]
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
                            loss=f"{losses['loss']:.4f}",
                            lr=f"{lr:.2e}",
                            pairs_s=f"{samples_s:.0f}",
                            refresh=False,
                        )
                        bar.update(1)
                        if self.step % cfg.log_every == 0 or self.step == 1:
                            parts = {f"train/loss/{k}": v for k, v in losses.items() if k != "loss"}
                            self.log_metrics(
                                {
                                    "epoch": self.step / self.steps_per_epoch,
                                    "train/loss": losses["loss"],
                                    **parts,
                                    "train/lr": lr,
                                    "train/pairs_per_s": samples_s,
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
        if not first or speed.done or self.cfg.parallel.compile:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            yield
        speed.flops_per_step = counter.get_total_flops()

    def _train_step(self, loader) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns the mean of each named loss (over
        micro-batches and processes)."""
        cfg, totals = self.cfg, {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(loader), self.device)
            # gradients are reduced across processes in the last micro-batch's backward only
            with self.train_module.sync_gradients(micro == cfg.grad_accum - 1):
                with self.autocast():
                    parts = self.train_module(batch)
                loss = parts["loss"]
                if not torch.isfinite(loss):
                    raise VlmkitError(
                        f"loss is {loss.item()} at step {self.step + 1}; lower the learning rate (--set lr=...) "
                        "and continue with --resume from the last checkpoint"
                    )
                (loss / cfg.grad_accum).backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / cfg.grad_accum
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self._in_update = True
        self.optimizer.step()
        self.scheduler.step()
        self.task.after_step(self.model)
        self._in_update = False
        self.optimizer.zero_grad(set_to_none=True)
        names = list(totals)
        values = torch.stack([totals[n] for n in names])
        if self.info.world_size > 1:
            values = dist.all_reduce_mean(values)
        return dict(zip(names, values.tolist()))

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def warmup_steps(self) -> int:
        """Steps that do not show the pace: the first (allocations, caches), and under torch.compile the
        first three (compiling, and recompiling for the first new input shapes)."""
        return 3 if self.cfg.parallel.compile else 1

    def _maybe_fit_budget(self, step_times: list[float]) -> None:
        """Fit the cosine schedule to the steps that the time budget leaves, estimated from the median step
        after the warm-up: first once 2 steps are timed, then every 10 steps and before the last one (an early
        estimate never ends a run that a later one would continue)."""
        budget = self.cfg.time_budget
        times = step_times[self.warmup_steps() :]
        if not budget or len(times) < 2:
            return
        if len(times) > 2 and self.step % 10 and self.step + 1 < self.total_steps:
            return
        per_step = float(np.median(times[-50:]))
        left = budget * 60 - self.elapsed()
        fit = self.step + max(0, int(left / per_step * 0.98))  # no time for another step: stop
        configured = self.cfg.max_steps or math.ceil(self.cfg.epochs * self.steps_per_epoch)
        total = torch.tensor(float(min(configured, fit)))
        if self.info.world_size > 1:  # every process must follow rank 0's estimate
            total = dist.broadcast_object(total)
        self.total_steps = max(self.step, int(total))  # = step: the budget is spent, stop now
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
        """A checkpoint of this step (every process takes part)."""
        state = self.trainer_state()
        if self.train_urls is not None:
            state["data"] = self.feed.state()
        multi = self.info.world_size > 1
        if multi:  # every process writes its own RNG state (and shards) into the folder rank 0 prepares
            if dist.is_main():
                prepare_checkpoint(self.out, self.step)
            dist.barrier()
            tmp, _ = checkpoint_dirs(self.out, self.step)
            if self.info.rank:
                save_rng(tmp, self.info.rank)
        full = None
        if self.sharded:
            full = full_model_state(self.model)
            save_sharded(tmp / "dcp", self.model, self.optimizer)
        dist.barrier()
        if dist.is_main():
            path = save_checkpoint(
                self.out,
                self.step,
                self.model if self.sharded else self._plain_model(),
                None if self.sharded else self.optimizer,
                self.scheduler,
                state,
                self.resolved_config(),
                tokenizer=self.tokenizer,
                preprocess=self.preprocess,
                keep_last=self.cfg.keep_last,
                model_name=self.model_name,
                prepared=multi,
                model_state=full,
            )
            if has_lora(self.model):  # the unmerged adapters, for --resume
                from vlmkit.train.transfer import save_lora

                save_lora(self.model, path)
        dist.barrier()

    def finish(self) -> dict:
        """Save the final model to the run folder, evaluate it, write the report."""
        results: dict = {"step": self.step, "stopped_early": self.step < self.total_steps}
        if self.train_urls is not None:
            results["data_skipped"] = self.feed.total_skips()
            if dist.is_main() and results["data_skipped"]:
                log.info("samples skipped during training: %s", results["data_skipped"])
        plain = self._plain_model()  # a collective when sharded
        final = self.evaluate()  # on every process when sharded
        if dist.is_main():
            save_pretrained(plain, self.out, self.tokenizer, self.preprocess, name=self.model_name)
            self.log_metrics(final)
            results.update(final)
            self.metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            plain.eval()
            self.task.final_evals(plain)
            from vlmkit.eval.report import write_report

            results["report"] = str(write_report(self.out))
            save_json(results, self.out / "summary.json")
        dist.barrier()
        dist.cleanup()
        return results


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (a tensor, or a tuple / list / dict of them) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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
