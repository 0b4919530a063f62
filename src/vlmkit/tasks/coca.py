"""CoCa: a captioning (next-token) loss on every row, plus a contrastive loss on the rows that are captions."""

from __future__ import annotations

import functools

import torch
from torch import nn

from vlmkit.data.chat import coca_turns
from vlmkit.tasks.conversation import ConversationTask


class CocaTask(ConversationTask):
    name = "coca"

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.visual

    def render_row(self, row: dict) -> tuple[list[int], list[int]]:
        conversation = coca_turns(row["conversations"], is_caption=row.get("type") == "caption")
        return self._render(row, conversation, "plain", 0, None)

    @functools.cached_property
    def loss_fn(self) -> nn.Module:
        from vlmkit.losses.coca import CoCaLoss

        c = self.trainer.model_cfg
        return CoCaLoss(caption_weight=c.caption_loss_weight, contrastive_weight=c.contrastive_loss_weight)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(self.pixels(batch), batch["input_ids"], batch["attention_mask"])
        parts = self.loss_fn(out, batch["labels"], model.decoder.lm_head, is_caption=batch["is_caption"])
        return {
            "loss": parts["loss"],
            "caption": parts["caption_loss"].detach(),
            "contrastive": parts["contrastive_loss"].detach(),
        }
