"""Contrastive training of dual encoders (CLIP, SigLIP, FLIP): image-caption pairs, InfoNCE or sigmoid loss,
retrieval and zero-shot evaluation."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from vlmkit.data.manifest import ImageTextDataset, read_manifest
from vlmkit.data.shards import SkipStats, is_shard_spec, iter_captions, load_pairs
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform
from vlmkit.losses import create_loss
from vlmkit.tasks.base import Task, log, reject


def collate_pairs(tokenizer: Tokenizer, items: list) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([it[0] for it in items])  # (B, 3, H, W)
    return images, tokenizer([it[1] for it in items])  # (B, T)


class ContrastiveTask(Task):
    name = "contrastive"
    shards = True

    def configure(self) -> None:
        reject(
            "vision_init_from",
            self.cfg.transfer.vision_init_from,
            self.name,
            "use init_from for a whole dual encoder",
        )

    def context_length(self, model_cfg: Any) -> int:
        return model_cfg.text.context_length

    def training_texts(self) -> list[str]:
        """The captions of the training data, or of every file in `data.tokenizer_data` (a multi-stage run's first
        stage learns the later stages' texts too): manifests, shards or video manifests."""
        from vlmkit.data.conversations import split_files
        from vlmkit.data.video import is_video_manifest, load_video_samples

        t = self.trainer
        if not self.cfg.data.tokenizer_data:
            if t.train_urls is not None:
                return list(iter_captions(t.train_urls))
            return [s.caption for s in read_manifest(self.cfg.data.train)[0]]
        texts = []
        for spec in split_files(self.cfg.data.tokenizer_data):
            if is_shard_spec(spec):
                texts += list(iter_captions(spec))
            elif is_video_manifest(spec):
                texts += [s.caption for s in load_video_samples(spec)[0]]
            else:
                texts += [s.caption for s in read_manifest(spec)[0]]
        return texts

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        return {
            "text.vocab_size": tokenizer.vocab_size,
            "text.eot_token_id": tokenizer.eot_token_id,
            "text.pad_token_id": tokenizer.pad_token_id,
        }

    def train_mode(self, model: nn.Module) -> None:
        """Training mode, except a locked image tower (LiT), which stays in eval mode."""
        model.train()
        if self.cfg.transfer.lock_image:
            model.visual.eval()

    # ---------------------------------------------------------------- data and step
    def train_set(self) -> ImageTextDataset:
        cfg, t = self.cfg, self.trainer
        return ImageTextDataset(
            cfg.data.train,
            t.train_transform,
            max_bad_fraction=cfg.data.max_bad_fraction,
            seed=cfg.seed,
            log=log,
            cache_images=cfg.data.cache_images,
            cache_short_side=2 * t.preprocess.image_size,
            columns=cfg.data.group_columns if cfg.data.group_balance else (),
        )

    def sample_groups(self) -> list[tuple[str, ...]]:
        """The group (values of data.group_columns) of every training row, for group-balanced sampling."""
        columns = self.cfg.data.group_columns
        return [tuple(s.fields[c] for c in columns) for s in self.trainer.train_set.samples]

    def collate(self):
        return functools.partial(collate_pairs, self.trainer.tokenizer)

    @functools.cached_property
    def loss_fn(self) -> nn.Module:
        return create_loss(self.trainer.model_cfg.loss)  # owns the distributed all-gather

    def losses(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, tokens = batch
        # uint8 from the loader (a quarter of the bytes to ship), normalised here on the device
        images = self.trainer.train_transform.normalize(images)
        out = model(images, tokens)
        loss = self.loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        return {"loss": loss, self.trainer.model_cfg.loss: loss.detach()}

    # ---------------------------------------------------------------- evaluation
    def build_val(self) -> dict | None:
        """Validation images and captions, preprocessed once and kept in memory."""
        cfg, t, val = self.cfg, self.trainer, {}
        eval_tf = ImageTransform(t.preprocess, train=False)
        if cfg.data.val:
            if is_shard_spec(cfg.data.val):
                images, captions, paths = load_pairs(cfg.data.val, eval_tf, SkipStats(log=log))
            else:
                ds = ImageTextDataset(
                    cfg.data.val, eval_tf, max_bad_fraction=cfg.data.max_bad_fraction, log=log
                )
                images = [ds[i][0] for i in range(len(ds))]
                captions, paths = ds.captions, [str(p) for p in ds.image_paths]
            val["images"] = torch.stack(images)
            val["captions"] = list(captions)
            # Rows that share an image path (shard samples that share a source) are one image with
            # several captions.
            first_row: dict[str, int] = {}
            for row, p in enumerate(paths):
                first_row.setdefault(p, row)
            index = {p: i for i, p in enumerate(first_row)}
            val["image_rows"] = torch.tensor(list(first_row.values()))
            val["text_to_image"] = torch.tensor([index[p] for p in paths])
        if cfg.data.zeroshot:
            from vlmkit.data.manifest import read_image_folder
            from vlmkit.data.transforms import load_image
            from vlmkit.eval.templates import load_templates

            paths, labels, classnames = read_image_folder(cfg.data.zeroshot)
            val["zs_images"] = torch.stack([eval_tf(load_image(p)) for p in paths])
            val["zs_labels"] = torch.tensor(labels)
            val["zs_classnames"] = classnames
            val["zs_templates"] = load_templates(cfg.data.zeroshot_templates)
        return val or None

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Retrieval recall and zero-shot accuracy on the in-memory validation data."""
        from vlmkit.eval.features import encode_images, extract_text_features
        from vlmkit.eval.retrieval import retrieval_metrics
        from vlmkit.eval.zeroshot import build_zeroshot_classifier

        t, val, metrics = self.trainer, self.trainer.val, {}
        bf16 = t.precision.bf16
        if "images" in val:
            img = encode_images(model, val["images"][val["image_rows"]], device=t.device, bf16=bf16)
            txt = extract_text_features(model, t.tokenizer, val["captions"], device=t.device, bf16=bf16)
            r = retrieval_metrics(img, txt, val["text_to_image"], ks=(1, 5))
            metrics["val/image_retrieval_recall@1"] = r["image_retrieval_recall@1"]
            metrics["val/text_retrieval_recall@1"] = r["text_retrieval_recall@1"]
            metrics["val/text_retrieval_recall@5"] = r["text_retrieval_recall@5"]
        if "zs_images" in val:
            clf = build_zeroshot_classifier(
                model,
                t.tokenizer,
                val["zs_classnames"],
                val["zs_templates"],
                device=t.device,
                bf16=t.precision.bf16,
            )
            feats = encode_images(model, val["zs_images"], device=t.device, bf16=bf16)
            pred = (feats @ clf.to(feats.dtype)).argmax(dim=1)  # both on the CPU
            metrics["val/zeroshot_acc1"] = (pred.cpu() == val["zs_labels"]).float().mean().item()
        return metrics

    def final_evals(self, model: nn.Module) -> None:
        """CLIP_benchmark-style JSON results (and plots) in <run>/eval/."""
        from vlmkit.eval.features import save_results
        from vlmkit.eval.retrieval import evaluate_retrieval
        from vlmkit.eval.zeroshot import evaluate_zeroshot

        cfg, t = self.cfg, self.trainer
        ev = t.out / "eval"
        ev.mkdir(exist_ok=True)
        common = dict(device=t.device, model_name=str(t.out), bf16=t.precision.bf16)
        if cfg.data.val:
            r = evaluate_retrieval(model, t.tokenizer, t.preprocess, cfg.data.val, out_dir=ev, **common)
            save_results(r, ev / "retrieval.json")
        if cfg.data.zeroshot:
            r = evaluate_zeroshot(
                model,
                t.tokenizer,
                t.preprocess,
                cfg.data.zeroshot,
                templates=t.val["zs_templates"],
                out_dir=ev,
                **common,
            )
            save_results(r, ev / "zeroshot.json")
