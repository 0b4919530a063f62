"""LLaVA: image tokens from a vision tower and projector in the prompt, next-token loss on the answers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmkit.data.chat import IMAGE_TOKEN, expand_video, get_template
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.losses.captioning import next_token_loss
from vlmkit.tasks.conversation import ConversationTask


class LlavaTask(ConversationTask):
    name = "llava"

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.vision_tower

    def training_texts(self) -> list[str]:
        texts = super().training_texts()
        # The template's own words ("USER:", "ASSISTANT:", the system prompt) occur in every row: make them
        # whole tokens rather than byte pieces.
        t = get_template(self.trainer.model_cfg.chat_template)
        words = [t.system or "", t.system_format, t.user_format, t.assistant_prefix, t.end_of_turn or ""]
        line = " ".join(words).replace("{system}", " ").replace("{content}", " ")
        return texts + [line] * max(1, len(texts) // 10)

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        return {
            **super().tokenizer_overrides(tokenizer, model_cfg),
            "image_token_id": tokenizer.token_to_id(IMAGE_TOKEN),
        }

    def prepare_model(self, model: nn.Module) -> None:
        self.freeze_unused(model)

    def configure(self) -> None:
        super().configure()
        if self.cfg.data.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.cfg.data.num_frames}")

    def render_row(self, row: dict) -> tuple[list[int], list[int]]:
        c = self.trainer.model_cfg
        turns = row["conversations"]
        if "video" in row:
            if c.max_frames < self.cfg.data.num_frames:
                raise ConfigError(f"video rows need a model with max_frames >= num_frames ({self.cfg.data.num_frames}); "
                                  f"this one has {c.max_frames} (--set model_overrides.max_frames=N)")  # fmt: skip
            turns = expand_video(turns, self.cfg.data.num_frames)
        return self._render(row, turns, c.chat_template, c.num_image_tokens, c.image_token_id)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch["input_ids"], self.pixels(batch), batch["attention_mask"], logits="none",
                    frame_index=batch["frame_index"])  # fmt: skip
        # the language model's head inside this forward, chunked: the full logits are never materialised
        loss = next_token_loss(out.hidden, batch["labels"], model.language_model.lm_head)
        return {"loss": loss}
