"""Learned prompts over a frozen dual encoder: CoOp (Zhou et al. 2022) and CoCoOp (Zhou et al. 2022b).

Each class's text is `[start] ctx_1 .. ctx_M <class name> . [end]` (the class name at the end, in the middle of
the context, or at the front), where ctx are M learnable vectors in the text tower's token-embedding space, shared
by all classes or one set per class. Only they (and CoCoOp's meta-network) train; the dual encoder stays frozen.
CoCoOp adds a small meta-network, Linear -> ReLU -> Linear (width / 16 hidden), that maps each image's embedding
to a vector added to every context token: the prompts then depend on the image, and the text tower runs for every
image x class pair.

    learner = PromptLearner(clip, tokenizer, ["red circle", "blue star"], PromptConfig(n_ctx=4))
    logits = learner(image_features)          # (B, C): unit-norm image embeddings in, scaled cosines out
    new = learner.with_classes(["green square"])   # the same shared context on other classes (base-to-new)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError


@dataclass
class PromptConfig:
    n_ctx: int = 16  # learnable context vectors (ignored when `init` sets them)
    init: str = ""  # e.g. "a photo of a": the context starts as these words' embeddings (n_ctx = their count)
    position: str = "end"  # where the class name goes: "end", "middle" or "front"
    per_class: bool = False  # one context per class (CoOp's class-specific context) instead of one shared
    meta_net: bool = False  # CoCoOp: image-conditioned context

    def __post_init__(self):
        if self.position not in ("end", "middle", "front"):
            raise ConfigError(f"prompt position must be 'end', 'middle' or 'front', not {self.position!r}")
        if self.n_ctx < 1 and not self.init:
            raise ConfigError("a prompt needs at least one context vector (n_ctx >= 1)")
        if self.per_class and self.meta_net:
            raise ConfigError(
                "CoCoOp's meta-network conditions one shared context; per_class=true is CoOp only"
            )


class PromptLearner(nn.Module):
    def __init__(
        self, clip, tokenizer, classnames: list[str], cfg: PromptConfig | None = None, _ctx=None, _meta=None
    ):
        super().__init__()
        self.cfg = cfg = cfg or PromptConfig()
        self.clip, self.tokenizer, self.classnames = clip, tokenizer, list(classnames)
        for p in clip.parameters():
            p.requires_grad_(False)
        text = clip.text
        width = text.cfg.width
        init_ids = tokenizer.encode(cfg.init) if cfg.init else []
        self.n_ctx = len(init_ids) or cfg.n_ctx
        ids, positions = self._layout(
            tokenizer, self.classnames, self.n_ctx, cfg.position, text.cfg.context_length
        )
        self.register_buffer("ids", ids, persistent=False)  # (C, T)
        self.register_buffer("positions", positions, persistent=False)  # (C, M)
        if _ctx is not None:
            self.ctx = _ctx
        else:
            with torch.no_grad():
                if init_ids:
                    start = text.token_embedding.weight[torch.tensor(init_ids)].clone()  # (M, w)
                else:
                    start = torch.randn(self.n_ctx, width) * 0.02  # CoOp's init
                if cfg.per_class:
                    start = start.expand(len(self.classnames), -1, -1).clone()  # (C, M, w)
            self.ctx = nn.Parameter(start)
        if _meta is not None:
            self.meta_net = _meta
        elif cfg.meta_net:
            d = clip.cfg.embed_dim
            self.meta_net = nn.Sequential(
                nn.Linear(d, max(1, d // 16)), nn.ReLU(), nn.Linear(max(1, d // 16), width)
            )
        else:
            self.meta_net = None

    @staticmethod
    def _layout(tokenizer, classnames, M, position, context_length) -> tuple[Tensor, Tensor]:
        """Token ids (C, T) with placeholders where the context goes, and those positions (C, M)."""
        sot, eot, pad = tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.pad_token_id
        rows, where = [], []
        for name in classnames:
            name_ids = tokenizer.encode(name)
            if not name_ids:
                raise ConfigError(f"class name {name!r} has no tokens")
            # the full stop as the tokenizer sees it after a word (alone, it may get a leading-space token)
            with_dot = tokenizer.encode(name + ".")
            dot = (
                with_dot[len(name_ids) :] if with_dot[: len(name_ids)] == name_ids else tokenizer.encode(".")
            )
            head = [sot] if sot is not None else []
            half = M // 2
            if position == "end":
                body, ctx_at = [pad] * M + name_ids, list(range(M))
            elif position == "front":
                body, ctx_at = name_ids + [pad] * M, list(range(len(name_ids), len(name_ids) + M))
            else:
                body = [pad] * half + name_ids + [pad] * (M - half)
                ctx_at = list(range(half)) + list(range(half + len(name_ids), len(name_ids) + M))
            row = head + body + dot + [eot]
            if len(row) > context_length:
                raise ConfigError(
                    f"class {name!r} with {M} context vectors needs {len(row)} tokens; the text tower has "
                    f"{context_length}: use fewer context vectors or a shorter name"
                )
            rows.append(row + [pad] * (context_length - len(row)))
            where.append([len(head) + i for i in ctx_at])
        return torch.tensor(rows), torch.tensor(where)

    def with_classes(self, classnames: list[str]) -> PromptLearner:
        """The same learned context on other classes (base-to-new); needs a shared context."""
        if self.cfg.per_class:
            raise ConfigError("a per-class context does not transfer to new classes; learn a shared one")
        return PromptLearner(
            self.clip, self.tokenizer, classnames, self.cfg, _ctx=self.ctx, _meta=self.meta_net
        )

    def text_features(self, image_features: Tensor | None = None) -> Tensor:
        """Unit-norm class embeddings: (C, D), or (B, C, D) with CoCoOp's image-conditioned context."""
        text = self.clip.text
        C, T = self.ids.shape
        x = text.token_embedding(self.ids)  # (C, T, w)
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(C, -1, -1)  # (C, M, w)
        B = 1
        if self.meta_net is not None:
            if image_features is None:
                raise ValueError("CoCoOp's prompts depend on the image: pass image_features")
            bias = self.meta_net(image_features.float())  # (B, w)
            B = bias.shape[0]
            ctx = ctx[None] + bias[:, None, None, :]  # (B, C, M, w)
            x = x[None].expand(B, -1, -1, -1)
        rows = torch.arange(C, device=x.device)[:, None]
        x = x.clone()
        x[..., rows, self.positions, :] = ctx.to(x.dtype)  # the context replaces the placeholders
        x = x.reshape(B * C, T, -1) + text.positional_embedding[:T]
        ids = self.ids.repeat(B, 1)  # (B*C, T)
        mask = text._mask(None)
        pooled = text.ln_final(text.transformer(x, index=text.pool_index(ids), **mask))  # (B*C, w)
        emb = text.proj(pooled) if text.proj is not None else pooled
        emb = F.normalize(emb.float(), dim=-1)
        return emb.view(B, C, -1) if self.meta_net is not None else emb

    def forward(self, image_features: Tensor) -> Tensor:
        """Unit-norm image embeddings (B, D) -> logits (B, C), the CLIP's scale times the cosines."""
        scale = self.clip.logit_scale.exp().clamp(max=100.0)
        t = self.text_features(image_features)
        if t.dim() == 2:
            return scale * image_features.float() @ t.T
        return scale * torch.einsum("bd,bcd->bc", image_features.float(), t)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [self.ctx]
        if self.meta_net is not None:
            params += list(self.meta_net.parameters())
        return params


__all__ = ["PromptConfig", "PromptLearner"]
