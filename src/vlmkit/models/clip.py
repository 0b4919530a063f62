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
class VideoConfig:
    """How a clip's frame embeddings become one video embedding (CLIP4Clip): "mean" (meanP: the mean of the
    normalised frame embeddings, no parameters) or "transformer" (seqTransf: frame-position embeddings and a
    small transformer over the frames, added back to them, then the mean)."""

    pool: str = "mean"
    layers: int = 2
    heads: int = 4
    max_frames: int = 16


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: str = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # SigLIP: -10
    max_logit_scale: float = math.log(100)
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self):
        if isinstance(self.video, dict):
            self.video = VideoConfig(**self.video)
        if self.video.pool not in ("mean", "transformer"):
            raise ConfigError(f"video.pool must be 'mean' or 'transformer', not {self.video.pool!r}")
        if self.video.pool == "transformer" and self.embed_dim % self.video.heads:
            raise ConfigError(f"video.heads ({self.video.heads}) must divide embed_dim ({self.embed_dim})")
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
        self.temporal = TemporalPool(cfg.embed_dim, cfg.video) if cfg.video.pool == "transformer" else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Scaled normal init: residual output projections shrink with depth so deep stacks start stable."""
        init_tower(self.visual)
        init_tower(self.text)
        if self.temporal is not None:
            self.temporal.init_weights()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image embeddings."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_video(
        self, frames: torch.Tensor, normalize: bool = False, pool: str | None = None
    ) -> torch.Tensor:
        """(B, T, 3, H, W) frames -> (B, embed_dim) video embeddings: every frame through the image tower,
        then `pool_frames`."""
        B, T = frames.shape[:2]
        x = self.encode_image(frames.flatten(0, 1)).view(B, T, -1)  # (B, T, D)
        return self.pool_frames(x, normalize, pool)

    def pool_frames(self, x: torch.Tensor, normalize: bool = False, pool: str | None = None) -> torch.Tensor:
        """Frame embeddings (B, T, D) -> video embeddings (B, D) with the model's `video.pool`, or `pool`
        ("mean" runs meanP on any model: the control that ignores frame order)."""
        pool = pool or self.cfg.video.pool
        if pool == "transformer":
            if self.temporal is None:
                raise ConfigError(
                    "this model has no temporal transformer (video.pool='mean'); use pool='mean'"
                )
            x = self.temporal(x)  # (B, T, D)
        elif pool != "mean":
            raise ConfigError(f"pool must be 'mean' or 'transformer', not {pool!r}")
        v = F.normalize(x, dim=-1).mean(dim=1)  # CLIP4Clip: normalised frames, averaged
        return F.normalize(v, dim=-1) if normalize else v

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
        """Images (B, 3, H, W), or video clips (B, T, 3, H, W) embedded by `encode_video`, and token ids (B, L)."""
        if images.ndim == 5:
            image_features = self.encode_video(images, normalize=True)
        else:
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


class TemporalPool(nn.Module):
    """CLIP4Clip's seqTransf: frame embeddings plus learned frame positions through a few transformer blocks,
    added back to the frame embeddings (so an untrained pool starts near meanP)."""

    def __init__(self, dim: int, cfg: VideoConfig):
        super().__init__()
        self.frame_embedding = nn.Parameter(torch.zeros(cfg.max_frames, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.heads) for _ in range(cfg.layers))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.frame_embedding, std=0.01)
        dim, depth = self.frame_embedding.shape[1], max(len(self.blocks), 1)
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=dim**-0.5)
            nn.init.normal_(b.attn.proj.weight, std=dim**-0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(b.mlp.fc1.weight, std=(2 * dim) ** -0.5)
            nn.init.normal_(b.mlp.fc2.weight, std=dim**-0.5 * (2 * depth) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.frame_embedding.shape[0]:
            raise ConfigError(f"{T} frames, but the temporal transformer knows {self.frame_embedding.shape[0]} "
                              "positions (video.max_frames); sample fewer frames")  # fmt: skip
        h = x + self.frame_embedding[:T]
        for block in self.blocks:
            h = block(h)
        return x + h  # CLIP4Clip adds the transformer's output to the frame embeddings


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


__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "TemporalPool",
    "VideoConfig",
    "Attention",
    "init_tower",
    "no_weight_decay_names",
]
