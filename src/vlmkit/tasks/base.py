"""What a kind of training supplies to the one `Trainer`: the model, its data and collate, the losses of one
micro-batch, and its evaluation.

The Trainer owns everything else (processes, schedule, time budget, accumulation, clipping, checkpoints
and exact resume, signals, logging, stages, parallelism). It calls a task's methods in this order:

    configure()                          check / adjust the run's config before anything is built
    context_length(), training_texts(),  the tokenizer (built from the training texts unless given)
    new_tokenizer(), tokenizer_overrides()
    build_model(), prepare_model()       a new model for the config; freezing what the task never trains
    train_set(), collate()               manifest data: a map-style dataset and its collate function
    build_val()                          validation data, once
    losses(model, batch)                 per micro-batch, inside the wrapped (DDP/FSDP) module's forward
    after_step(model)                    after each optimizer step (a moving average of the weights)
    evaluate(model), final_evals(model)  periodic / final evaluation

A task reads the run's state from its trainer: `cfg`, `device`, `model_cfg`, `tokenizer`, `preprocess`,
`train_transform`, `precision`, `out` and `val`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError

if TYPE_CHECKING:
    from vlmkit.train.trainer import Trainer

log = logging.getLogger("vlmkit.train")


class Task:
    name = "task"
    shards = False  # whether train_data may be WebDataset shards of (image, caption) pairs
    # random resized crops in training; text-to-image tasks turn them off, as a caption says where an object
    # is and how large, which a crop changes
    augment = True
    reads_text_init_from = False  # whether transfer.text_init_from means anything to the task (flow)

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    @property
    def cfg(self):
        return self.trainer.cfg

    # ---------------------------------------------------------------- config, tokenizer, model
    def configure(self) -> None:
        """Check (and possibly replace `trainer.cfg`) before anything is built."""

    def context_length(self, model_cfg: Any) -> int:
        raise NotImplementedError

    def training_texts(self) -> list[str]:
        """The texts a new tokenizer is trained on."""
        raise NotImplementedError

    def new_tokenizer(self, texts: list[str], context_length: int) -> Tokenizer:
        return Tokenizer.train(texts, vocab_size=self.cfg.model.vocab_size, context_length=context_length)

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        """Model-config keys (dotted) that come from the tokenizer: vocabulary size, special token ids."""
        raise NotImplementedError

    def build_model(self, model_cfg: Any) -> nn.Module:
        from vlmkit.models.registry import build_model

        return build_model(model_cfg)

    # A pretrained image tower for a model that has one of its own (LLaVA's vision encoder, a fusion
    # model's ViT): `transfer.vision_init_from` names a CLIP/SigLIP folder.
    vision_source: nn.Module | None = None

    def load_vision_source(self) -> None:
        """In `configure`: read the vision_init_from folder; its tower's config and pixel statistics replace the
        run's (the weights are copied by `copy_vision_source` once the model is built)."""
        from vlmkit.config import override, to_dict
        from vlmkit.convert import load_pretrained
        from vlmkit.models.registry import task_name

        cfg = self.cfg
        if not cfg.transfer.vision_init_from or cfg.transfer.init_from:
            return
        source = load_pretrained(cfg.transfer.vision_init_from)
        if task_name(source.model.cfg) != "contrastive":
            raise ConfigError(
                f"vision_init_from {cfg.transfer.vision_init_from} is not a CLIP/SigLIP model folder"
            )
        self.vision_source = source.model.visual
        vision = {"model.overrides": {"vision": to_dict(source.model.cfg.vision)}}
        preprocess = {"model.mean": tuple(source.preprocess.mean), "model.std": tuple(source.preprocess.std)}
        self.trainer.cfg = override(cfg, vision | preprocess)

    def copy_vision_source(self, tower: nn.Module) -> None:
        """Copy the vision_init_from tower's weights into `tower` (all but a head of another shape)."""
        if self.vision_source is None:
            return
        target = tower.state_dict()
        state = {
            k: v
            for k, v in self.vision_source.state_dict().items()
            if k in target and target[k].shape == v.shape
        }
        tower.load_state_dict(state, strict=False)
        from vlmkit import distributed as dist

        if dist.is_main():
            log.info(
                "vision tower: %d of %d tensors from %s",
                len(state),
                len(target),
                self.cfg.transfer.vision_init_from,
            )
        self.vision_source = None

    def prepare_model(self, model: nn.Module) -> None:
        """After freezing and LoRA (vlmkit.train.transfer): anything the task never trains."""

    def freeze_unused(self, model: nn.Module) -> None:
        """Freeze the parameters no output depends on (`model.unused_parameter_names()`: a vision tower's
        blocks after the layer read, its final norm and head); DDP requires every trained one to get a gradient."""
        unused = model.unused_parameter_names()
        params = dict(model.named_parameters())
        for name in unused:
            params[name].requires_grad_(False)
        if unused:
            from vlmkit import distributed as dist

            if dist.is_main():
                log.info(
                    "%d vision-tower tensors after the feature layer are unused and stay frozen", len(unused)
                )

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step with the (unwrapped) model."""

    # ---------------------------------------------------------------- data and step
    def train_set(self) -> torch.utils.data.Dataset:
        """The training set for manifest data: items by index, with `set_epoch(epoch)` and `len()`."""
        raise NotImplementedError

    def sample_groups(self) -> list[tuple[str, ...]]:
        """The group of every training row (data.group_columns), for group-balanced sampling."""
        raise ConfigError(
            f"group_balance: the {self.name} task has no group columns to balance (contrastive and fusion tasks do)"
        )

    def collate(self) -> Callable[[list], Any]:
        """Items -> a micro-batch (tensors, or a tuple / dict of them); a picklable function for workers."""
        raise NotImplementedError

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch (already on the device), under autocast. "loss" is what is
        back-propagated; every other entry is a named part, logged as train/loss/<name>."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def build_val(self) -> dict | None:
        return None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Quick metrics on the validation data (keys "val/..."), on every process (the model may be
        sharded); only rank 0's are logged."""
        return {}

    def final_evals(self, model: nn.Module) -> None:
        """Full evaluations of the final model (rank 0, unsharded), written to <run>/eval/."""


def decoder_token_overrides(tokenizer: Tokenizer) -> dict[str, Any]:
    """The model-config keys a decoder LM takes from its tokenizer: vocabulary size and special ids."""
    return {
        "decoder.vocab_size": tokenizer.vocab_size,
        "decoder.bos_token_id": tokenizer.sot_token_id,
        "decoder.eos_token_id": tokenizer.eot_token_id,
        "decoder.pad_token_id": tokenizer.pad_token_id,
    }


def reject(option: str, value: Any, task: str, why: str) -> None:
    """A ConfigError for an option a task does not support, when it is set."""
    if value:
        raise ConfigError(f"{option} is not supported by the {task} task: {why}")
