"""Text transformer: tokens -> +positions -> (causal) blocks -> final norm -> pool -> project."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.nn.packing import Packing
from vlmkit.nn.transformer import Transformer, padding_mask


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True  # CLIP's text tower is causal; SigLIP's is bidirectional
    # "eot" (first end-of-text token, as CLIP), "last" (SigLIP), "first", or "argmax": the largest id, which
    # is the end token in OpenAI's vocabulary; Hugging Face pools legacy CLIP configs (eos_token_id 2) this way
    pool: str = "eot"
    eot_token_id: int = 2
    pad_token_id: int = 0
    proj: bool = True
    proj_bias: bool = False  # SigLIP's text head has a bias

    def __post_init__(self):
        if self.pool not in ("eot", "last", "first", "argmax"):
            raise ConfigError(f"text.pool must be 'eot', 'last', 'first' or 'argmax', not {self.pool!r}")


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, output_dim, bias=cfg.proj_bias) if cfg.proj else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def embed(self, text: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings: the blocks' input (B, T, width)."""
        T = text.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"text has {T} tokens, more than the context length {self.cfg.context_length}")
        return self.token_embedding(text) + self.positional_embedding[:T]  # (B, T, C)

    def _mask(self, attention_mask: torch.Tensor | None) -> dict:
        if attention_mask is None:
            # Causal CLIP needs no padding mask: pooling reads the end-of-text token, which never sees padding.
            return {"is_causal": self.cfg.causal}
        return {"attn_mask": padding_mask(attention_mask, self.cfg.causal)}

    def forward_tokens(self, text: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: (B, T, width)."""
        return self.ln_final(self.transformer(self.embed(text), **self._mask(attention_mask)))

    def pool_index(self, text: torch.Tensor) -> torch.Tensor:
        """The token each row is pooled at: (B,) indices."""
        B, T = text.shape
        if self.cfg.pool == "first":
            return torch.zeros(B, dtype=torch.long, device=text.device)
        if self.cfg.pool == "last":
            return torch.full((B,), T - 1, dtype=torch.long, device=text.device)
        if self.cfg.pool == "argmax":
            return text.argmax(dim=1)  # (B,), the first of equal maxima
        # Index of the first end-of-text token; rows without one (over-long, truncated badly) use the last.
        is_eot = text == self.cfg.eot_token_id  # (B, T)
        return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), T - 1)  # (B,)

    def pool(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Read the pooled token out of all output tokens `x` (B, T, C): (B, C)."""
        return x[torch.arange(x.shape[0], device=x.device), self.pool_index(text)]

    def forward(self, text: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        index = self.pool_index(text)
        if self.cfg.causal and text.shape[1] > 1:
            # A causal tower's token i sees only tokens 0..i, so nothing after the last pooled position can
            # change the result: drop that padding. Captions padded to the context length get much cheaper.
            keep = int(index.max()) + 1
            if keep < text.shape[1]:
                text = text[:, :keep]
                attention_mask = attention_mask[:, :keep] if attention_mask is not None else None
        # Only one token per row is read out, so the last block runs its query and MLP for it alone.
        x = self.embed(text)  # (B, T, C)
        packing = None
        if self.cfg.causal and attention_mask is None and text.shape[1] > 1:
            # Captions of different lengths: each row's tokens up to its pooled one, packed without padding
            # (the per-token layers skip the padding; attention unpacks). Same features and gradients.
            packing = Packing.maybe(index + 1, text.shape[1])
        if packing is not None:
            x = self.transformer(packing.pack(x), is_causal=True, index=index, packing=packing)
        else:
            x = self.transformer(x, index=index, **self._mask(attention_mask))
        pooled = self.ln_final(x)  # (B, C)
        return self.proj(pooled) if self.proj is not None else pooled  # (B, D)
