"""LLaVA: vision tower -> projector -> Llama-style decoder, image features spliced in at placeholder tokens.

    image (B, 3, H, W) --ViT, hidden states of layer -2--> (B, 1 + P, Cv) --drop class token--> (B, P, Cv)
      --pixel shuffle s--> (B, P/s^2, s^2 Cv) --projector--> (B, N, C)
    prompt ids with N placeholder ids per image --embed, overwrite placeholders with image features--> decoder

The prompt already holds `num_image_tokens` copies of `image_token_id` per image (`vlmkit.data.chat.render`
expands `<image>`, as Hugging Face's LlavaProcessor does); the model writes the image features over those
positions in order, so one batch may hold any number of images per row. Parameter names start with
`vision_tower.`, `projector.` or `language_model.`, so a training stage freezes parts by name (`freeze`).
Hugging Face `LlavaForConditionalGeneration` import / export: vlmkit.convert.llava.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.decoder import Decoder, DecoderConfig, DecoderOutput
from vlmkit.models.vit import VisionConfig, VisionTransformer
from vlmkit.nn.mlp import get_activation

PARTS = ("vision_tower", "projector", "language_model")


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(proj=False))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Hugging Face's hidden_states index: -2 = the penultimate block's output. Several indices: those layers'
    # tokens concatenated along the channels (Hugging Face's list-valued vision_feature_layer).
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select: str = "patch"  # "patch": drop the class token (HF "default"); "full": keep it
    projector: str = (
        "mlp2x_gelu"  # "mlp2x_gelu": Linear, act, Linear (LLaVA-1.5); "linear": one Linear (LLaVA-1)
    )
    projector_act: str = "gelu"  # the MLP's activation (HF projector_hidden_act)
    projector_bias: bool = True  # HF multimodal_projector_bias
    pixel_shuffle: int = 1  # s > 1 merges each s x s block of patch tokens into one token (s^2 fewer)
    image_token_id: int = (
        3  # the placeholder id; vlmkit tokenizers trained with extra_special_tokens=["<image>"] give 3
    )
    chat_template: str = "vicuna"  # vlmkit.data.chat.TEMPLATES
    # Video: a clip is its frames as consecutive images, each frame's tokens plus a learned embedding of its
    # position in the clip (`projector.frame_embedding`, this many positions; 0 = a model of still images)
    max_frames: int = 0

    def __post_init__(self):
        from vlmkit.data.chat import TEMPLATES

        v, d = self.vision, self.decoder
        if v.proj:  # LLaVA reads the tower's hidden states; its projection to a joint embedding has no use
            self.vision = v = dataclasses.replace(v, proj=False)
        if v.patch_dropout:
            raise ConfigError(
                "vision.patch_dropout must be 0 for LLaVA: every image token has a placeholder in the prompt"
            )
        if self.vision_feature_select not in ("patch", "full"):
            raise ConfigError(
                f"vision_feature_select must be 'patch' or 'full', not {self.vision_feature_select!r}"
            )
        if self.vision_feature_select == "patch" and not v.class_token:
            raise ConfigError(
                "vision_feature_select='patch' drops the class token, but the vision tower has none; use 'full'"
            )
        if isinstance(self.vision_feature_layer, list | tuple):
            layers = tuple(self.vision_feature_layer)
            if not layers:
                raise ConfigError("vision_feature_layer: give one layer index or a non-empty list of them")
            self.vision_feature_layer = layers[0] if len(layers) == 1 else layers
        for layer in self.feature_layers:
            if not -(v.layers + 1) <= layer <= v.layers:
                raise ConfigError(
                    f"vision_feature_layer {layer} does not exist in a {v.layers}-layer vision tower"
                )
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise ConfigError(f"projector must be 'mlp2x_gelu' or 'linear', not {self.projector!r}")
        get_activation(self.projector_act)  # ConfigError for an unknown name
        s = self.pixel_shuffle
        if not isinstance(s, int) or s < 1:
            raise ConfigError(f"pixel_shuffle must be an integer >= 1, got {s!r}")
        if v.grid_size % s:
            raise ConfigError(f"pixel_shuffle {s} does not divide the {v.grid_size}x{v.grid_size} patch grid")
        if s > 1 and self.vision_feature_select == "full" and v.class_token:
            raise ConfigError(
                "pixel_shuffle > 1 cannot merge the class token; use vision_feature_select='patch'"
            )
        if not 0 <= self.image_token_id < d.vocab_size:
            raise ConfigError(
                f"image_token_id {self.image_token_id} is not in the decoder's vocabulary of {d.vocab_size}"
            )
        if d.cross_attention_start is not None and d.cross_attention_start < d.layers:
            raise ConfigError(
                "decoder.cross_attention_start: LLaVA's decoder reads images as tokens, not by cross-attention"
            )
        if not isinstance(self.max_frames, int) or self.max_frames < 0:
            raise ConfigError(f"max_frames must be an integer >= 0, got {self.max_frames!r}")
        if self.chat_template not in TEMPLATES:
            raise ConfigError(
                f"unknown chat_template {self.chat_template!r}; choose one of {sorted(TEMPLATES)}"
            )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """`vision_feature_layer` as a tuple of hidden-state indices."""
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, tuple | list) else (layer,)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image at the configured image size."""
        full = self.vision_feature_select == "full" and self.vision.class_token
        return self.vision.grid_size**2 // self.pixel_shuffle**2 + int(full)


