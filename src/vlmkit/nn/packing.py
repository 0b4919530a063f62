"""Packing rows of different lengths into one tensor of their real tokens (no padding)."""

from __future__ import annotations

import torch


class Packing:
    """Rows of different lengths packed into one (N, C) tensor of their N real tokens, without padding.

    Row b holds tokens 0 .. lengths[b]-1 of a (B, T) batch. The per-token layers (norms, projections, MLP)
    run on the packed tokens; only attention, which needs each row's sequence, unpacks them to (B, T, .)
    and back. A causal tower read out at each row's last real token (CLIP's end-of-text) computes nothing
    for the padding after it, which no real token can see.
    """

    def __init__(self, lengths: torch.Tensor, T: int):
        B = lengths.shape[0]
        self.B, self.T = B, T
        keep = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = keep.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened (B * T)
        self.last = lengths.cumsum(0) - 1  # (B,) each row's last token in the packed (N,)

    @classmethod
    def maybe(cls, lengths: torch.Tensor, T: int, min_saving: float = 0.15) -> Packing | None:
        """A packing when it removes at least `min_saving` of the B x T tokens (else None: not worth it)."""
        return cls(lengths, T) if int(lengths.sum()) <= (1 - min_saving) * lengths.shape[0] * T else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D) with zeros at the padding."""
        out = x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.B, self.T, -1)
