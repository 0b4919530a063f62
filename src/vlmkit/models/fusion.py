"""Fusion encoder-decoder (ALBEF, BLIP, FLAVA style): text tokens attend to image patches.

- image encoder: vlmkit's ViT, all its output tokens (after the final norm);
- text encoder: a bidirectional transformer over `[CLS] text [SEP]`. Its first `text.fusion_start` layers
  are text-only and the rest cross-attend to the image tokens in the multimodal pass (ALBEF's fusion
  layers). With `fusion_start` 0 (BLIP) every layer has cross-attention, and the text-only pass runs all of
  them without it;
- merged variant (`fusion="merged"`, FLAVA/ViLT): the layers from `fusion_start` attend over the
  concatenated [image; text] tokens instead of cross-attending;
- decoder (`text_decoder=True`, BLIP): the same layers with a causal self-attention of their own (everything else
  is shared), reading the image through the cross-attention: image-grounded captioning.

Heads: the ITC projections (`vision_proj`, `text_proj`) and a learnable temperature, the ITM head (2-way,
on the multimodal [CLS]), BERT's prediction head for MLM and captioning (tied to the token embeddings),
and a pixel head for masked image modelling. An optional momentum copy of the unimodal encoders and a
feature queue (ALBEF) live here too, as buffers and frozen parameters. The losses are in
`vlmkit.losses.fusion`; `vlmkit.tasks.fusion` trains them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.vit import VisionConfig, VisionTransformer
from vlmkit.nn.mlp import get_activation
from vlmkit.nn.transformer import Block, padding_mask


@dataclass
class FusionTextConfig:
    vocab_size: int = 30524
    context_length: int = 512  # position embeddings
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-12
    post_norm: bool = True  # BERT's ln(x + f(x)); false: pre-norm x + f(ln(x)) with a final norm
    fusion_start: int = 0  # the first layer that reads the image in the multimodal pass (see the module)
    pad_token_id: int = 0
    eot_token_id: int = 102  # the end of a text ([SEP]); the decoder stops there
    mask_token_id: int | None = None  # MLM's [MASK]; None: no masked language modelling
    enc_token_id: int | None = None  # BLIP's [ENC]: replaces the first token in the multimodal pass
    dec_token_id: int | None = None  # BLIP's [DEC]: replaces the first token in the decoder


@dataclass
class FusionConfig:
    vision: VisionConfig = field(
        default_factory=lambda: VisionConfig(ln_pre=False, proj=False, patch_bias=True, norm_eps=1e-5)
    )
    text: FusionTextConfig = field(default_factory=FusionTextConfig)
    embed_dim: int = 256  # the ITC embedding
    fusion: str = "cross"  # "cross" (ALBEF/BLIP) or "merged" (FLAVA/ViLT)
    text_decoder: bool = True  # BLIP's image-grounded text decoder (captioning)
    mim: bool = False  # a mask token in the ViT and a pixel head: masked image modelling
    # ITC: a learnable temperature clamped to [0.001, 0.5] (ALBEF/BLIP)
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    # ALBEF's momentum distillation: momentum > 0 keeps an EMA copy of the unimodal encoders; its
    # similarities, mixed with the labels by `distill_alpha`, are the ITC targets; `queue_size` > 0 keeps that
    # many past momentum features as extra negatives
    momentum: float = 0.0
    queue_size: int = 0
    distill_alpha: float = 0.4
    # objective weights (0 switches one off; "caption" needs the decoder, "mim" needs mim)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mim_weight: float = 0.0
    caption_weight: float = 1.0
    mlm_probability: float = 0.15  # of the text tokens: 80% [MASK], 10% random, 10% kept (BERT)
    mim_ratio: float = 0.5  # of the patches
    label_smoothing: float = 0.1  # of the captioning loss (BLIP)

    def __post_init__(self):
        t = self.text
        if self.fusion not in ("cross", "merged"):
            raise ConfigError(f"fusion must be 'cross' or 'merged', not {self.fusion!r}")
        if not 0 <= t.fusion_start < t.layers:
            raise ConfigError(
                f"text.fusion_start must be in [0, text.layers={t.layers}), not {t.fusion_start}"
            )
        if self.fusion == "merged" and t.fusion_start == 0:
            raise ConfigError(
                "fusion='merged' needs text.fusion_start > 0: the layers below it encode text alone"
            )
        if self.fusion == "merged" and self.text_decoder:
            raise ConfigError(
                "the captioning decoder reads the image by cross-attention: fusion='merged' needs text_decoder=false"
            )
        if self.caption_weight and not self.text_decoder:
            raise ConfigError("caption_weight > 0 needs text_decoder=true")
        if self.mim_weight and not self.mim:
            raise ConfigError("mim_weight > 0 needs mim=true")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), not {self.momentum}")
        if self.queue_size and not self.momentum:
            raise ConfigError("queue_size > 0 needs momentum > 0: the queue holds momentum features")
        if not 0 < self.mlm_probability < 1 or not 0 < self.mim_ratio < 1:
            raise ConfigError("mlm_probability and mim_ratio must be in (0, 1)")
        self.vision.mask_token = self.vision.mask_token or self.mim
        self.vision.proj = False  # the tokens go to the fusion layers and `vision_proj`, not a tower head


@dataclass
class FusionOutput:
    image_features: torch.Tensor  # (B, D), L2-normalised
    text_features: torch.Tensor  # (B, D), L2-normalised
    logit_scale: torch.Tensor  # scalar: 1 / temperature
    image_tokens: torch.Tensor  # (B, N, C_vision): what the fusion layers read
    text_hidden: torch.Tensor  # (B, T, C): the text-only pass's tokens (the fusion layers' input)


class PredictionHead(nn.Module):
    """BERT's language-model head: dense -> activation -> norm -> vocabulary (weight tied to the embeddings)."""

    def __init__(self, width: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = get_activation(act)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(x))), embedding, self.bias)


