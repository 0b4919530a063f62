"""Fusion objectives against float64 re-computations written out from their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlmkit.losses import ClipLoss
from vlmkit.losses.captioning import IGNORE_INDEX
from vlmkit.losses.fusion import (
    ITM_COLLAPSED_LOSS,
    itc_loss,
    mask_tokens,
    mim_loss,
    patch_mask,
    patch_pixels,
    sample_negatives,
)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1
    )


def ref_itc(image, text, scale, ids, cols_image=None, cols_text=None, col_ids=None, targets=None):
    """The loss row by row: -sum_j target_ij log softmax_j(scale * <a_i, b_j>), both directions, averaged."""
    cols_image = image if cols_image is None else cols_image
    cols_text = text if cols_text is None else cols_text
    col_ids = ids if col_ids is None else col_ids
    total = 0.0
    for queries, keys, direction in ((image, cols_text, 0), (text, cols_image, 1)):
        for i in range(len(queries)):
            logits = [scale * float(queries[i] @ keys[j]) for j in range(len(keys))]
            top = max(logits)
            log_z = top + math.log(sum(math.exp(v - top) for v in logits))
            if targets is None:
                pos = [j for j in range(len(keys)) if bool((ids[i] == col_ids[j]).any())]
                target = [1 / len(pos) if j in pos else 0.0 for j in range(len(keys))]
            else:
                target = targets[direction][i]
            total += -sum(t * (v - log_z) for t, v in zip(target, logits)) / len(queries)
    return total / 2


def test_itc_equals_clip_loss_with_distinct_ids_and_the_reference_with_duplicates():
    image, text = unit(6, 8, 0), unit(6, 8, 1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    ids = torch.arange(6)
    got = itc_loss(image, text, scale, ids)
    assert got.item() == pytest.approx(ClipLoss()(image, text, scale).item(), rel=1e-12)
    assert got.item() == pytest.approx(ref_itc(image, text, 7.0, ids[:, None]), rel=1e-10)
    # rows 1 and 4 share a caption, rows 2 and 5 an image: each is a positive of the other, not a negative
    dup = torch.tensor([[0, 10], [1, 11], [2, 12], [3, 13], [4, 11], [2, 15]])
    got = itc_loss(image, text, scale, dup)
    assert got.item() == pytest.approx(ref_itc(image, text, 7.0, dup), rel=1e-10)
    assert got.item() != pytest.approx(ClipLoss()(image, text, scale).item(), rel=1e-3)


def test_itc_momentum_distillation_and_queue_follow_albef():
    image, text, image_m, text_m = unit(4, 8, 0), unit(4, 8, 1), unit(4, 8, 2), unit(4, 8, 3)
    qi, qt = unit(5, 8, 4), unit(5, 8, 5)
    q_ids = torch.tensor([[7, 70], [8, 80], [0, 99], [9, 90], [6, 60]])  # the third shares row 0's image id
    ids = torch.tensor([[0, 10], [1, 11], [2, 12], [3, 13]])
    alpha, scale = 0.4, 5.0
    got = itc_loss(
        image, text, torch.tensor(scale, dtype=torch.float64), ids, (image_m, text_m), (qi, qt, q_ids), alpha
    )
    cols_i, cols_t = torch.cat([image_m, qi]), torch.cat([text_m, qt])
    col_ids = torch.cat([ids, q_ids])
    targets = []
    for queries_m, keys in ((image_m, cols_t), (text_m, cols_i)):
        rows = []
        for i in range(4):
            pos = [j for j in range(len(keys)) if bool((ids[i] == col_ids[j]).any())]
            logits = [scale * float(queries_m[i] @ keys[j]) for j in range(len(keys))]
            z = sum(math.exp(v) for v in logits)
            rows.append(
                [
                    alpha * math.exp(v) / z + (1 - alpha) * (1 / len(pos) if j in pos else 0)
                    for j, v in enumerate(logits)
                ]
            )
        targets.append(rows)
    want = ref_itc(image, text, scale, ids, cols_i, cols_t, col_ids, targets)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # the momentum features only shape the targets and columns: no gradient reaches them
    image.requires_grad_(True)
    image_m.requires_grad_(True)
    itc_loss(image, text, torch.tensor(scale), ids, (image_m, text_m), None, alpha).backward()
    assert image.grad is not None and image_m.grad is None


def test_hard_negatives_are_never_positives_or_duplicates_and_follow_the_similarity():
    ids = torch.tensor([[0, 10], [1, 11], [2, 12], [3, 11], [4, 14]])  # rows 1 and 3 share a caption
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    sim[0, 4] = 20.0  # by far the hardest negative of row 0
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(5, 5)
    for _ in range(400):
        index, valid = sample_negatives(sim, ids, g)
        assert valid.all()
        counts[torch.arange(5), index] += 1
    assert counts.diagonal().sum() == 0 and counts[1, 3] == 0 and counts[3, 1] == 0
    assert counts[0, 4] > 0.95 * 400  # softmax(sim) + eps: the hardest dominates
    # degenerate rows never break torch.multinomial
    index, valid = sample_negatives(torch.zeros(1, 1), torch.tensor([[0, 0]]), g)  # a batch of one
    assert not valid.any()
    same = torch.tensor([[0, 5], [1, 5], [2, 5]])  # one caption for every image
    assert not sample_negatives(torch.randn(3, 3), same, g)[1].any()
    nan = torch.full((3, 3), float("nan"))
    index, valid = sample_negatives(nan, torch.arange(3)[:, None], g)
    assert valid.all() and (index != torch.arange(3)).all()
    big = torch.tensor([[0.0, 1e30, float("-inf")], [float("inf"), 0.0, 1.0], [1.0, 2.0, 0.0]])
    index, valid = sample_negatives(big, torch.arange(3)[:, None], g)
    assert valid.all() and (index != torch.arange(3)).all()


def test_itm_collapse_constant_is_the_entropy_of_the_one_to_two_prior():
    logits = torch.log(torch.tensor([[2 / 3, 1 / 3]])).expand(3, 2)  # predicting the prior for every pair
    loss = F.cross_entropy(logits, torch.tensor([1, 0, 0]))
    assert loss.item() == pytest.approx(ITM_COLLAPSED_LOSS, abs=1e-6) and ITM_COLLAPSED_LOSS == pytest.approx(
        0.6365, abs=1e-4
    )


def test_mlm_masking_statistics_and_labels():
    pad, sot, eot, mask_id, vocab = 0, 1, 2, 3, 100
    B, T = 400, 40
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, vocab, (B, T), generator=g)
    text[:, 0], text[:, 30], text[:, 31:] = sot, eot, pad
    masked, labels = mask_tokens(
        text, mask_id, vocab, [pad, sot, eot], 0.15, torch.Generator().manual_seed(1)
    )
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()  # specials and padding never chosen
    assert (labels[chosen] == text[chosen]).all()
    rate = chosen.sum() / (B * 29)
    assert 0.14 < rate < 0.16
    n = chosen.sum().item()
    as_mask = (masked[chosen] == mask_id).sum().item() / n
    kept = (masked[chosen] == text[chosen]).sum().item() / n
    assert (
        0.77 < as_mask < 0.83 and 0.08 < kept < 0.13
    )  # kept: the 10% left alone, plus random hits of itself
    assert (masked[~chosen] == text[~chosen]).all()
    # a short caption with nothing drawn still gets one chosen token
    short = torch.tensor([[sot, 50, eot, pad]])
    _, labels = mask_tokens(short, mask_id, vocab, [pad, sot, eot], 1e-9, torch.Generator().manual_seed(0))
    assert (labels != IGNORE_INDEX).sum() == 1 and labels[0, 1] == 50
    # rows of a global batch: each process's slice masks as a one-process run does
    whole, _ = mask_tokens(text[:8], mask_id, vocab, [pad, sot, eot], 0.5, torch.Generator().manual_seed(2))
    half, _ = mask_tokens(
        text[4:8], mask_id, vocab, [pad, sot, eot], 0.5, torch.Generator().manual_seed(2), rows=(4, 8)
    )
    assert torch.equal(whole[4:], half)


def test_mim_targets_and_loss_only_on_masked_patches():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    target = patch_pixels(images, 4)  # (2, 4, 48)
    # patch (row 0, col 1) of image 1 by hand: pixels in (y, x, channel) order, normalised
    patch = images[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1)
    want = (patch - patch.mean()) / torch.sqrt(patch.var() + 1e-6)
    torch.testing.assert_close(target[1, 1], want)
    mask = patch_mask(2, 4, 0.5, torch.Generator().manual_seed(3))
    assert mask.sum(dim=1).tolist() == [2, 2]
    pred = torch.randn(2, 4, 48, generator=g, dtype=torch.float64)
    loss = mim_loss(pred, images, mask, 4)
    want = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 100.0  # predictions on visible patches do not count
    assert mim_loss(changed, images, mask, 4).item() == pytest.approx(loss.item(), rel=1e-9)
