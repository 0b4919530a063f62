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


class SlotKVCache:
    """Key/value buffers for continuous batching: `num_slots` independent rows, each at its own length.

    A server keeps one of these for its whole life. A request takes a free slot, its prompt is written from
    position 0 (`select([slot], [prompt_len])` then a forward of the right-padded prompts), and each decoding
    step runs one token for every active slot (`select(active, [1] * len(active))`). A slot's tokens sit at
    positions [0, lengths[slot]) with their own rotary positions, so requests that joined at different times
    share one batched forward; `free(slot)` makes a slot empty again. The decoder asks `positions_and_mask(T)`
    for each row's positions and a mask that keeps every row to its own keys (causal within the new tokens).
    """

    per_row = True  # the decoder reads positions and masks from the cache, not from `length`

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.num_slots, self.max_len = num_slots, max_len
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # tokens stored per slot
        self.rows = torch.arange(num_slots, device=device)  # the slots the next forward runs, in order
        self.counts = torch.zeros(num_slots, dtype=torch.long, device=device)  # their real new tokens
        self._start, self._length, self._span = self.lengths.clone(), 0, slice(0, num_slots)
        self.cross = _SlotCross(self)  # cross-attention k/v per slot (CoCa), written at each slot's prefill
        self.cross_mask = None  # every encoder state is attended to
        self.prefilling = False

    @property
    def length(self) -> int:
        """The longest selected slot: the keys a forward attends over before its new tokens."""
        return self._length

    def select(self, rows: list[int], counts: list[int], prefill: bool = False) -> None:
        """The next forward runs slots `rows` (in this order), each with `counts[i]` real new tokens (a row
        with fewer than the forward's T is right-padded; the padding is written past its end and ignored).
        `prefill`: the rows' first forward, which computes their cross-attention keys and values."""
        device = self.lengths.device
        self.prefilling = prefill
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.counts = torch.tensor(counts, dtype=torch.long, device=device)
        self._start = self.lengths[self.rows]  # (B,) where each row's new tokens go
        end = self._start + self.counts
        if bool((end > self.max_len).any()):
            raise ValueError(f"a slot would hold more than the cache's {self.max_len} tokens")
        self._length = int(self._start.max()) if rows else 0
        # consecutive slots (the usual case: free slots are taken lowest first) are read as views, no copy
        self._span = (
            slice(rows[0], rows[-1] + 1) if rows and rows == list(range(rows[0], rows[-1] + 1)) else None
        )

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def positions_and_mask(self, T: int) -> tuple[Tensor, Tensor]:
        """Rotary positions (B, T) of the selected rows' new tokens, and the boolean attention mask
        (B, 1, T, length + T): query t of row b sees the row's stored keys and its new keys up to t."""
        positions = self._start[:, None] + torch.arange(T, device=self._start.device)  # (B, T)
        keys = torch.arange(self._length + T, device=self._start.device)  # (S,)
        return positions, (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) at each selected row's own positions; return the rows' keys and values
        (B, nkv, length + T, hs). Padded positions past `max_len` are not written."""
        B, _, T, _ = k.shape
        kbuf, vbuf = self.k[layer], self.v[layer]
        k, v = k.to(kbuf.dtype), v.to(vbuf.dtype)  # bf16 under autocast; the buffers keep the weights' dtype
        if T == 1:  # a decoding step: one token per row
            kbuf[self.rows, :, self._start] = k[:, :, 0]  # (B, nkv, hs)
            vbuf[self.rows, :, self._start] = v[:, :, 0]
        else:
            positions = self._start[:, None] + torch.arange(T, device=k.device)  # (B, T)
            keep = positions < self.max_len
            rows = self.rows[:, None].expand(B, T)[keep]  # (n,)
            kbuf[rows, :, positions[keep]] = k.transpose(1, 2)[keep]  # (n, nkv, hs)
            vbuf[rows, :, positions[keep]] = v.transpose(1, 2)[keep]
        S = self._length + T
        if self._span is not None:
            return kbuf[self._span, :, :S], vbuf[self._span, :, :S]  # views
        return kbuf[self.rows, :, :S], vbuf[self.rows, :, :S]  # (B, nkv, S, hs)

    def advance(self, num_tokens: int) -> None:
        """After a forward: each selected row stored its real new tokens (`counts` of `select`)."""
        self.lengths[self.rows] += self.counts


class _SlotCross:
    """`SlotKVCache.cross`: layer -> the selected rows' cross-attention (k, v), stored per slot. A prefill
    computes and stores them (`layer in cross` is False then); decoding steps read them back."""

    def __init__(self, cache: SlotKVCache):
        self.cache = cache
        self.k: dict[int, Tensor] = {}  # layer -> (num_slots, nkv, N, hs)
        self.v: dict[int, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.k)

    def __contains__(self, layer: int) -> bool:
        return layer in self.k and not self.cache.prefilling

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        rows = self.cache.rows
        return self.k[layer][rows], self.v[layer][rows]

    def __setitem__(self, layer: int, kv: tuple[Tensor, Tensor]) -> None:
        k, v = kv  # (B, nkv, N, hs) for the selected rows
        if layer not in self.k:
            shape = (self.cache.num_slots, *k.shape[1:])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        self.k[layer][self.cache.rows] = k.to(self.k[layer].dtype)
        self.v[layer][self.cache.rows] = v.to(self.v[layer].dtype)
