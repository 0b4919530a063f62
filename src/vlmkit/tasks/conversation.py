"""Training generative VLMs (CoCa, LLaVA) on image conversations: what both share.

Data are LLaVA-format conversation files (JSONL rows `{"image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`; see `vlmkit.data.vqa`), rendered with the
model's chat template; the loss is on the assistant's tokens only. Evaluation generates: VQA accuracy by
question type, and captioning metrics for caption files.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit.data.chat import IMAGE_TOKEN, VIDEO_TOKEN, render
from vlmkit.data.conversations import ConversationDataset, collate_conversations, read_rows, split_files
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import ConfigError
from vlmkit.tasks.base import Task, decoder_token_overrides, reject


class ConversationTask(Task):
    """The shared part of the CoCa and LLaVA tasks; subclasses say how a row renders and what the loss is."""

    template_words = False  # whether a new tokenizer learns the chat template's words as whole tokens

    def configure(self) -> None:
        cfg = self.cfg
        reject(
            "lock_image",
            cfg.transfer.lock_image,
            self.name,
            "freeze a generative model's parts with --freeze REGEX",
        )
        if not cfg.data.train:
            raise ConfigError("no training data: pass --train-data CONVERSATIONS.jsonl (LLaVA format)")
        self.load_vision_source()

    def context_length(self, model_cfg: Any) -> int:
        # The tokenizer's fixed-length framing is only used for CoCa's contrastive text side (zero-shot prompts).
        return min(77, model_cfg.decoder.max_seq_len)

    def training_texts(self) -> list[str]:
        texts = []
        for row in read_rows(self.cfg.data.tokenizer_data or self.cfg.data.train):
            for turn in row["conversations"]:
                text = str(turn.get("value", turn.get("content", "")))
                texts.append(text.replace(IMAGE_TOKEN, " ").replace(VIDEO_TOKEN, " "))
        return texts

    def new_tokenizer(self, texts: list[str], context_length: int) -> Tokenizer:
        return Tokenizer.train(
            texts,
            vocab_size=self.cfg.model.vocab_size,
            context_length=context_length,
            extra_special_tokens=[IMAGE_TOKEN],
        )

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        return decoder_token_overrides(tokenizer)

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def build_model(self, model_cfg: Any) -> nn.Module:
        model = super().build_model(model_cfg)
        self.copy_vision_source(self.vision_tower(model))
        return model

    # ---------------------------------------------------------------- data and step
    def render_row(self, row: dict) -> tuple[list[int], list[int]]:
        """A row -> (input_ids, labels) with the model's template."""
        raise NotImplementedError

    def _render(self, row: dict, conversation: list[dict], template: str, n: int, image_id: int | None):
        return render(
            conversation,
            self.trainer.tokenizer,
            template,
            num_image_tokens=n,
            image_token_id=image_id,
            max_len=self.cfg.task.max_len,
            row=f"{row.get('image', row.get('video'))} (line {row.get('line', '?')})",
        )

    def train_set(self) -> ConversationDataset:
        # No random crops: questions about counts and positions must stay true of the image the model sees.
        transform = ImageTransform(self.trainer.preprocess, train=False, uint8=True)
        return ConversationDataset(
            read_rows(self.cfg.data.train), transform, self.render_row, self.cfg.data.num_frames
        )

    def collate(self):
        return functools.partial(collate_conversations, self.trainer.tokenizer.pad_token_id)

    def pixels(self, batch: dict) -> torch.Tensor:
        return self.trainer.train_transform.normalize(batch["pixel_values"])

    # ---------------------------------------------------------------- evaluation
    def build_val(self) -> dict | None:
        if not self.cfg.data.val:
            return None
        files = {file: read_rows(file) for file in split_files(self.cfg.data.val)}
        rows = [row for file_rows in files.values() for row in file_rows]
        random.Random(self.cfg.seed).shuffle(rows)  # a fixed sample that mixes question types
        return {"rows": rows, "captions": {f: r[0].get("type") == "caption" for f, r in files.items()},
                "video": {f: "video" in r[0] for f, r in files.items()}}  # fmt: skip

    def pipeline(self, model: nn.Module):
        from vlmkit.inference import VLMPipeline

        t = self.trainer
        return VLMPipeline(model, t.tokenizer, t.preprocess, t.device, precision=t.precision.name)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """VQA accuracy (overall and by question type) on the first `eval_limit` validation questions."""
        from vlmkit.eval.vqa import evaluate_vqa

        rows = [r for r in self.trainer.val["rows"] if r.get("type") != "caption"][: self.cfg.task.eval_limit]
        if not rows:
            return {}
        if "video" in rows[0]:  # video questions: accuracy by kind, no controls mid-run
            from vlmkit.eval.video import evaluate_video_qa

            files = split_files(self.cfg.data.val)
            by_kind = evaluate_video_qa(self.pipeline(model), files[0], self.cfg.data.num_frames,
                                        self.cfg.task.eval_batch_size, self.cfg.task.eval_limit,
                                        controls=False)["accuracy_by_type"]  # fmt: skip
            return {f"val/video_{k}": v for k, v in by_kind.items()} | {
                "val/vqa_accuracy": float(np.mean(list(by_kind.values())))
            }
        result = evaluate_vqa(
            self.pipeline(model).answer, rows, batch_size=self.cfg.task.eval_batch_size, progress=False
        )
        m = result["metrics"]
        metrics = {"val/vqa_accuracy": m["accuracy"]}
        if m["counting_accuracy"] is not None:
            metrics["val/vqa_counting"] = m["counting_accuracy"]
        for kind, acc in m["accuracy_by_type"].items():
            metrics[f"val/vqa_{kind}"] = acc
        return metrics

    def final_evals(self, model: nn.Module) -> None:
        """VQA and captioning results (JSON, plots, report.html) in <run>/eval/."""
        from vlmkit.eval.vqa import evaluate_captioning, evaluate_vqa

        t = self.trainer
        if not t.val:
            return
        ev = t.out / "eval"
        ev.mkdir(exist_ok=True)
        pipe = self.pipeline(model)
        common = dict(
            batch_size=self.cfg.task.eval_batch_size,
            limit=self.cfg.task.final_eval_limit,
            out_dir=ev,
            model_name=str(t.out),
        )
        for file, captions in t.val["captions"].items():
            if t.val["video"].get(file):
                from vlmkit.eval.video import evaluate_video_qa, format_temporal_table

                res = evaluate_video_qa(pipe, file, self.cfg.data.num_frames, self.cfg.task.eval_batch_size,
                                        self.cfg.task.final_eval_limit, str(t.out), out_dir=ev)  # fmt: skip
                print(format_temporal_table(res))
            elif captions:
                evaluate_captioning(pipe.caption, file, **common)
            else:
                evaluate_vqa(pipe.answer, file, **common)
