"""DALL-E style text-to-image (vlmkit.models.dalle): two phases on image-caption manifests, one per stage.

- `task.phase = "vqvae"`: the image tokenizer alone (reconstruction + commitment; the codebook moves by its
  EMA); the language model is frozen (nothing reads it);
- `task.phase = "transformer"`: the language model over [caption][codes] with the VQ-VAE frozen and in eval
  mode (its codebook no longer moves); `cond_drop` of the captions are dropped for classifier-free guidance.

Validation (`data.val`, the first `task.eval_limit` rows): the reconstruction error, or the codes' loss.
The final evaluation writes `eval/samples.png`: reconstructions of validation images beside the originals
(vqvae), or images sampled for validation captions (transformer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.data.conversations import split_files
from vlmkit.data.manifest import ImageTextDataset, read_manifest
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, unnormalize
from vlmkit.errors import ConfigError
from vlmkit.eval.text_to_image import save_grid
from vlmkit.models.dalle import caption_ids
from vlmkit.tasks.base import Task, decoder_token_overrides, log, reject

PHASES = ("vqvae", "transformer")


def collate_images_captions(items: list) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([it[0] for it in items]), [it[1] for it in items]


class TextToImageTask(Task):
    """What the text-to-image tasks share: image-caption manifests, no random crops (Task.augment), the
    validation images (uint8) and captions."""

    augment = False

    def training_texts(self) -> list[str]:
        files = dict.fromkeys(split_files(self.cfg.data.tokenizer_data or self.cfg.data.train))
        return [s.caption for f in files for s in read_manifest(f)[0]]

    # ---------------------------------------------------------------- data and step
    def train_set(self) -> ImageTextDataset:
        cfg, t = self.cfg, self.trainer
        return ImageTextDataset(cfg.data.train, t.train_transform, max_bad_fraction=cfg.data.max_bad_fraction,
                                seed=cfg.seed, log=log)  # fmt: skip

    def collate(self):
        return collate_images_captions

    def build_val(self) -> dict | None:
        cfg, t = self.cfg, self.trainer
        if not cfg.data.val:
            return None
        ds = ImageTextDataset(cfg.data.val, ImageTransform(t.preprocess, train=False, uint8=True), log=log)
        n = min(len(ds), cfg.task.eval_limit)
        items = [ds[i] for i in range(n)]
        return {"images": torch.stack([it[0] for it in items]), "captions": [it[1] for it in items]}

    def samples(self, model: nn.Module, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """What the model makes of validation images (uint8) and captions: normalised images."""
        raise NotImplementedError

    @torch.no_grad()
    def final_evals(self, model: nn.Module) -> None:
        """eval/samples.png: 8 validation images above what `samples` makes of them."""
        v, t = self.trainer.val, self.trainer
        if not v:
            return
        images, captions = v["images"][:8], v["captions"][:8]
        shown = self.samples(model, images, captions)
        out = Path(t.out) / "eval"
        out.mkdir(exist_ok=True)
        save_grid([images, unnormalize(shown.cpu(), t.preprocess)], captions, out / "samples.png")


class DalleTask(TextToImageTask):
    name = "dalle"

    def configure(self) -> None:
        cfg = self.cfg
        reject("lock_image", cfg.transfer.lock_image, self.name, "phases choose what trains (task.phase)")
        if cfg.task.phase not in PHASES:
            raise ConfigError(
                f"the dalle task needs --set task.phase=vqvae or transformer, not {cfg.task.phase!r}"
            )
        if not cfg.data.train:
            raise ConfigError("no training data: pass --train-data MANIFEST (images with captions)")

    @property
    def phase(self) -> str:
        return self.cfg.task.phase

    def context_length(self, model_cfg: Any) -> int:
        return model_cfg.max_text_len

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        # the decoder's vocabulary is the text's plus the codes and <boi>: DalleConfig sets it from text_vocab_size
        ids = decoder_token_overrides(tokenizer)
        return {"text_vocab_size": ids.pop("decoder.vocab_size"), **ids}

    def prepare_model(self, model: nn.Module) -> None:
        frozen = model.language_model if self.phase == "vqvae" else model.vqvae
        frozen.requires_grad_(False)

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.phase == "transformer":
            model.vqvae.eval()  # a frozen tokenizer: its codebook must not move

    def text_ids(self, captions: list[str], drop: float = 0.0) -> list[list[int]]:
        """[bos] + the caption's ids, cut to max_text_len; with `drop`, that share of them is [bos] alone."""
        tok = self.trainer.tokenizer
        rows = caption_ids(tok, captions, self.trainer.model_cfg.max_text_len)
        if drop:
            bos = [tok.sot_token_id] if tok.sot_token_id is not None else []
            keep = torch.rand(len(rows)) >= drop
            rows = [r if k else bos for r, k in zip(rows, keep.tolist(), strict=True)]
        return rows

    def losses(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, captions = batch
        pixels = self.trainer.train_transform.normalize(images)
        if self.phase == "vqvae":
            out = model.vqvae(pixels)
            return {"loss": out.loss, "reconstruction": out.reconstruction_loss.detach(),
                    "commitment": out.commitment_loss.detach()}  # fmt: skip
        codes = model.vqvae.encode(pixels)
        return {"loss": model.loss(self.text_ids(captions, model.cfg.cond_drop), codes)}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        v, t = self.trainer.val, self.trainer
        if not v:
            return {}
        pixels = t.train_transform.normalize(v["images"].to(t.device))
        if self.phase == "vqvae":
            out = model.vqvae(pixels)
            codes = out.indices.unique().numel()
            result = {
                "val/reconstruction_mse": torch.nn.functional.mse_loss(out.reconstruction, pixels).item(),
                "val/codes_used": float(codes),
            }
        else:
            codes = model.vqvae.encode(pixels)
            result = {"val/code_loss": model.loss(self.text_ids(v["captions"]), codes).item()}
        return result

    @torch.no_grad()
    def samples(self, model: nn.Module, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Reconstructions of the validation images (vqvae), or images sampled for their captions."""
        if self.phase == "vqvae":
            return model.vqvae(
                self.trainer.train_transform.normalize(images.to(self.trainer.device))
            ).reconstruction
        codes = model.sample(self.text_ids(captions), temperature=1.0, top_k=64, guidance=3.0,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        return model.decode(codes)
