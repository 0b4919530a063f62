"""Training fusion encoders (ALBEF, BLIP, FLAVA style) on image-caption pairs: ITC, ITM with hard negatives,
MLM, MIM and captioning, each weighted by the model config and logged by name; retrieval (ITC and
ITM-reranked) and zero-shot evaluation.

Duplicates are never negatives: each pair carries two ids, its image's and its caption's, and pairs that
share either are positives of each other in ITC and are never drawn as ITM negatives.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit import distributed as dist
from vlmkit.data.manifest import ImageTextDataset
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.losses.captioning import IGNORE_INDEX
from vlmkit.losses.contrastive import gather_features
from vlmkit.losses.fusion import (
    ITM_COLLAPSED_LOSS,
    global_mean,
    itc_loss,
    mask_tokens,
    mim_loss,
    patch_mask,
    sample_negatives,
)
from vlmkit.tasks.base import log, reject
from vlmkit.tasks.contrastive import ContrastiveTask

MASK_TOKEN = "<|mask|>"


def text_id(text: str) -> int:
    """A stable id of a string, the same in every process (unlike `hash`)."""
    return zlib.crc32(text.encode())


class IdentifiedPairs(torch.utils.data.Dataset):
    """An image-caption dataset whose items also carry (image id, caption id), and, with `foils` (image path
    -> (true caption, foil) pairs of its scene), one pair chosen per epoch (("", "") when it has none)."""

    def __init__(
        self, pairs: ImageTextDataset, foils: dict[str, list[tuple[str, str]]] | None = None, seed: int = 0
    ):
        self.pairs, self.seed = pairs, seed
        self.ids = [
            (text_id(str(p)), text_id(c)) for p, c in zip(pairs.image_paths, pairs.captions, strict=True)
        ]
        self.foils = [foils.get(str(Path(p).resolve()), []) for p in pairs.image_paths] if foils else None

    @property
    def samples(self):
        """The manifest rows (with their group columns), as ImageTextDataset's."""
        return self.pairs.samples

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image, caption = self.pairs[i]
        if self.foils is None:
            return image, caption, self.ids[i]
        options = self.foils[i]
        pick = zlib.crc32(f"{self.seed}/{self.pairs.epoch}/{i}".encode()) % len(options) if options else 0
        return image, caption, self.ids[i], options[pick] if options else ("", "")