def pixel_shuffle(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """Merge each s x s block of a (gh x gw, row-major) token grid into one token: (B, gh*gw, C) ->
    (B, gh/s * gw/s, s*s*C), channels ordered (row in block, column in block, C)."""
    B, N, C = x.shape
    gh, gw = grid
    if gh % s or gw % s:
        raise ConfigError(f"pixel_shuffle {s} does not divide the {gh}x{gw} patch grid of these images")
    x = x.view(B, gh // s, s, gw // s, s, C)  # (B, gh/s, s, gw/s, s, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, gh/s, gw/s, s, s, C): each block's tokens side by side
    return x.reshape(B, (gh // s) * (gw // s), s * s * C)


class Projector(nn.Module):
    """Vision features -> decoder width. Names as Hugging Face's LlavaMultiModalProjector (linear_1, linear_2);
    with `max_frames`, also the frames' position embeddings (video models)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str, act: str, bias: bool, max_frames: int = 0):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = get_activation(act) if kind == "mlp2x_gelu" else None
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias) if kind == "mlp2x_gelu" else None
        self.frame_embedding = nn.Parameter(torch.randn(max_frames, out_dim) * 0.02) if max_frames else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.vision_tower = VisionTransformer(v, v.width)
        self.projector = Projector(
            v.width * len(cfg.feature_layers) * cfg.pixel_shuffle**2,
            cfg.decoder.width,
            cfg.projector,
            cfg.projector_act,
            cfg.projector_bias,
            cfg.max_frames,
        )
        self.language_model = Decoder(cfg.decoder)

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.num_image_tokens

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> projected image tokens (B, N, decoder width)."""
        cfg = self.cfg
        x = self.vision_tower.forward_hidden(pixel_values, cfg.feature_layers)  # (B, prefix + P, L * Cv)
        if cfg.vision_feature_select == "patch":
            x = x[:, self.vision_tower.num_prefix_tokens :]  # (B, P, Cv)
        if cfg.pixel_shuffle > 1:
            p = cfg.vision.patch_size
            grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
            x = pixel_shuffle(x, grid, cfg.pixel_shuffle)  # (B, P/s^2, s^2 Cv)
        return self.projector(x)  # (B, N, C)

    def embed_inputs(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        frame_index: Tensor | None = None,
        time_pool: str | None = None,
    ) -> Tensor:
        """Token embeddings (B, T, C) with the image placeholders overwritten by the images' tokens, in order.

        Video: `frame_index` (I,) gives each image its position in its clip (0, 1, ... ; -1 for a still image):
        frame positions get their embedding added, and a run starting at 0 is one clip. `time_pool="mean"`
        replaces every frame's tokens by the clip's mean (the order-blind control of `vlmkit.eval.video`).
        DataError when the number of placeholders differs from (number of images) x num_image_tokens.
        """
        x = self.language_model.embed(input_ids)  # (B, T, C)
        placeholders = input_ids == self.cfg.image_token_id  # (B, T)
        images = self.encode_images(pixel_values) if pixel_values is not None else None  # (I, N, C)
        num_features = 0 if images is None else images.shape[0] * images.shape[1]
        num_placeholders = int(placeholders.sum())
        if num_placeholders != num_features:
            num_images = 0 if images is None else images.shape[0]
            raise DataError(
                f"input_ids hold {num_placeholders} image placeholder tokens (id {self.cfg.image_token_id}) but "
                f"{num_images} images give {num_features} image tokens ({self.num_image_tokens} per image); "
                "render prompts with the model's num_image_tokens"
            )
        if images is None:
            return x
        if frame_index is not None:
            images = self._add_frame_positions(images, frame_index.to(images.device), time_pool)
        return x.masked_scatter(placeholders[..., None], images.to(x.dtype))  # (B, T, C)

    def _add_frame_positions(self, images: Tensor, frame_index: Tensor, time_pool: str | None) -> Tensor:
        table = self.projector.frame_embedding
        is_frame = frame_index >= 0
        if bool(is_frame.any()) and table is None:
            raise ConfigError(
                "this LLaVA model reads still images only (max_frames=0); it cannot take video frames"
            )
        if not bool(is_frame.any()):
            return images  # still images only
        if bool((frame_index >= table.shape[0]).any()):
            raise DataError(f"a clip of {int(frame_index.max()) + 1} frames; this model knows {table.shape[0]} "
                            "frame positions (max_frames): sample fewer frames")  # fmt: skip
        if time_pool == "mean":  # each clip's frames replaced by their mean, before the positions are added
            clip = torch.cumsum((frame_index == 0).long(), 0) - 1  # (I,) which clip each image belongs to
            clip = torch.where(is_frame, clip, -1)
            out = images.clone()
            for c in clip[is_frame].unique().tolist():
                rows = clip == c
                out[rows] = images[rows].mean(0, keepdim=True)
            images = out
        elif time_pool is not None:
            raise ConfigError(f"time_pool must be None or 'mean', not {time_pool!r}")
        pos = table[frame_index.clamp(min=0)] * is_frame[:, None]  # (I, C); zero for still images
        return images + pos[:, None].to(images.dtype)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        logits: str = "all",
        frame_index: Tensor | None = None,
    ) -> DecoderOutput:
        """Decoder outputs for prompts whose image placeholders are already expanded (see module docstring).

        attention_mask (B, T): 1 = real token, 0 = padding (right padding for training). For the loss, use
        `logits="none"` and `vlmkit.losses.captioning.next_token_loss(out.hidden, labels, model.language_model.lm_head)`.
        """
        x = self.embed_inputs(input_ids, pixel_values, frame_index)  # (B, T, C)
        return self.language_model(inputs_embeds=x, attention_mask=attention_mask, logits=logits)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        config=None,
        tokenizer=None,
        streamer=None,
        frame_index: Tensor | None = None,
        time_pool: str | None = None,
    ) -> Tensor:
        """New token ids (B, N) after left-padded prompts (see vlmkit.models.generation.generate).

        Without a `config`, greedy decoding up to 64 tokens that stops at the decoder's end token.
        """
        from vlmkit.models.generation import GenerationConfig, generate

        if config is None:
            d = self.cfg.decoder
            config = GenerationConfig(eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id)
        x = self.embed_inputs(input_ids, pixel_values, frame_index, time_pool)  # (B, T, C)
        return generate(
            self.language_model,
            attention_mask=attention_mask,
            inputs_embeds=x,
            config=config,
            tokenizer=tokenizer,
            streamer=streamer,
        )

    def unused_parameter_names(self) -> list[str]:
        """Vision-tower parameters no output depends on: the blocks after `vision_feature_layer` and the
        tower's final norm and pooling head. The trainer freezes them (DDP requires every trained parameter
        to get a gradient)."""
        tower = self.vision_tower
        num_layers = len(tower.transformer.blocks)
        used = max(layer if layer >= 0 else num_layers + 1 + layer for layer in self.cfg.feature_layers)
        dead = [f"transformer.blocks.{i}." for i in range(used, num_layers)] + [
            "ln_post.",
            "attn_pool.",
            "proj.",
        ]
        return [f"vision_tower.{n}" for n, _ in tower.named_parameters() if n.startswith(tuple(dead))]

    def freeze(self, parts: Iterable[str]) -> None:
        """Freeze the named parts ("vision_tower", "projector", "language_model") and unfreeze the others:
        LLaVA stage 1 is `freeze(["vision_tower", "language_model"])`, stage 2 `freeze(["vision_tower"])`."""
        parts = set(parts)
        unknown = parts - set(PARTS)
        if unknown:
            raise ConfigError(f"cannot freeze {sorted(unknown)}: LLaVA's parts are {', '.join(PARTS)}")
        for name in PARTS:
            getattr(self, name).requires_grad_(name not in parts)
