"""CoCa (Contrastive Captioner, Yu et al. 2022): a dual encoder whose text tower is also a captioner.

    images -> VisionTransformer -> pooled -> proj ------------------------------> image embedding
                              \\-> all tokens (-> attentional pooler) -> memory --.
    tokens -> Decoder layers [0, k): causal text encoder, no image ---+--> at the first end token -> norm
              |                                                       |   -> text_proj -> text embedding
              '-> Decoder layers [k, L): also cross-attend to memory -'--> norm -> lm_head -> caption logits

The text side is ONE Llama-style `Decoder` whose layers from `cross_attention_start` = k on cross-attend to
the image tokens; one KV cache therefore covers both halves during generation. Layers below k never see
the image, so the text embedding is a function of the text alone (retrieval, zero-shot classification).
`forward` returns features and hidden states; the loss (contrastive + captioning) is `vlmkit.losses.CoCaLoss`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.clip import CLIP, CLIPOutput, init_tower
from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.generation import GenerationConfig, generate
from vlmkit.models.vit import VisionConfig, VisionTransformer
from vlmkit.nn.norm import RMSNorm
from vlmkit.nn.pool import AttentionPool


@dataclass
class CoCaConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    # cross_attention_start = the number of unimodal (text-only) layers; the rest are multimodal
    decoder: DecoderConfig = field(
        default_factory=lambda: DecoderConfig(vocab_size=8192, cross_attention_start=4)
    )
    image_queries: int = 0  # > 0: an attentional pooler turns the image tokens into this many (CoCa's 256)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    caption_loss_weight: float = 2.0
    contrastive_loss_weight: float = 1.0

    def __post_init__(self):
        start, layers = self.decoder.cross_attention_start, self.decoder.layers
        if start is None or not 1 <= start < layers:
            raise ConfigError(
                f"decoder.cross_attention_start must be in [1, decoder.layers={layers}) for CoCa "
                f"(unimodal text layers below it, multimodal layers from it), not {start}"
            )
        if not self.vision.proj and self.vision.width != self.embed_dim:
            raise ConfigError(
                f"vision.proj=false needs vision.width ({self.vision.width}) == embed_dim ({self.embed_dim})"
            )
        if self.image_queries < 0:
            raise ConfigError(
                f"image_queries must be >= 0 (0 = use every image token), not {self.image_queries}"
            )
        if self.image_queries and self.decoder.encoder_width % self.decoder.heads:
            raise ConfigError(
                f"the attentional pooler needs decoder.encoder_width ({self.decoder.encoder_width}) "
                f"divisible by decoder.heads ({self.decoder.heads})"
            )


@dataclass
class CoCaOutput(CLIPOutput):
    # image_features, text_features (B, D) L2-normalised; logit_scale; logit_bias (None): as CLIPOutput
    hidden: torch.Tensor  # (B, T, C) decoder output after its final norm: the captioning loss's input


class CoCa(nn.Module):
    def __init__(self, cfg: CoCaConfig):
        super().__init__()
        self.cfg = cfg
        vision, dec = cfg.vision, cfg.decoder
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        # The decoder cross-attends to memory of width encoder_width: the pooler maps to it, or a linear
        # map when the image tokens have another width.
        self.image_pool = (
            AttentionPool(
                dec.encoder_width,
                dec.heads,
                num_queries=cfg.image_queries,
                context_dim=vision.width,
                norm_inputs=True,
                norm_output=True,
                eps=vision.norm_eps,
                query_std=dec.encoder_width**-0.5,
            )
            if cfg.image_queries
            else None
        )
        self.image_token_proj = (
            nn.Linear(vision.width, dec.encoder_width, bias=False)
            if not cfg.image_queries and vision.width != dec.encoder_width
            else None
        )
        self.decoder = Decoder(dec)
        self.text_norm = RMSNorm(dec.width, dec.norm_eps)  # the unimodal output is not normed
        self.text_proj = nn.Linear(dec.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None  # CLIP's softmax loss: a shared bias would cancel
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The image tower as CLIP's, the decoder by itself, the text projection like CLIP's."""
        init_tower(self.visual)
        nn.init.normal_(self.text_proj.weight, std=self.cfg.decoder.width**-0.5)
        if self.image_token_proj is not None:
            nn.init.normal_(self.image_token_proj.weight, std=self.cfg.vision.width**-0.5)

    # The logit scale is CLIP's: learnable, exp'd, clamped at max_logit_scale.
    scale_and_bias = CLIP.scale_and_bias

    # ---------------------------------------------------------------- image side

    def _memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT output tokens (B, N, Cv) -> what the multimodal layers cross-attend to (B, N or Q, C_enc)."""
        if self.image_pool is not None:
            return self.image_pool(tokens)  # (B, Q, C_enc)
        if self.image_token_proj is not None:
            return self.image_token_proj(tokens)  # (B, N, C_enc)
        return tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image embeddings."""
        x = self.visual(images)  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the memory the caption decoder cross-attends to: (B, N, C_enc)."""
        return self._memory(self.visual.forward_tokens(images))

    # ---------------------------------------------------------------- text side

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of each row's first end-of-text token; rows without one use the last position."""
        is_eos = input_ids == self.cfg.decoder.eos_token_id  # (B, T)
        return torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), input_ids.shape[1] - 1)  # (B,)

    def _text_embedding(self, unimodal: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Unimodal outputs (B, T, C) read at the end token, normed and projected: (B, D)."""
        rows = torch.arange(unimodal.shape[0], device=unimodal.device)
        return self.text_proj(self.text_norm(unimodal[rows, self.pool_index(input_ids)]))  # (B, D)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, normalize: bool = False
    ) -> torch.Tensor:
        """(B, T) token ids `[bos] text [eos] pad...` -> (B, embed_dim) text embeddings (unimodal layers only)."""
        # The layers are causal, so nothing after the last end token can change the result: drop it.
        keep = int(self.pool_index(input_ids).max()) + 1
        input_ids = input_ids[:, :keep]
        attention_mask = attention_mask[:, :keep] if attention_mask is not None else None
        unimodal = self.decoder.forward_unimodal(input_ids, attention_mask=attention_mask)  # (B, T, C)
        x = self._text_embedding(unimodal, input_ids)
        return F.normalize(x, dim=-1) if normalize else x

    # ---------------------------------------------------------------- both

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> CoCaOutput:
        """Images (B, 3, H, W) and their texts (B, T) -> normalised embeddings and the decoder's hidden
        states (B, T, C) for the captioning loss (`CoCaLoss`, with `self.decoder.lm_head`)."""
        tokens = self.visual.forward_tokens(images)  # (B, N, Cv): the ViT runs once for both uses
        image_features = F.normalize(self.visual.pool(tokens), dim=-1)  # (B, D)
        out = self.decoder(
            input_ids, attention_mask=attention_mask, encoder_states=self._memory(tokens), logits="none"
        )
        text_features = F.normalize(self._text_embedding(out.unimodal, input_ids), dim=-1)  # (B, D)
        scale, bias = self.scale_and_bias()
        return CoCaOutput(image_features, text_features, scale, bias, hidden=out.hidden)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        tokenizer=None,
        streamer=None,
    ) -> torch.Tensor:
        """Captions (or continuations of the prompts `input_ids` (B, T), left-padded) for images (B, 3, H, W).

        `input_ids` None prompts with the start token alone. The end and pad tokens default to the
        decoder's. Returns the new tokens only, (B, N) (see `vlmkit.models.generation.generate`).
        """
        dec = self.cfg.decoder
        config = config or GenerationConfig()
        if config.eos_token_id is None or config.pad_token_id is None:
            config = dataclasses.replace(
                config,
                eos_token_id=dec.eos_token_id if config.eos_token_id is None else config.eos_token_id,
                pad_token_id=dec.pad_token_id if config.pad_token_id is None else config.pad_token_id,
            )
        if input_ids is None:
            if dec.bos_token_id is None:
                raise ConfigError("this CoCa has no decoder.bos_token_id: pass input_ids as the prompt")
            input_ids = torch.full((len(pixel_values), 1), dec.bos_token_id, device=pixel_values.device)
        memory = self.image_tokens(pixel_values)  # (B, N, C_enc): once; the cache keeps its cross k/v
        return generate(
            self.decoder,
            input_ids,
            attention_mask,
            config=config,
            tokenizer=tokenizer,
            streamer=streamer,
            encoder_states=memory,
        )

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.transformer.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable


__all__ = ["CoCa", "CoCaConfig", "CoCaOutput"]