def read_foils(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Image path (resolved) -> (true caption, foil) pairs of a compositional file (vlmkit.eval.compositional)."""
    from vlmkit.eval.compositional import read_rows

    out: dict[str, list[tuple[str, str]]] = {}
    for row in read_rows(path):
        pairs = [(row["caption"], f["text"]) for f in row["foils"]]
        out.setdefault(str(Path(row["image"]).resolve()), []).extend(pairs)
    return out


def collate_identified(tokenizer: Tokenizer, items: list):
    images = torch.stack([it[0] for it in items])  # (B, 3, H, W)
    ids = torch.tensor([it[2] for it in items], dtype=torch.long)  # (B, 2)
    batch = (images, tokenizer([it[1] for it in items]), ids)
    if len(items[0]) == 4:  # (true caption, foil) of the scene: ("", "") where an image has none
        has = torch.tensor([bool(it[3][1]) for it in items])
        batch += (
            tokenizer([it[3][0] or it[1] for it in items]),
            tokenizer([it[3][1] or it[1] for it in items]),
            has,
        )
    return batch


class FusionTask(ContrastiveTask):
    name = "fusion"
    shards = False

    def configure(self) -> None:
        self.load_vision_source()  # ALBEF/BLIP start from a pretrained ViT too
        reject(
            "lock_image",
            self.cfg.transfer.lock_image,
            self.name,
            "freeze the image tower with --freeze '^visual\\.'",
        )
        self.itm_history: list[float] = []
        self.collapse_warned = False

    def new_tokenizer(self, texts: list[str], context_length: int) -> Tokenizer:
        return Tokenizer.train(
            texts,
            vocab_size=self.cfg.model.vocab_size,
            context_length=context_length,
            extra_special_tokens=[MASK_TOKEN],
        )

    def context_length(self, model_cfg: Any) -> int:
        return min(model_cfg.text.context_length, 64)

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        return {
            "text.vocab_size": tokenizer.vocab_size,
            "text.eot_token_id": tokenizer.eot_token_id,
            "text.pad_token_id": tokenizer.pad_token_id,
            "text.mask_token_id": tokenizer.token_to_id(MASK_TOKEN),
        }

    def build_model(self, model_cfg: Any) -> nn.Module:
        model = super().build_model(model_cfg)
        self.copy_vision_source(model.visual)
        if model.momentum_encoder is not None:  # the momentum copy starts equal to the online model
            model.momentum_encoder["visual"].load_state_dict(model.visual.state_dict())
        return model

    def prepare_model(self, model: nn.Module) -> None:
        cfg = model.cfg
        if cfg.mlm_weight and cfg.text.mask_token_id is None:
            raise ConfigError(
                f"mlm_weight > 0 needs a {MASK_TOKEN} token: this tokenizer has none (train a new one, or set "
                "model_overrides.mlm_weight=0)"
            )

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if getattr(model, "momentum_encoder", None) is not None:
            model.momentum_encoder.eval()

    # ---------------------------------------------------------------- data and step
    def train_set(self) -> IdentifiedPairs:
        negatives = self.cfg.data.hard_negatives
        foils = read_foils(negatives) if negatives else None
        if foils is not None and dist.is_main():
            log.info("hard negative captions for ITM: %d images of %s", len(foils), negatives)
        return IdentifiedPairs(super().train_set(), foils, self.cfg.seed)

    def collate(self):
        return functools.partial(collate_identified, self.trainer.tokenizer)

    def generator(self, salt: int) -> torch.Generator:
        """The same generator on every rank for this step: what a one-process run would draw. (With
        gradient accumulation the micro-batches of one step draw alike: each masks and mines its own rows.)"""
        t = self.trainer
        g = torch.Generator(device=t.device)
        return g.manual_seed((self.cfg.seed * 1_000_003 + t.step * 31 + salt) % 2**63)

    def losses(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, tokens, ids = batch[:3]
        foils = batch[3:] or None  # (foil tokens, which rows have one): extra ITM negatives
        t, cfg = self.trainer, model.cfg
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rows = (rank * len(tokens), world * len(tokens))  # this batch's rows in the global batch
        images = t.train_transform.normalize(images)
        attn = model.attention_mask(tokens)
        image_tokens = model.encode_image_tokens(images)  # (B, N, Cv)
        hidden = model.text_hidden(tokens, attn)  # (B, T, C)
        image_f, text_f = model.image_embedding(image_tokens), model.text_embedding(hidden)
        scale = model.logit_scale()
        parts: dict[str, torch.Tensor] = {}

        if cfg.itc_weight:
            momentum = queue = None
            if cfg.momentum:
                model.momentum_update()
                momentum = model.momentum_features(images, tokens)
                if cfg.queue_size:
                    queue = (model.image_queue.clone(), model.text_queue.clone(), model.id_queue.clone())
            ramp = min(
                1.0, (t.step + 1) / max(1, t.steps_per_epoch)
            )  # ALBEF ramps alpha over the first epoch
            alpha = cfg.distill_alpha * ramp
            parts["itc"] = itc_loss(image_f, text_f, scale, ids, momentum=momentum, queue=queue, alpha=alpha)
            if queue is not None:
                model.enqueue(
                    gather_features(momentum[0]), gather_features(momentum[1]), gather_features(ids)
                )

        if cfg.itm_weight:
            parts["itm"] = self.itm(
                model, tokens, attn, hidden, image_tokens, image_f, text_f, scale, ids, foils
            )

        if cfg.mlm_weight:
            text_cfg = model.cfg.text
            specials = [text_cfg.pad_token_id, text_cfg.eot_token_id, t.tokenizer.sot_token_id]
            masked, labels = mask_tokens(
                tokens,
                text_cfg.mask_token_id,
                text_cfg.vocab_size,
                [s for s in specials if s is not None],
                cfg.mlm_probability,
                self.generator(1),
                rows,
            )
            fused = model.fuse(masked, image_tokens, attn)  # (B, T, C)
            keep = labels != IGNORE_INDEX
            logits = model.lm_head(fused[keep], model.text.token_embedding.weight)  # (n, V)
            parts["mlm"] = global_mean(F.cross_entropy(logits.float(), labels[keep], reduction="none"))

        if cfg.mim_weight:
            B, prefix = images.shape[0], model.visual.num_prefix_tokens
            grid = images.shape[-1] // cfg.vision.patch_size
            mask = patch_mask(B, grid * grid, cfg.mim_ratio, self.generator(2), images.device, rows)
            masked_tokens = model.encode_image_tokens(images, mask)
            predicted = model.mim_head(masked_tokens[:, prefix:])  # (B, N, p*p*3)
            parts["mim"] = mim_loss(predicted, images, mask, cfg.vision.patch_size)

        if cfg.caption_weight:  # next-token prediction of every real token after the first
            hidden_dec = model.decode_hidden(tokens, image_tokens, attn)[:, :-1]  # (B, T-1, C)
            keep = attn[:, 1:].bool()
            logits = model.lm_head(hidden_dec[keep], model.text.token_embedding.weight)  # (n, V)
            ce = F.cross_entropy(
                logits.float(), tokens[:, 1:][keep], label_smoothing=cfg.label_smoothing, reduction="none"
            )
            parts["caption"] = global_mean(ce)

        weights = {
            "itc": cfg.itc_weight,
            "itm": cfg.itm_weight,
            "mlm": cfg.mlm_weight,
            "mim": cfg.mim_weight,
            "caption": cfg.caption_weight,
        }
        loss = sum(weights[k] * v for k, v in parts.items())
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def itm(
        self, model, tokens, attn, hidden, image_tokens, image_f, text_f, scale, ids, foils=None
    ) -> torch.Tensor:
        """ITM on the B positives, B images with a mined wrong text, B texts with a mined wrong image, and
        with `foils` each image with its scene's true caption and a foil of it (NegCLIP's idea, for ITM)."""
        B = tokens.shape[0]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with torch.no_grad():
            all_ids = gather_features(ids)  # (N, 2)
            sim = (
                scale.detach().float()
                * gather_features(image_f.detach()).float()
                @ gather_features(text_f.detach()).float().T
            )
            text_for_image, ok_i = sample_negatives(sim, all_ids, self.generator(3))
            image_for_text, ok_t = sample_negatives(sim.T, all_ids, self.generator(4))
            rows = slice(rank * B, (rank + 1) * B)
            text_for_image, ok_i = text_for_image[rows], ok_i[rows]
            image_for_text, ok_t = image_for_text[rows], ok_t[rows]
        all_tokens, all_attn = gather_features(tokens), gather_features(attn)
        all_images = gather_features(image_tokens)  # with gradients: other ranks' images are negatives here
        upper = model.cfg.text.fusion_start > 0  # ALBEF layouts reuse the text-only pass
        all_hidden = gather_features(hidden) if upper else None
        text = torch.cat([tokens, all_tokens[text_for_image][ok_i], tokens[ok_t]])
        mask = torch.cat([attn, all_attn[text_for_image][ok_i], attn[ok_t]])
        images = torch.cat([image_tokens, image_tokens[ok_i], all_images[image_for_text][ok_t]])
        hid = torch.cat([hidden, all_hidden[text_for_image][ok_i], hidden[ok_t]]) if upper else None
        positive = [torch.ones(B, dtype=torch.long), torch.zeros(len(text) - B, dtype=torch.long)]
        if foils is not None:
            # each image with its scene's true caption in the foils' own words (a positive) and with the foil
            # (a negative): the pair differs only where the foil does, so the wording cannot give it away
            true_tokens, foil_tokens, has = foils
            pair = torch.cat([true_tokens[has], foil_tokens[has]])
            pair_mask = model.attention_mask(pair)
            text, mask = torch.cat([text, pair]), torch.cat([mask, pair_mask])
            images = torch.cat([images, image_tokens[has], image_tokens[has]])
            if upper:
                hid = torch.cat([hid, model.text_hidden(pair, pair_mask)])
            n = int(has.sum())
            positive += [torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]
        logits = model.itm_logits(text, images, mask, hid)  # (B + n_i + n_t [+ 2 n_f], 2)
        labels = torch.cat(positive).to(logits.device)
        loss = global_mean(F.cross_entropy(logits.float(), labels, reduction="none"))
        self.watch_itm(loss.item())
        return loss

    def watch_itm(self, value: float) -> None:
        """Warn once when the ITM loss sits at the 1:2 prior's entropy: the head has collapsed."""
        self.itm_history = (self.itm_history + [value])[-50:]
        stuck = len(self.itm_history) == 50 and all(
            abs(v - ITM_COLLAPSED_LOSS) < 0.01 for v in self.itm_history
        )
        if stuck and not self.collapse_warned and dist.is_main():
            log.warning(
                "the ITM loss has sat at %.4f (the entropy of its 1:2 positive:negative prior) for 50 steps: the "
                "ITM head predicts the prior and has collapsed; lower the learning rate or raise itm_weight",
                ITM_COLLAPSED_LOSS,
            )
            self.collapse_warned = True

    # ---------------------------------------------------------------- evaluation
    def build_val(self) -> dict | None:
        val = super().build_val()
        if val and "images" in val:
            val["tokens"] = self.trainer.tokenizer(val["captions"])
        return val

    def rerank(self, model: nn.Module, k: int = 16) -> dict:
        from vlmkit.eval.retrieval import itm_rerank_metrics

        t, val = self.trainer, self.trainer.val
        images = val["images"][val["image_rows"]]
        return itm_rerank_metrics(
            model, images, val["tokens"], val["text_to_image"], k=k, device=t.device, bf16=t.precision.bf16
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """ITC retrieval and zero-shot accuracy, and retrieval reranked by ITM (R@1)."""
        metrics = super().evaluate(model)
        if self.trainer.val and "images" in self.trainer.val:
            r = self.rerank(model)
            metrics["val/itm_text_retrieval_recall@1"] = r["itm_text_retrieval_recall@1"]
            metrics["val/itm_image_retrieval_recall@1"] = r["itm_image_retrieval_recall@1"]
        return metrics

    def final_evals(self, model: nn.Module) -> None:
        """As a dual encoder's, plus retrieval reranked by ITM (retrieval_itm.json) and the compositional
        benchmark (compositional.json) when data.compositional names one."""
        from vlmkit.eval.compositional import evaluate_compositional
        from vlmkit.eval.features import result_dict, save_results
        from vlmkit.inference.score import pair_scorer

        super().final_evals(model)
        cfg, t = self.cfg, self.trainer
        ev = t.out / "eval"
        if t.val and "images" in t.val:
            metrics = self.rerank(model)
            save_results(result_dict("itm_retrieval", "val", str(t.out), metrics), ev / "retrieval_itm.json")
        if cfg.data.compositional:
            for scorer in ("itm", "itc"):
                _, score_fn = pair_scorer(
                    model, t.tokenizer, t.preprocess, t.device, t.precision.bf16, scorer
                )
                r = evaluate_compositional(
                    score_fn,
                    cfg.data.compositional,
                    out_dir=ev / f"compositional_{scorer}",
                    scorer=scorer,
                    model_name=str(t.out),
                )
                save_results(r, ev / f"compositional_{scorer}.json")
