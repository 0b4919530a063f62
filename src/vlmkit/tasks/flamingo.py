"""Flamingo: interleaved documents (vlmkit.data.interleaved), next-token loss on each image's text.

Training data are document files (`--train-data DOCS.jsonl`, several joined with "::") or WebDataset shards of
documents (`vlmkit data shard-documents`; read into memory, images decoded as batches use them); validation is
few-shot: `data.val` names a novel-label episode file (`val_episodes.jsonl` of vlmkit.data.fewshot) whose
support set is the `train_classify.jsonl` beside it, measured at 4 shots during training and at 0, 4 and 8
(with captioning from `val_captions.jsonl` when there) at the end.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit import distributed as dist
from vlmkit.data.conversations import split_files
from vlmkit.data.interleaved import (
    CHUNK_TOKEN,
    IMAGE_TOKEN,
    InterleavedDataset,
    collate_documents,
    encode_document,
    read_documents,
)
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import ConfigError, DataError
from vlmkit.losses.captioning import next_token_loss
from vlmkit.tasks.base import Task, decoder_token_overrides, log, reject


class FlamingoTask(Task):
    name = "flamingo"

    def configure(self) -> None:
        reject("lock_image", self.cfg.transfer.lock_image, self.name, "freeze parts with --freeze REGEX")
        if not self.cfg.data.train:
            raise ConfigError("no training data: pass --train-data DOCUMENTS.jsonl (interleaved documents)")
        self.load_vision_source()

    def context_length(self, model_cfg: Any) -> int:
        return model_cfg.decoder.max_seq_len

    def _documents(self, spec: str) -> list:
        from vlmkit.data.shards import is_shard_spec
        from vlmkit.data.shards.documents import read_document_shards

        docs = []
        for file in split_files(spec):
            docs += list(read_document_shards(file) if is_shard_spec(file) else read_documents(file))
        return docs

    def training_texts(self) -> list[str]:
        return [v for d in self._documents(self.cfg.data.tokenizer_data or self.cfg.data.train)
                for kind, v in d.segments if kind == "text"]  # fmt: skip

    def new_tokenizer(self, texts: list[str], context_length: int) -> Tokenizer:
        return Tokenizer.train(
            texts, vocab_size=self.cfg.model.vocab_size, context_length=context_length,
            extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN],
        )  # fmt: skip

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        ids = {t: tokenizer.token_to_id(t) for t in (IMAGE_TOKEN, CHUNK_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(
                f"the tokenizer has no {missing[0]} token; train it with vlmkit (Flamingo's tokens)"
            )
        return {
            **decoder_token_overrides(tokenizer),
            "image_token_id": ids[IMAGE_TOKEN],
            "chunk_token_id": ids[CHUNK_TOKEN],
        }

    def build_model(self, model_cfg: Any) -> nn.Module:
        model = super().build_model(model_cfg)
        self.copy_vision_source(model.vision_model)
        return model

    def prepare_model(self, model: nn.Module) -> None:
        self.freeze_unused(model)

    # ---------------------------------------------------------------- data and step
    def encode(self, doc):
        c = self.trainer.model_cfg
        return encode_document(
            doc, self.trainer.tokenizer, c.image_token_id, c.chunk_token_id, self.cfg.task.max_len
        )

    def train_set(self) -> InterleavedDataset:
        transform = ImageTransform(self.trainer.preprocess, train=False, uint8=True)
        data = InterleavedDataset(self._documents(self.cfg.data.train), transform, self.encode)
        if dist.is_main():
            log.info("documents: %s", data.counts)
        return data

    def collate(self):
        return functools.partial(collate_documents, self.trainer.tokenizer.pad_token_id)

    def losses(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        pixels = self.trainer.train_transform.normalize(batch["pixel_values"])  # (B, M, 3, S, S)
        out = model(
            batch["input_ids"], pixels, batch["attention_mask"], num_media=batch["num_media"], logits="none"
        )
        return {"loss": next_token_loss(out.hidden, batch["labels"], model.lm_head)}

    # ---------------------------------------------------------------- evaluation
    def build_val(self) -> dict | None:
        if not self.cfg.data.val:
            return None
        episodes = Path(self.cfg.data.val)
        support = episodes.parent / "train_classify.jsonl"
        if not support.is_file():
            raise ConfigError(f"data.val {episodes}: the support set {support} beside it is missing")
        if not episodes.is_file() or not episodes.read_text().strip():
            log.warning("data.val %s holds no episode: no few-shot evaluation", episodes)
            return None
        return {"episodes": episodes, "support": support}

    def fewshot(self, model: nn.Module):
        from vlmkit.eval.fewshot import FewShot

        t = self.trainer
        return FewShot(model, t.tokenizer, t.preprocess, t.device, batch_size=self.cfg.task.eval_batch_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from vlmkit.eval.fewshot import evaluate_classify

        v = self.trainer.val
        if not v:
            return {}
        limit = max(1, self.cfg.task.eval_limit // 2)
        r = evaluate_classify(self.fewshot(model), v["episodes"], v["support"], 4, "random", limit)
        return {"val/novel_4shot": r["accuracy"]["value"]}

    def final_evals(self, model: nn.Module) -> None:
        """Novel-label accuracy at 0, 4 and 8 shots (and captioning CIDEr at 0 and 4 when the data has
        captions) in <run>/eval/fewshot_*.json with plots."""
        from vlmkit.eval.fewshot import evaluate_fewshot, plot_fewshot

        t = self.trainer
        if not t.val:
            return
        ev = t.out / "eval"
        ev.mkdir(exist_ok=True)
        fs = self.fewshot(model)
        limit = self.cfg.task.final_eval_limit
        runs = [("classify", [0, 4, 8], t.val["support"], t.val["episodes"])]
        captions = t.val["episodes"].parent / "val_captions.jsonl"
        if captions.is_file():
            runs.append(("caption", [0, 4], t.val["episodes"].parent / "train_captions.jsonl", captions))
        for task, shots, support, queries in runs:
            cap = 400 if task == "classify" else 200
            result = None
            for k in shots:  # a small support set may not hold 8 shots: that count is skipped, said once
                try:
                    r = evaluate_fewshot(fs, task, [k], "random", support=support, queries=queries,
                                         limit=min(limit or cap, cap))  # fmt: skip
                except DataError as e:
                    log.warning("few-shot %s at %d shots skipped: %s", task, k, e)
                    continue
                result = r if result is None else {**result, "results": result["results"] | r["results"]}
            if result is not None:
                (ev / f"fewshot_{task}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
                plot_fewshot(result, ev / f"fewshot_{task}.png")
