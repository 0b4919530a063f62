"""Text-to-image by flow matching (vlmkit.models.flow.FlowModel) on image-caption manifests.

The caption condition is a trained CLIP's text tower, frozen: `transfer.text_init_from` names the CLIP/SigLIP
folder (in the `flow-tiny-shapes` recipe, the contrastive stage before this one); its text config, weights and
tokenizer become the model's. The velocity network trains on the rectified-flow loss with the condition
dropped for `net.cond_drop` of the batch; after every optimizer step the moving average of its weights moves
(`model.ema`, saved with the model; sampling uses it).

Validation (`data.val`, the first `task.eval_limit` rows): the flow loss of the trained and of the averaged
weights on fixed noise and times. The final evaluation writes `eval/samples.png`: validation images above
images sampled for their captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.models.flow import flow_loss
from vlmkit.tasks.base import log, reject
from vlmkit.tasks.dalle import TextToImageTask


class FlowTask(TextToImageTask):
    name = "flow"
    reads_text_init_from = True
    _text_source: nn.Module | None = None

    def configure(self) -> None:
        from vlmkit.config import override, to_dict
        from vlmkit.convert import load_pretrained
        from vlmkit.models.pretrained import TOKENIZER
        from vlmkit.models.registry import task_name

        cfg = self.cfg
        reject("lock_image", cfg.transfer.lock_image, self.name, "the text tower is always frozen")
        reject(
            "vision_init_from", cfg.transfer.vision_init_from, self.name, "a flow model has no image tower"
        )
        if not cfg.data.train:
            raise ConfigError("no training data: pass --train-data MANIFEST (images with captions)")
        if cfg.transfer.init_from:  # a flow model folder: its own text tower and tokenizer
            return
        source = cfg.transfer.text_init_from
        if not source:
            raise ConfigError(
                "a flow model is conditioned on a trained CLIP's text tower: pass --set text_init_from=DIR "
                "(a CLIP/SigLIP model folder, e.g. the quickstart's runs/quickstart)"
            )
        clip = load_pretrained(source)
        if task_name(clip.model.cfg) != "contrastive":
            raise ConfigError(f"text_init_from {source} is not a CLIP/SigLIP model folder")
        tokenizer = Path(source) / TOKENIZER
        if not tokenizer.is_file():
            raise ConfigError(
                f"text_init_from {source} has no {TOKENIZER}; the text tower needs its tokenizer"
            )
        self._text_source = clip.model.text
        text = {"text": to_dict(clip.model.cfg.text), "embed_dim": clip.model.cfg.embed_dim}
        self.trainer.cfg = override(cfg, {"model.overrides": text, "model.tokenizer": str(tokenizer)})

    def context_length(self, model_cfg: Any) -> int:
        return model_cfg.text.context_length

    def tokenizer_overrides(self, tokenizer: Tokenizer, model_cfg: Any) -> dict[str, Any]:
        if self._text_source is None:  # no CLIP: a new text tower (tests) on the new tokenizer
            return {"text.vocab_size": tokenizer.vocab_size, "text.eot_token_id": tokenizer.eot_token_id,
                    "text.pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        return {}

    def prepare_model(self, model: nn.Module) -> None:
        if self._text_source is not None:
            model.text.load_state_dict(self._text_source.state_dict())
            log.info(
                "text tower: %d tensors from %s",
                len(model.text.state_dict()),
                self.cfg.transfer.text_init_from,
            )
            self._text_source = None
        model.text.requires_grad_(False)

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        model.text.eval()

    def after_step(self, model: nn.Module) -> None:
        model.update_ema()

    # ---------------------------------------------------------------- data and step
    def text_ids(self, captions: list[str]) -> torch.Tensor:
        return self.trainer.tokenizer(captions).to(self.trainer.device)

    def losses(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, captions = batch
        pixels = self.trainer.train_transform.normalize(images)
        return {"loss": model.loss(pixels, self.text_ids(captions))}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        v, t = self.trainer.val, self.trainer
        if not v:
            return {}
        pixels = t.train_transform.normalize(v["images"].to(t.device))
        cond, tokens, mask = model.encode_text(self.text_ids(v["captions"]))
        result = {}
        for key, net in (("flow_loss", model.net), ("flow_loss_ema", model.sampling_net())):
            generator = torch.Generator(t.device).manual_seed(0)  # the same noise and times every time
            velocity = lambda x, s, net=net: net(x, s, cond, tokens, mask)  # noqa: E731
            result[f"val/{key}"] = flow_loss(velocity, pixels, generator).item()
        return result

    @torch.no_grad()
    def samples(self, model: nn.Module, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return model.sample(self.text_ids(captions), generator=torch.Generator().manual_seed(0))
