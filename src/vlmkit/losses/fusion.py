"""The objectives of fusion encoders (ALBEF, BLIP, FLAVA): ITC with id-aware targets, momentum distillation
and a queue; hard-negative mining for ITM; BERT's MLM masking; masked-patch pixel targets for MIM.

Across processes the ITC columns are gathered with gradients (`gather_features`), as for CLIP, so that the
mean of the per-rank losses is the global batch's loss. ITM negatives are mined from the global batch's
similarities with a generator every rank seeds alike, so each rank samples exactly the rows a one-process
run would, and then keeps its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkit.losses.captioning import IGNORE_INDEX
from vlmkit.losses.contrastive import _upcast, gather_features

# A collapsed ITM head predicts the 1:2 prior of positives to negatives for every pair: its loss is that
# prior's entropy, -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.6365 (reported in BLIP's issues).
ITM_COLLAPSED_LOSS = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


def same_ids(a: Tensor, b: Tensor) -> Tensor:
    """(R,) or (R, K) ids and (C,) or (C, K) ids -> (R, C) bool: the rows share an id (any of the K kinds,
    e.g. an image id and a caption id)."""
    if a.ndim == 1:
        return a[:, None] == b[None, :]
    return (a[:, None, :] == b[None, :, :]).any(dim=-1)


def global_mean(values: Tensor) -> Tensor:
    """The mean of per-item losses (n,) over every process's items, as this rank's share: local sum x world /
    global count. After DDP averages the gradients (and the trainer the logged values) this is the mean over
    the global batch, whatever each rank's count (masked tokens, caption tokens, ITM pairs)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    count = torch.tensor(float(values.numel()), device=values.device)
    if world > 1:
        torch.distributed.all_reduce(count)
    return values.sum() * world / count.clamp(min=1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)): cross-entropy against a distribution per row."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    ids: Tensor,
    momentum: tuple[Tensor, Tensor] | None = None,
    queue: tuple[Tensor, Tensor, Tensor] | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Image-text contrastive loss of a batch's local rows against every rank's columns.

    image, text (B, D): normalised features; logit_scale: 1 / temperature; ids (B,) or (B, K): which pairs
    are the same (rows sharing an id are all positives: duplicated images or captions are not negatives).
    momentum: (image_m, text_m) features of the momentum encoders for the same rows (ALBEF): they become
    the columns, and the targets mix in their similarities: alpha * softmax(momentum sims) + (1 - alpha) *
    labels. queue: (image_q, text_q, ids_q) past momentum features, extra columns. With neither and distinct
    ids this is CLIP's InfoNCE (`ClipLoss`).
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        image, text, scale = _upcast(image), _upcast(text), _upcast(logit_scale)
        col_ids = gather_features(ids)  # (N,)
        if momentum is None:
            image_cols, text_cols = gather_features(image), gather_features(text)  # (N, D), with gradients
        else:
            image_m, text_m = (_upcast(t.detach()) for t in momentum)
            image_cols, text_cols = gather_features(image_m), gather_features(text_m)
        if queue is not None:
            image_q, text_q, ids_q = queue
            image_cols = torch.cat([image_cols, _upcast(image_q)])
            text_cols = torch.cat([text_cols, _upcast(text_q)])
            col_ids = torch.cat([col_ids, ids_q])
        positive = same_ids(ids, col_ids).to(image.dtype)  # (B, N [+ Q])
        labels = positive / positive.sum(dim=1, keepdim=True)
        sim_i2t = scale * image @ text_cols.T  # (B, N)
        sim_t2i = scale * text @ image_cols.T
        target_i2t = target_t2i = labels
        if momentum is not None and alpha > 0:
            with torch.no_grad():
                target_i2t = alpha * F.softmax(scale * image_m @ text_cols.T, dim=1) + (1 - alpha) * labels
                target_t2i = alpha * F.softmax(scale * text_m @ image_cols.T, dim=1) + (1 - alpha) * labels
        return (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2


def sample_negatives(
    sim: Tensor, ids: Tensor, generator: torch.Generator | None = None, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """One hard negative per row of `sim` (R, C), drawn with probability softmax(sim) + eps, never a column
    that shares the row's id (`ids` (R,) or (R, K), rows and columns alike: a square similarity of the
    global batch).

    Returns (index (R,), valid (R,) bool). A row whose every column shares its id (a batch of one, or all
    duplicates) has no negative: valid False, index 0. NaN or infinite similarities do not break sampling:
    they count as the smallest weight, eps.
    """
    with torch.no_grad(), torch.autocast(device_type=sim.device.type, enabled=False):
        weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), nan=0.0, posinf=0.0, neginf=0.0) + eps
        weights = weights.masked_fill(same_ids(ids, ids), 0.0)  # (R, C)
        valid = weights.sum(dim=1) > 0
        index = torch.zeros(len(sim), dtype=torch.long, device=sim.device)
        if valid.any():
            index[valid] = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
        return index, valid