class FusionTextEncoder(nn.Module):
    """Token + position embeddings (normalised), then the layers; see the module docstring."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        t = cfg.text
        self.cfg = t
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.randn(t.context_length, t.width) * 0.02)
        self.ln_embed = nn.LayerNorm(t.width, eps=t.norm_eps)
        cross = cfg.fusion == "cross"
        self.blocks = nn.ModuleList(
            Block(
                t.width,
                t.heads,
                t.mlp_ratio,
                t.act,
                t.norm_eps,
                post_norm=t.post_norm,
                cross_dim=cfg.vision.width if cross and i >= t.fusion_start else None,
                causal_attn=cfg.text_decoder,
            )
            for i in range(t.layers)
        )
        # pre-norm stacks end with a norm; post-norm ones are normalised already
        self.ln_final = nn.Identity() if t.post_norm else nn.LayerNorm(t.width, eps=t.norm_eps)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def embed(self, text: torch.Tensor) -> torch.Tensor:
        T = text.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"text has {T} tokens, more than the context length {self.cfg.context_length}")
        return self.ln_embed(self.token_embedding(text) + self.positional_embedding[:T])  # (B, T, C)

    def run(self, x: torch.Tensor, blocks, **kwargs) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return x


class Fusion(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        t, v = cfg.text, cfg.vision
        self.visual = VisionTransformer(v, cfg.embed_dim)
        self.text = FusionTextEncoder(cfg)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.init_temperature)))
        self.itm_head = nn.Linear(t.width, 2)
        self.lm_head = PredictionHead(t.width, t.vocab_size, t.act, t.norm_eps)
        if (
            cfg.fusion == "merged"
        ):  # image tokens join the text stream at its width, each with a type embedding
            self.image_to_text = nn.Linear(v.width, t.width)
            self.type_embedding = nn.Parameter(torch.zeros(2, t.width))
        else:
            self.image_to_text = self.type_embedding = None
        self.mim_head = nn.Linear(v.width, v.patch_size**2 * 3) if cfg.mim else None
        self.momentum_encoder = None
        if cfg.momentum:
            self.momentum_encoder = nn.ModuleDict(
                {
                    name: copy.deepcopy(getattr(self, name))
                    for name in ("visual", "text", "vision_proj", "text_proj")
                }
            )
            self.momentum_encoder.requires_grad_(False)
        if cfg.queue_size:
            self.register_buffer(
                "image_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=-1)
            )
            self.register_buffer(
                "text_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=-1)
            )
            self.register_buffer(
                "id_queue", torch.full((cfg.queue_size, 2), -1, dtype=torch.long)
            )  # image, caption
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        init_fusion(self)

    # ------------------------------------------------------------------ unimodal

    def attention_mask(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 for real tokens, 0 for padding (the pad id)."""
        return (text != self.cfg.text.pad_token_id).long()

    def encode_image_tokens(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, encoder=None
    ) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + N, C_vision): what the fusion layers and the ITC projection read."""
        return (self if encoder is None else encoder).visual.forward_tokens(images, mask)

    def text_hidden(
        self, text: torch.Tensor, attention_mask: torch.Tensor | None = None, encoder=None
    ) -> torch.Tensor:
        """The text-only pass: (B, T) ids -> (B, T, C). With fusion_start > 0 the layers below it; with 0,
        every layer without its cross-attention. (A pre-norm stack's final norm is not applied here.)"""
        enc = (self if encoder is None else encoder).text
        mask = padding_mask(self.attention_mask(text) if attention_mask is None else attention_mask, False)
        start = self.cfg.text.fusion_start
        return enc.run(enc.embed(text), enc.blocks[: start or None], attn_mask=mask)  # (B, T, C)

    def image_embedding(self, image_tokens: torch.Tensor, encoder=None) -> torch.Tensor:
        return F.normalize((self if encoder is None else encoder).vision_proj(image_tokens[:, 0]), dim=-1)

    def text_embedding(self, text_hidden: torch.Tensor, encoder=None) -> torch.Tensor:
        enc = self if encoder is None else encoder
        return F.normalize(enc.text_proj(enc.text.ln_final(text_hidden[:, 0])), dim=-1)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) ITC image embeddings (always unit norm)."""
        return self.image_embedding(self.encode_image_tokens(images))

    def encode_text(
        self, text: torch.Tensor, normalize: bool = False, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim) ITC text embeddings (always unit norm)."""
        return self.text_embedding(self.text_hidden(text, attention_mask))

    def logit_scale(self) -> torch.Tensor:
        return 1.0 / self.temp.clamp(self.cfg.min_temperature, self.cfg.max_temperature)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> FusionOutput:
        """The unimodal passes and ITC features of a batch of pairs."""
        image_tokens = self.encode_image_tokens(images)
        hidden = self.text_hidden(text)
        return FusionOutput(
            self.image_embedding(image_tokens),
            self.text_embedding(hidden),
            self.logit_scale(),
            image_tokens,
            hidden,
        )

    # ------------------------------------------------------------------ multimodal

    def fuse(
        self,
        text: torch.Tensor,
        image_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The multimodal pass: text (B, T) and image tokens (B, N, C_vision) -> (B, T, C), the fused text
        tokens ([CLS] first). `text_hidden`: the text-only pass of the same text (ALBEF layouts reuse it; BLIP
        re-runs every layer, with [ENC] in place of [CLS] when the config names one)."""
        t, enc = self.cfg.text, self.text
        if attention_mask is None:
            attention_mask = self.attention_mask(text)
        start = t.fusion_start
        if start == 0:
            x = enc.embed(_first_token(text, t.enc_token_id))
        else:
            x = text_hidden if text_hidden is not None else self.text_hidden(text, attention_mask)
        upper = enc.blocks[start:]
        if self.cfg.fusion == "merged":
            image = self.image_to_text(image_tokens) + self.type_embedding[0]  # (B, N, C)
            N = image.shape[1]
            keep = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(-1, N), attention_mask], dim=1)
            both = enc.run(
                torch.cat([image, x + self.type_embedding[1]], dim=1),
                upper,
                attn_mask=padding_mask(keep, False),
            )
            return enc.ln_final(both[:, N:])
        x = enc.run(x, upper, attn_mask=padding_mask(attention_mask, False), context=image_tokens)
        return enc.ln_final(x)

    def itm_logits(
        self,
        text: torch.Tensor,
        image_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 2) image-text matching logits: [no match, match] (BLIP's order)."""
        return self.itm_head(self.fuse(text, image_tokens, attention_mask, text_hidden)[:, 0])

    def mlm_logits(
        self,
        masked_text: torch.Tensor,
        image_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, V) token logits of the multimodal pass over a masked text."""
        return self.lm_head(
            self.fuse(masked_text, image_tokens, attention_mask), self.text.token_embedding.weight
        )

    def decode_hidden(
        self, text: torch.Tensor, image_tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The captioning decoder's final states (B, T, C): causal over the text, reading the image."""
        t, enc = self.cfg.text, self.text
        if not self.cfg.text_decoder:
            raise ConfigError("this fusion model has no decoder (text_decoder=false)")
        text = _first_token(text, t.dec_token_id)
        if attention_mask is None:
            attention_mask = self.attention_mask(text)
        mask = padding_mask(attention_mask, True)
        x = enc.run(enc.embed(text), enc.blocks, attn_mask=mask, context=image_tokens, decoder=True)
        return enc.ln_final(x)

    def decode(
        self, text: torch.Tensor, image_tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) next-token logits of the captioning decoder."""
        return self.lm_head(
            self.decode_hidden(text, image_tokens, attention_mask), self.text.token_embedding.weight
        )

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.transformer.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    # ------------------------------------------------------------------ momentum and queue (ALBEF)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA of the unimodal encoders: momentum <- m * momentum + (1 - m) * online."""
        m = self.cfg.momentum
        for name, target in self.momentum_encoder.items():
            for p_m, p in zip(target.parameters(), getattr(self, name).parameters(), strict=True):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def momentum_features(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.momentum_encoder
        image = self.image_embedding(self.encode_image_tokens(images, encoder=enc), encoder=enc)
        return image, self.text_embedding(self.text_hidden(text, encoder=enc), encoder=enc)

    @torch.no_grad()
    def enqueue(self, image_features: torch.Tensor, text_features: torch.Tensor, ids: torch.Tensor) -> None:
        """Put a (global) batch of momentum features into the queue, overwriting the oldest."""
        n, size = image_features.shape[0], self.cfg.queue_size
        idx = (self.queue_ptr + torch.arange(n, device=ids.device)) % size
        self.image_queue[idx] = image_features.to(self.image_queue.dtype)
        self.text_queue[idx] = text_features.to(self.text_queue.dtype)
        self.id_queue[idx] = ids
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def _first_token(text: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """`text` with its first token replaced by `token_id` (BLIP's [ENC] / [DEC]); unchanged for None."""
    if token_id is None:
        return text
    return torch.cat([torch.full_like(text[:, :1], token_id), text[:, 1:]], dim=1)


@torch.no_grad()
def init_fusion(model: Fusion) -> None:
    """BERT-style init for the text side and heads (normal 0.02, zero biases, unit norms); the ViT keeps
    CLIP's tower init."""
    from vlmkit.models.clip import init_tower

    init_tower(model.visual)
    for m in [
        model.text,
        model.vision_proj,
        model.text_proj,
        model.itm_head,
        model.lm_head,
        model.mim_head,
        model.image_to_text,
    ]:
        if m is None:
            continue
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=0.02)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
    if model.momentum_encoder is not None:
        for name, target in model.momentum_encoder.items():
            target.load_state_dict(getattr(model, name).state_dict())


__all__ = ["Fusion", "FusionConfig", "FusionOutput", "FusionTextConfig", "init_fusion"]
