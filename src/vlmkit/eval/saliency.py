"""Saliency from attention: attention rollout (Abnar & Zuidema 2020) and gradient-weighted relevance (Chefer et al.
2021), from the maps `vlmkit.nn.attention.record_attention` collects.

- rollout: each layer's head-averaged attention A mixed with the residual path, A' = (A + I) / 2, its **rows**
  renormalised to sum to 1 (A' stays a row-stochastic "where does this token read from" matrix; normalising
  the columns instead is a known bug of a popular implementation), multiplied from the first layer to the last:
  R = A'_L ... A'_1; the pooled token's row of R says how much each input token flows into it.
- relevance: R = I, then for each layer in order R <- R + mean_heads(max(dA * A, 0)) @ R, where dA is the
  gradient of the explained score (e.g. an image-text similarity) with respect to that layer's attention.

A last block computed for the pooled token alone records a (B, nh, 1, T) map: it is taken as that token's row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _square(maps: list[Tensor], index: int) -> list[Tensor]:
    """Head-averaged (B, T, T) maps, a pooled-only last map (B, nh, 1, T) expanded into its row `index` of an
    identity (the other rows do not reach the pooled token)."""
    out = []
    for a in maps:
        m = a.float().mean(dim=1)  # (B, T, S)
        if m.shape[1] == 1:
            full = torch.eye(m.shape[2], device=m.device).expand(m.shape[0], -1, -1).clone()
            full[:, index] = m[:, 0]
            m = full
        out.append(m)
    return out


def attention_rollout(maps: list[Tensor], index: int = 0) -> Tensor:
    """Rollout over one tower's self-attention maps in layer order -> (B, T): how much of each input token
    reaches token `index` (the class token by default); rows of the product sum to 1."""
    rollout = None
    for m in _square(maps, index):
        eye = torch.eye(m.shape[-1], device=m.device)
        a = 0.5 * m + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)  # rows
        rollout = a if rollout is None else a @ rollout
    return rollout[:, index]


def relevance(maps: list[Tensor], index: int = 0) -> Tensor:
    """Chefer et al.'s relevance of each input token to token `index` (B, T), from maps recorded with
    `retain_grad=True` after the explained score's backward pass."""
    R = None
    for a in maps:
        if a.grad is None:
            raise ValueError(
                "an attention map has no gradient: record with retain_grad=True and call backward"
            )
        cam = (a.grad * a).clamp(min=0).float().mean(dim=1)  # (B, T, S) or (B, 1, T)
        if cam.shape[1] == 1:
            full = torch.zeros(cam.shape[0], cam.shape[2], cam.shape[2], device=cam.device)
            full[:, index] = cam[:, 0]
            cam = full
        if R is None:
            R = torch.eye(cam.shape[-1], device=cam.device).expand_as(cam).clone()
        R = R + cam @ R
    return R[:, index]