def mask_tokens(
    text: Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: each ordinary token (not padding, [CLS], [SEP] or other `special_ids`) is chosen with
    `probability`; of those, 80% become [MASK], 10% a random token, 10% stay. Returns (masked text, labels):
    labels hold the original id at chosen positions and IGNORE_INDEX elsewhere. A row where nothing was
    chosen gets one chosen token (its first ordinary one), so that every caption teaches something.
    `rows` (offset, total): this batch is rows offset.. of a global batch of `total`; the random draws are
    the global batch's, so several processes mask exactly as one process would."""
    device = text.device
    B, T = text.shape
    offset, total = rows or (0, B)
    local = slice(offset, offset + B)
    draw = torch.rand((total, T), generator=generator, device=device)[local]
    action = torch.rand((total, T), generator=generator, device=device)[local]
    random_ids = torch.randint(vocab_size, (total, T), generator=generator, device=device)[local]
    ordinary = torch.ones_like(text, dtype=torch.bool)
    for sid in special_ids:
        ordinary &= text != sid
    chosen = ordinary & (draw < probability)
    first = ordinary.int().argmax(dim=1)  # (B,)
    empty = ~chosen.any(dim=1) & ordinary.any(dim=1)
    chosen[empty.nonzero().squeeze(1), first[empty]] = True
    labels = torch.where(chosen, text, torch.full_like(text, IGNORE_INDEX))
    masked = torch.where(chosen & (action < 0.8), torch.full_like(text, mask_token_id), text)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def patch_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device=None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """(B, N) bool: exactly round(ratio * N) (at least 1) random patches per image are masked. `rows` as in
    `mask_tokens`."""
    offset, total = rows or (0, batch)
    k = max(1, round(ratio * num_patches))
    noise = torch.rand(total, num_patches, generator=generator, device=device)[offset : offset + batch]
    return noise.argsort(dim=1).argsort(dim=1) < k


def patch_pixels(images: Tensor, patch_size: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3) patches in raster order, each normalised to zero mean and unit variance
    over its own pixels (MAE's normalised-pixel targets)."""
    B, C, H, W = images.shape
    p = patch_size
    x = (
        images.reshape(B, C, H // p, p, W // p, p)
        .permute(0, 2, 4, 3, 5, 1)
        .reshape(B, (H // p) * (W // p), p * p * C)
    )
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


def mim_loss(predicted: Tensor, images: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """Mean squared error of the predicted (B, N, p*p*3) normalised pixels on the masked patches only (mean
    over the global batch's masked patches, see `global_mean`)."""
    target = patch_pixels(images.float(), patch_size)
    err = (predicted.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return global_mean(err[mask])


__all__ = [
    "ITM_COLLAPSED_LOSS",
    "global_mean",
    "itc_loss",
    "mask_tokens",
    "mim_loss",
    "patch_mask",
    "patch_pixels",
    "same_ids",
    "sample_negatives",
    "soft_cross_entropy",
]
