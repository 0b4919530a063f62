"""Flamingo: a frozen vision tower -> Perceiver resampler -> a decoder LM with gated cross-attention blocks.

    images (B, M, 3, H, W) or frames (B, M, F, 3, H, W) --ViT hidden states--> (B*M, F, N, Dv)
      --Perceiver resampler: L learned latents attend to [frames + time embeddings, latents]--> (B, M, L, Dv)
    ids with one <image> token where each image goes --embed--> blocks of the LM, each n-th one preceded by
      x + tanh(a_attn) * cross_attn(norm(x), the image this token may see), x + tanh(a_mlp) * mlp(norm(x))

Which image a text token sees comes from the ids alone: `count` = how many <image> tokens came up to and
including it; with `media_attention="previous"` the token sees image count - 1 only (Flamingo's choice: a
caption reads its own image), with "all" images 0 .. count - 1; text before the first image sees none (its
cross-attention output is zero, not uniform attention over padding). The gates start at 0, so an untrained
Flamingo equals its language model exactly.

The rows of <image> and <|endofchunk|> live in two small parameters of their own (`new_token_embeds`,
`new_token_head`, copied from the LM's rows at construction) so that with the LM frozen exactly these rows
train, as OpenFlamingo and Idefics do. Parameter names start with `vision_model.`, `perceiver.`,
`gated_cross_attn_layers.`, `new_token_` or `language_model.`; `freeze` freezes parts by those names.
Hugging Face `IdeficsForVisionText2Text` import: vlmkit.convert.idefics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.decoder import Decoder, DecoderConfig, DecoderOutput, right_padded_packing
from vlmkit.models.vit import VisionConfig, VisionTransformer
from vlmkit.nn.attention import CrossAttention
from vlmkit.nn.kv_cache import KVCache
from vlmkit.nn.mlp import SwiGLU, get_activation
from vlmkit.nn.norm import RMSNorm
from vlmkit.nn.packing import Packing

PARTS = ("vision_model", "perceiver", "gated_cross_attn_layers", "new_tokens", "language_model")
MEDIA_ATTENTION = ("previous", "all")


@dataclass
class PerceiverConfig:
    latents: int = 64  # tokens per image handed to the language model
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    act: str = "gelu"  # Idefics: "relu"
    max_frames: int = 1  # learned time embeddings for up to this many frames per media; 0 = none (Idefics)
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("latents", "depth", "heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"perceiver.{name} must be positive, not {getattr(self, name)}")
        if self.max_frames < 0:
            raise ConfigError(f"perceiver.max_frames must be >= 0, not {self.max_frames}")
        get_activation(self.act)


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(proj=False))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # None: the vision tower's tokens go to the cross-attention as they are (Idefics' use_resampler=False)
    perceiver: PerceiverConfig | None = field(default_factory=PerceiverConfig)
    vision_feature_layer: int = -1  # hidden-state index of the tower (-1: the last block, before its norm)
    cross_every: int = 1  # a gated cross-attention block before LM layers 0, n, 2n, ... (Idefics' interval)
    media_attention: str = "previous"  # "previous": the image just before a token; "all": every earlier one
    gate_init: float = 0.0  # the tanh gates' initial value: 0 = the model starts as its language model
    gate_shape: str = "scalar"  # "scalar" (one gate per block) or "vector" (one per channel, Idefics option)
    cross_mlp_hidden: int | None = None  # the gated blocks' SwiGLU hidden size; None = the LM's
    image_token_id: int = 3  # <image>: where an image goes
    chunk_token_id: int = 4  # <|endofchunk|>: the end of an image's text

    def __post_init__(self):
        v, d = self.vision, self.decoder
        if v.proj:
            self.vision = v = dataclasses.replace(v, proj=False)
        if v.patch_dropout:
            raise ConfigError("vision.patch_dropout must be 0 for Flamingo: its vision tower is frozen")
        if not -(v.layers + 1) <= self.vision_feature_layer <= v.layers:
            raise ConfigError(
                f"vision_feature_layer {self.vision_feature_layer} does not exist in a {v.layers}-layer tower"
            )
        if self.cross_every < 1:
            raise ConfigError(f"cross_every must be >= 1, not {self.cross_every}")
        if self.media_attention not in MEDIA_ATTENTION:
            raise ConfigError(f"media_attention must be 'previous' or 'all', not {self.media_attention!r}")
        if self.gate_shape not in ("scalar", "vector"):
            raise ConfigError(f"gate_shape must be 'scalar' or 'vector', not {self.gate_shape!r}")
        if self.cross_mlp_hidden is None:
            self.cross_mlp_hidden = d.mlp_hidden
        for name in ("image_token_id", "chunk_token_id"):
            if not 0 <= getattr(self, name) < d.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is not in the vocabulary of {d.vocab_size}")
        if self.image_token_id == self.chunk_token_id:
            raise ConfigError("image_token_id and chunk_token_id must differ")
        if d.cross_attention_start is not None and d.cross_attention_start < d.layers:
            raise ConfigError(
                "decoder.cross_attention_start: Flamingo's cross-attention is in its own gated blocks"
            )

    @property
    def num_cross_layers(self) -> int:
        return -(-self.decoder.layers // self.cross_every)  # ceil: layers 0, n, 2n, ... below `layers`

    @property
    def new_token_ids(self) -> tuple[int, int]:
        return (self.image_token_id, self.chunk_token_id)


class PerceiverAttention(nn.Module):
    """The latents' queries attend to [media tokens, latents] (Flamingo: latents see themselves too)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.latents_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.output_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, context: Tensor, latents: Tensor) -> Tensor:
        """context (B, N, D), latents (B, L, D) -> (B, L, D)"""
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=1)  # (B, N + L, D)
        B, L, _ = latents.shape

        def heads(x: Tensor) -> Tensor:  # (B, S, h * hd) -> (B, h, S, hd)
            return x.view(B, x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q_proj(latents)), heads(self.k_proj(both)), heads(self.v_proj(both))
        )  # (B, h, L, hd)
        return self.output_proj(y.transpose(1, 2).reshape(B, L, -1))


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.act = get_activation(act)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.attn = PerceiverAttention(dim, cfg.heads, cfg.head_dim, cfg.norm_eps)
        self.mlp = PerceiverMLP(dim, int(dim * cfg.mlp_ratio), cfg.act, cfg.norm_eps)

    def forward(self, context: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(context, latents)
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """Any number of tokens of F frames -> `latents` tokens: (B, F, N, D) -> (B, L, D)."""

    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(cfg.latents, dim))
        self.time_embeds = nn.Parameter(torch.zeros(cfg.max_frames, dim)) if cfg.max_frames else None
        self.blocks = nn.ModuleList([PerceiverBlock(dim, cfg) for _ in range(cfg.depth)])
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        B, Fr, N, D = x.shape
        if self.time_embeds is not None:
            if Fr > self.cfg.max_frames:
                raise DataError(
                    f"{Fr} frames per media but the resampler has time embeddings for {self.cfg.max_frames}; "
                    "sample fewer frames or raise perceiver.max_frames"
                )
            x = x + self.time_embeds[:Fr, None, :]  # (B, F, N, D): a frame's tokens share its time
        context = x.reshape(B, Fr * N, D)
        latents = self.latents.expand(B, -1, -1)  # (B, L, D)
        for block in self.blocks:
            latents = block(context, latents)
        return self.layer_norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(alpha_cross_attn) * cross_attn(norm(x), media) (zero for a token that sees no image), then
    x + tanh(alpha_dense) * mlp(norm(x)). Names as Hugging Face's IdeficsGatedCrossAttentionLayer."""

    def __init__(self, cfg: FlamingoConfig, media_dim: int):
        super().__init__()
        d = cfg.decoder
        self.input_layernorm = RMSNorm(d.width, d.norm_eps)
        self.cross_attn = CrossAttention(d.width, d.heads, d.heads, media_dim, bias=False)
        self.post_attention_layernorm = RMSNorm(d.width, d.norm_eps)
        self.mlp = SwiGLU(d.width, cfg.cross_mlp_hidden, False)
        shape = (1,) if cfg.gate_shape == "scalar" else (1, 1, d.width)
        self.alpha_cross_attn = nn.Parameter(torch.full(shape, float(cfg.gate_init)))
        self.alpha_dense = nn.Parameter(torch.full(shape, float(cfg.gate_init)))

    def forward(
        self,
        x: Tensor,
        media: Tensor | None,
        media_mask: Tensor | None,
        sees_media: Tensor | None,
        cache: KVCache | None,
        index: int,
        packing: Packing | None = None,
    ) -> Tensor:
        """x (B, T, C), or the packed real tokens (N, C) with `packing`; media (B, M*L, Dv) or None (no image
        in the batch: the attention part is skipped); media_mask (B, 1, T, M*L) bool; sees_media (B, T) bool,
        or (N,) with `packing`."""
        if media is not None:
            h = self.cross_attn(self.input_layernorm(x), media, media_mask, cache, index, packing)
            h = h * sees_media[..., None].to(h.dtype)
            x = x + torch.tanh(self.alpha_cross_attn) * h
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


