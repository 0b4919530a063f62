"""Dual encoder (CLIP and SigLIP): an image tower and a text tower mapped into one embedding space.

One class serves both: SigLIP differs only in its towers' configs and a learnable logit bias.
`forward` returns normalised features and the logit scale/bias; the losses live in `vlmkit.losses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.text import TextConfig, TextTransformer
from vlmkit.models.vit import VisionConfig, VisionTransformer
from vlmkit.nn.attention import Attention
from vlmkit.nn.transformer import Block


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # SigLIP: -10
    max_logit_scale: float = math.log(100)

    def __post_init__(self):
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"loss must be 'clip' or 'siglip', not {self.loss!r}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if not tower.proj and tower.width != self.embed_dim:
                raise ConfigError(
                    f"{name}.proj=false needs {name}.width ({tower.width}) == embed_dim ({self.embed_dim})"
                )


@dataclass
class CLIPOutput:
    image_features: torch.Tensor  # (B, D), L2-normalised
    text_features: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp'd and clamped
    logit_bias: torch.Tensor | None  # scalar (SigLIP) or None


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
            if cfg.init_logit_bias is not None
            else None
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Scaled normal init: residual output projections shrink with depth so deep stacks start stable."""
        init_tower(self.visual)
        init_tower(self.text)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image embeddings."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, text: torch.Tensor, normalize: bool = False, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim) text embeddings."""
        x = self.text(text, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Clamped so the softmax temperature cannot run away (CLIP caps it at 100).
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp(), self.logit_bias

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> CLIPOutput:
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        scale, bias = self.scale_and_bias()
        return CLIPOutput(image_features, text_features, scale, bias)

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image logits, (B_img, B_txt) and (B_txt, B_img)."""
        out = self(images, text)
        logits = out.logit_scale * out.image_features @ out.text_features.T
        if out.logit_bias is not None:
            logits = logits + out.logit_bias
        return logits, logits.T

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable


@torch.no_grad()
def init_tower(tower: nn.Module) -> None:
    """CLIP's init of one tower (VisionTransformer or TextTransformer): normal weights, std width**-0.5,
    residual output projections scaled down by sqrt(2 * depth), zero biases; also the tower's projection
    and attention-pooling head."""
    width = tower.cfg.width
    depth = max(tower.cfg.layers, 1)
    for m in tower.modules():
        if isinstance(m, Block):
            nn.init.normal_(m.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(m.attn.proj.weight, std=width**-0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(m.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(m.mlp.fc2.weight, std=width**-0.5 * (2 * depth) ** -0.5)
            for lin in (m.attn.qkv, m.attn.proj, m.mlp.fc1, m.mlp.fc2):
                nn.init.zeros_(lin.bias)
    if tower.proj is not None:
        nn.init.normal_(tower.proj.weight, std=width**-0.5)
        if tower.proj.bias is not None:
            nn.init.zeros_(tower.proj.bias)
    if getattr(tower, "attn_pool", None) is not None:
        for m in tower.attn_pool.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=width**-0.5)
                nn.init.zeros_(m.bias)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Gains, biases, embeddings, tokens and the logit scale/bias: decaying them hurts (CLIP, ViT practice)."""
    names = set()
    for name, p in model.named_parameters():
        if (
            p.ndim < 2
            or "embedding" in name
            or "embed_tokens" in name
            or "logit_" in name
            or name.endswith(("attn_pool.query", "image_pool.query"))  # learned attention-pooling queries
        ):
            names.add(name)
    return names


__all__ = ["CLIP", "CLIPConfig", "CLIPOutput", "Attention", "init_tower", "no_weight_decay_names"]
