"""One attention pool: learned queries cross-attend to a sequence of tokens and summarise it.

Two models use it in two shapes:
- SigLIP's MAP head (`AttentionPool(dim, heads, mlp_ratio=4)`): one query, then a residual MLP; the pooled
  image embedding.
- CoCa's attentional pooler (`AttentionPool(dim, heads, num_queries=N, context_dim=D, norm_inputs=True,
  norm_output=True)`): N queries over image tokens of another width, normed in and out; a fixed number of
  memory tokens for the decoder whatever the image size.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.nn.attention import attention
from vlmkit.nn.mlp import MLP


class AttentionPool(nn.Module):
    """(B, N, context_dim) tokens -> (B, num_queries, dim). Parameters: `query` (1, num_queries, dim); `q`, `kv`
    and `proj` projections; optional `ln_q`/`ln_k` (normed queries and tokens), `norm` + `mlp` (a residual
    MLP after the attention), `ln_post` (a final norm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_queries: int = 1,
        context_dim: int | None = None,
        mlp_ratio: float = 0.0,
        act: str = "gelu_tanh",
        norm_inputs: bool = False,
        norm_output: bool = False,
        eps: float = 1e-6,
        query_std: float = 0.02,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention pool width {dim} is not divisible by its {num_heads} heads")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * query_std)
        self.ln_q = nn.LayerNorm(dim, eps=eps) if norm_inputs else None
        self.ln_k = nn.LayerNorm(context_dim, eps=eps) if norm_inputs else None
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps) if mlp_ratio else None
        self.mlp = MLP(dim, int(dim * mlp_ratio), act) if mlp_ratio else None
        self.ln_post = nn.LayerNorm(dim, eps=eps) if norm_output else None
        self._register_load_state_dict_pre_hook(_legacy_probe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        _, Q, C = self.query.shape
        nh, hs = self.num_heads, C // self.num_heads
        query = self.ln_q(self.query) if self.ln_q is not None else self.query
        q = self.q(query).view(1, Q, nh, hs).transpose(1, 2).expand(B, -1, -1, -1)  # (B, nh, Q, hs)
        x = self.ln_k(x) if self.ln_k is not None else x
        k, v = (t.view(B, N, nh, hs).transpose(1, 2) for t in self.kv(x).split(C, dim=-1))  # (B, nh, N, hs)
        y = self.proj(attention(q, k, v).transpose(1, 2).reshape(B, Q, C))  # (B, Q, C)
        if self.mlp is not None:
            y = y + self.mlp(self.norm(y))
        return self.ln_post(y) if self.ln_post is not None else y


def _legacy_probe(state_dict, prefix, *args) -> None:
    """Model folders saved before the two pools became one call SigLIP's query `probe`; CoCa's was 2-D."""
    if prefix + "probe" in state_dict:
        state_dict[prefix + "query"] = state_dict.pop(prefix + "probe")
    query = state_dict.get(prefix + "query")
    if query is not None and query.ndim == 2:
        state_dict[prefix + "query"] = query[None]


__all__ = ["AttentionPool"]