def media_counts(input_ids: Tensor, image_token_id: int, before: Tensor | None = None) -> Tensor:
    """(B, T): how many <image> tokens came up to and including each position (plus `before` (B,), the
    count of earlier cached positions)."""
    count = (input_ids == image_token_id).long().cumsum(dim=1)  # (B, T)
    return count + before[:, None] if before is not None else count


def media_mask(count: Tensor, num_media: int, mode: str) -> Tensor:
    """(B, T, M) bool: may the token at (b, t) see image m? "previous": m == count - 1; "all": m < count.
    A token with count 0 (before the first image) sees none."""
    m = torch.arange(num_media, device=count.device)  # (M,)
    c = count[..., None]  # (B, T, 1)
    return (m == c - 1) if mode == "previous" else (m < c)


class Flamingo(nn.Module):
    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.vision_model = VisionTransformer(v, v.width)
        self.perceiver = PerceiverResampler(v.width, cfg.perceiver) if cfg.perceiver is not None else None
        self.language_model = Decoder(cfg.decoder)
        self.gated_cross_attn_layers = nn.ModuleList(
            [GatedCrossAttentionBlock(cfg, v.width) for _ in range(cfg.num_cross_layers)]
        )
        ids = torch.tensor(cfg.new_token_ids)
        self.new_token_embeds = nn.Parameter(self.language_model.embed_tokens.weight[ids].detach().clone())
        self.new_token_head = nn.Parameter(self.language_model.lm_head.weight[ids].detach().clone())
        self.register_buffer("new_token_id_tensor", ids, persistent=False)

    @torch.no_grad()
    def reset_new_tokens(self) -> None:
        """Copy the LM's rows of <image> and <|endofchunk|> into the trainable copies (after loading an LM)."""
        ids = self.new_token_id_tensor
        self.new_token_embeds.copy_(self.language_model.embed_tokens.weight[ids])
        self.new_token_head.copy_(self.language_model.lm_head.weight[ids])

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings (B, T) -> (B, T, C), the new tokens' rows from `new_token_embeds`."""
        x = self.language_model.embed(input_ids)
        for j, token in enumerate(self.cfg.new_token_ids):
            x = torch.where((input_ids == token)[..., None], self.new_token_embeds[j].to(x.dtype), x)
        return x

    def lm_head(self, h: Tensor) -> Tensor:
        """Final hidden states (..., C) -> logits (..., V), the new tokens' columns from `new_token_head`."""
        # the LM's head with the two rows swapped in: one matmul, so equal rows give bit-equal logits
        weight = self.language_model.lm_head.weight
        weight = weight.index_copy(0, self.new_token_id_tensor, self.new_token_head.to(weight.dtype))
        return F.linear(h, weight)

    def encode_media(self, pixel_values: Tensor, num_media: Tensor | None = None) -> Tensor:
        """Images (B, M, 3, H, W) or frames (B, M, F, 3, H, W) -> media tokens (B, M, L, Dv). With
        `num_media` (B,) only each row's first images are encoded; the padding slots stay zero."""
        if pixel_values.dim() == 5:
            pixel_values = pixel_values[:, :, None]  # one frame each
        if pixel_values.dim() != 6:
            raise DataError(
                f"pixel_values must be (B, M, 3, H, W) or (B, M, F, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        B, M, Fr = pixel_values.shape[:3]
        real = None
        if num_media is not None:
            real = (
                torch.arange(M, device=pixel_values.device)[None] < num_media.to(pixel_values.device)[:, None]
            )
            pixel_values = pixel_values[real]  # (N, F, 3, H, W): the real images only
        n = pixel_values.shape[0] if real is not None else B * M
        x = self.vision_model.forward_hidden(pixel_values.flatten(0, 1 if real is not None else 2),
                                             self.cfg.vision_feature_layer)  # fmt: skip
        x = x.view(n, Fr, *x.shape[1:])  # (n, F, N, Dv)
        x = self.perceiver(x) if self.perceiver is not None else x.flatten(1, 2)  # (n, L, Dv)
        if real is None:
            return x.view(B, M, *x.shape[1:])  # (B, M, L, Dv)
        out = x.new_zeros(B, M, *x.shape[1:])
        out[real] = x
        return out

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len, device=device, dtype=dtype)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        media: Tensor | None = None,
        num_media: Tensor | None = None,
        cache: KVCache | None = None,
        logits: str = "all",
    ) -> DecoderOutput:
        """Decoder outputs for T new tokens (after the `cache.length` cached ones).

        Images come as `pixel_values` (B, M, 3, H, W) / (B, M, F, 3, H, W) or already encoded as `media`
        (B, M, L, Dv); rows with fewer than M images give their count in `num_media` (B,) and the rest of
        their slots is padding. Each row must hold as many <image> tokens as it has images (DataError).
        attention_mask (B, cache.length + T): 1 = real token (right padding to train, left to generate).
        For the loss use `logits="none"` and `next_token_loss(out.hidden, labels, model.lm_head)`.
        """
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        if media is None and pixel_values is not None:
            media = self.encode_media(pixel_values, num_media)
        lm, cfg = self.language_model, self.cfg
        past = cache.length if cache is not None else 0
        count = media_counts(input_ids, cfg.image_token_id, cache.media_count if cache is not None else None)
        if cache is None or past == 0:
            self._check_images(count[:, -1], media, num_media)
        x, rope, mask, is_causal = lm._inputs(None, self.embed(input_ids), attention_mask, None, past)
        # a right-padded training batch: norms, projections and MLPs run on the real tokens only
        packing = right_padded_packing(attention_mask) if cache is None else None
        media_flat = cross_mask = sees = None
        if media is not None:
            B, M, L, Dv = media.shape
            allowed = media_mask(count, M, cfg.media_attention)  # (B, T, M)
            sees = allowed.any(dim=-1)  # (B, T)
            # a token that sees no image attends to all (finite, and its output is zeroed): no NaN rows
            allowed = allowed | ~sees[..., None]
            cross_mask = allowed.repeat_interleave(L, dim=-1)[:, None]  # (B, 1, T, M*L)
            media_flat = media.reshape(B, M * L, Dv).to(x.dtype)
        if packing is not None:
            x, mask, is_causal = packing.pack(x), None, True  # (N, C); real tokens see only real tokens
            sees = packing.pack(sees[..., None]).squeeze(-1) if sees is not None else None  # (N,)
        for i, block in enumerate(lm.layers):
            if i % cfg.cross_every == 0:
                gated = self.gated_cross_attn_layers[i // cfg.cross_every]
                args = (media_flat, cross_mask, sees, cache, i // cfg.cross_every, packing)
                x = self._maybe_checkpoint(gated, x, *args)
            x = self._maybe_checkpoint(block, x, rope, mask, is_causal, cache, i, None, None, packing)
        if cache is not None:
            cache.advance(x.shape[1])
            cache.media_count = count[:, -1]  # (B,) what the next tokens continue from
        h = lm.norm(x)  # (B, T, C), or packed (N, C)
        if packing is not None:
            h = packing.unpack(h)  # (B, T, C), zeros at the padding
        if logits == "none":
            out = None
        else:
            out = self.lm_head(h[:, -1:] if logits == "last" else h)
        return DecoderOutput(logits=out, hidden=h, unimodal=None)

    def _maybe_checkpoint(self, module, x, *args):
        cache = args[3]  # both blocks take the cache fourth after x
        if self.language_model.grad_checkpointing and self.training and cache is None:
            return torch.utils.checkpoint.checkpoint(module, x, *args, use_reentrant=False)
        return module(x, *args)

    def _check_images(self, tokens: Tensor, media: Tensor | None, num_media: Tensor | None) -> None:
        """One line when a row's <image> tokens and its images differ in number."""
        if media is None:
            have = torch.zeros_like(tokens)
        elif num_media is not None:
            have = num_media.to(tokens.device)
        else:
            have = torch.full_like(tokens, media.shape[1])
        bad = (tokens != have).nonzero()
        if len(bad):
            b = int(bad[0, 0])
            raise DataError(
                f"row {b} holds {int(tokens[b])} <image> tokens (id {self.cfg.image_token_id}) but "
                f"{int(have[b])} images: give one image per <image>, in order"
            )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        config=None,
        tokenizer=None,
        streamer=None,
        num_media: Tensor | None = None,
    ) -> Tensor:
        """New token ids (B, N) after left-padded prompts; the images are encoded once, before the prefill.
        Without a `config`, greedy decoding up to 64 tokens that stops at the end token or <|endofchunk|>.
        <image> is never generated: no image could follow it."""
        import dataclasses

        from vlmkit.models.generation import GenerationConfig, generate

        if config is None:
            d = self.cfg.decoder
            config = GenerationConfig(
                eos_token_id=[d.eos_token_id, self.cfg.chunk_token_id], pad_token_id=d.pad_token_id
            )
        if self.cfg.image_token_id not in config.suppress_tokens:  # a generated <image> would have no image
            config = dataclasses.replace(
                config, suppress_tokens=[*config.suppress_tokens, self.cfg.image_token_id]
            )
        media = self.encode_media(pixel_values, num_media) if pixel_values is not None else None
        kwargs = {"media": media} if media is not None else {}
        if num_media is not None:
            kwargs["num_media"] = num_media
        return generate(
            self, input_ids, attention_mask, config=config, tokenizer=tokenizer, streamer=streamer, **kwargs
        )

    def freeze(self, parts: Iterable[str]) -> None:
        """Freeze the named parts (see PARTS) and unfreeze the others. Flamingo's training:
        `freeze(["vision_model", "language_model"])`: the resampler, the gated blocks and the two new token
        rows train."""
        parts = set(parts)
        unknown = parts - set(PARTS)
        if unknown:
            raise ConfigError(f"cannot freeze {sorted(unknown)}: Flamingo's parts are {', '.join(PARTS)}")
        for name in PARTS:
            if name == "new_tokens":
                self.new_token_embeds.requires_grad_(name not in parts)
                self.new_token_head.requires_grad_(name not in parts)
            elif getattr(self, name) is not None:
                getattr(self, name).requires_grad_(name not in parts)

    def unused_parameter_names(self) -> list[str]:
        """Parameters no output depends on: the vision blocks after `vision_feature_layer`, the tower's final
        norm, pooling head and projection; the LM's rows of the new tokens are replaced, but they are rows of
        used matrices, so nothing else."""
        tower = self.vision_model
        num_layers = len(tower.transformer.blocks)
        layer = self.cfg.vision_feature_layer
        used = layer if layer >= 0 else num_layers + 1 + layer
        dead = [f"transformer.blocks.{i}." for i in range(used, num_layers)] + [
            "ln_post.",
            "attn_pool.",
            "proj.",
        ]
        return [f"vision_model.{n}" for n, _ in tower.named_parameters() if n.startswith(tuple(dead))]
