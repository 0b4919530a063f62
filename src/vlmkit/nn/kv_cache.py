"""Key/value cache for incremental decoding: one preallocated buffer per layer, written in place.

Each decoding step writes its new keys and values into `[length, length + T)` of a static
(B, nkv, max_len, hs) buffer and attends over the view `[:length + T]`: no `torch.cat` per step, so a step
costs the same at token 10 as at token 1000 apart from the attention itself. Every row holds the same
number of tokens; left padding is expressed by the attention mask, not by the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Static per-layer key/value buffers for incremental decoding."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every row)
        # layer -> cross-attention (k, v) over the encoder states: computed on the first call, reused after
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}
        # the encoder key-padding mask that goes with `cross`, (B, 1, 1, N) bool (True = attend), or None
        self.cross_mask: Tensor | None = None
        # Flamingo: how many <image> tokens each row has read so far, (B,) long, or None
        self.media_count: Tensor | None = None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) at [length, length+T) of `layer`; return that layer's (B, nkv, length+T, hs)."""
        end = self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} tokens but {end} are needed; create it with a larger max_len"
            )
        if k.shape[0] != self.batch_size:
            raise ValueError(f"the KV cache was made for batch size {self.batch_size}, got {k.shape[0]} rows")
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf[:, :, self.length : end] = k
        vbuf[:, :, self.length : end] = v
        return kbuf[:, :, :end], vbuf[:, :, :end]  # (B, nkv, length+T, hs) views, no copy

    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` more tokens as stored; the model calls this once all layers have run."""
        self.length += num_tokens

    def reorder(self, index: Tensor) -> None:
        """Beam search: row b <- row index[b], for the self-attention buffers and the cross-attention k/v."""
        n = self.length
        for buf in self.k + self.v:
            buf[:, :, :n] = buf[:, :, :n].index_select(0, index)  # only the stored part is worth moving
        self.cross = {
            i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()
        }
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, index)
        if self.media_count is not None:
            self.media_count = self.media_count.index_select(0, index)
