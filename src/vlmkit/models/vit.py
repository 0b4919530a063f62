"""Vision Transformer image encoder: patches -> (+class token) -> +positions -> blocks -> pool -> project."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.nn.patch import ConvStem, PatchDropout, PatchEmbed, resample_pos_embed
from vlmkit.nn.pool import AttentionPool
from vlmkit.nn.transformer import Transformer


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    pool: str = "cls"  # "cls" (class token), "mean" (mean of patch tokens) or "attn" (SigLIP's MAP head)
    class_token: bool = True
    ln_pre: bool = True  # CLIP normalises the embeddings before the blocks; SigLIP does not
    proj: bool = True  # a bias-free linear map to the shared embedding; SigLIP's vision tower has none
    patch_bias: bool = False
    stem: str = "patch"  # "patch" (one linear projection per patch, as CLIP) or "conv" (see ConvStem)
    # FLIP: the fraction of patch tokens dropped at random per image while training (never in eval mode)
    patch_dropout: float = 0.0
    # a learned token that replaces masked patches (`forward_tokens(images, mask)`): masked image modelling
    mask_token: bool = False

    def __post_init__(self):
        if self.pool not in ("cls", "mean", "attn"):
            raise ConfigError(f"vision.pool must be 'cls', 'mean' or 'attn', not {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("vision.pool='cls' needs vision.class_token=true")
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"vision.stem must be 'patch' or 'conv', not {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"vision.stem='conv' needs a power-of-two patch_size, not {self.patch_size}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"vision.patch_dropout must be in [0, 1), not {self.patch_dropout}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.patch_size, width)
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, width, bias=cfg.patch_bias)
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5) if cfg.class_token else None
        num_pos = cfg.grid_size**2 + self.num_prefix_tokens
        self.positional_embedding = nn.Parameter(torch.randn(num_pos, width) * 0.01)
        self.patch_dropout = PatchDropout(cfg.patch_dropout, self.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(width)) if cfg.mask_token else None
        self.ln_pre = nn.LayerNorm(width, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.ln_post = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.attn_pool = (
            AttentionPool(width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.norm_eps)
            if cfg.pool == "attn"
            else None
        )
        self.proj = nn.Linear(width, output_dim, bias=False) if cfg.proj else None

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for a patch grid; resampled on the fly when the input size differs."""
        return resample_pos_embed(self.positional_embedding, grid, self.num_prefix_tokens)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (+ class token) + positions, normalised: the blocks' input (B, T, width). While
        training with `patch_dropout`, only the kept tokens: (B, prefix + K, width). `mask` (B, N) bool:
        those patches' embeddings are replaced by the learned mask token (masked image modelling)."""
        B, _, H, W = images.shape
        p = self.cfg.patch_size
        x = self.patch_embed(images)  # (B, N, C)
        if mask is not None:
            if self.mask_token is None:
                raise ConfigError("masking patches needs vision.mask_token=true")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
            x = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        x = x + self.pos_embed_for((H // p, W // p)).to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def forward_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: (B, N_prefix + H*W, width); `mask` as in `embed`."""
        return self.ln_post(self.transformer(self.embed(images, mask)))

    def forward_hidden(self, images: torch.Tensor, layer: int | Sequence[int] = -1) -> torch.Tensor:
        """The tokens after `layer` blocks, as Hugging Face's `hidden_states[layer]`: 0 = the embeddings,
        -1 = the last block's output, -2 = the one before (LLaVA's default). No final norm; the blocks
        after `layer` are not run. Returns (B, N_prefix + H*W, width). Several layers: their tokens
        concatenated along the channels, in the given order: (B, N_prefix + H*W, len(layer) * width)."""
        num_layers = len(self.transformer.blocks)
        layers = [layer] if isinstance(layer, int) else list(layer)
        wanted = [i if i >= 0 else num_layers + 1 + i for i in layers]
        for i, n in zip(layers, wanted, strict=True):
            if not 0 <= n <= num_layers:
                raise ConfigError(f"vision layer {i} does not exist in a {num_layers}-layer vision tower")
        x = self.embed(images)  # (B, T, C)
        hidden = {0: x} if 0 in wanted else {}  # only the layers asked for are kept
        for i, block in enumerate(self.transformer.blocks[: max(wanted)], start=1):
            if self.transformer.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                hidden[i] = x
        return torch.cat([hidden[n] for n in wanted], dim=-1) if len(wanted) > 1 else hidden[wanted[0]]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding from all output tokens (B, N, C) of `forward_tokens`: pooled, projected (B, D)."""
        if self.cfg.pool == "cls":
            pooled = tokens[:, 0]  # (B, C)
        elif self.cfg.pool == "mean":
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)  # (B, C), over the visible patches
        else:
            pooled = self.attn_pool(tokens)[:, 0]  # (B, C)
        return self.proj(pooled) if self.proj is not None else pooled  # (B, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool != "cls":
            return self.pool(self.forward_tokens(images))
        # Only the class token is read out, so the last block runs its query and MLP for it alone (patch
        # dropout keeps the class token first).
        x = self.embed(images)
        index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        pooled = self.ln_post(self.transformer(x, index=index))  # (B, C)
        return self.proj(pooled) if self.proj is not None else pooled  # (B, D)
