"""next_token_loss: equal to cross-entropy on full logits shifted by hand; clear error on an unsupervised batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import NoSupervisedTokensError
from vlmkit.losses import IGNORE_INDEX, next_token_loss


def batch(seed: int = 0, B: int = 3, T: int = 7, C: int = 16, V: int = 29):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # right padding
    labels[2, :] = IGNORE_INDEX  # a row with nothing supervised
    labels[2, 0] = 3  # supervising position 0 means nothing: no position predicts it
    torch.manual_seed(seed)
    head = nn.Linear(C, V, bias=False)
    return hidden, labels, head


def test_equals_shifted_cross_entropy():
    hidden, labels, head = batch()
    loss = next_token_loss(hidden, labels, head)
    logits = head(hidden)  # (B, T, V): every position, then shift by hand
    B, T, V = logits.shape
    ref = (
        F.cross_entropy(
            logits[:, :-1].reshape(-1, V),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        / (labels[:, 1:] != IGNORE_INDEX).sum()
    )
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    # and by hand, one term at a time
    terms = [
        -logits[b, t].log_softmax(-1)[labels[b, t + 1]]
        for b in range(B)
        for t in range(T - 1)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)


def test_gradient_flows_only_from_supervised_positions():
    hidden, labels, head = batch(seed=1)
    next_token_loss(hidden, labels, head).backward()
    assert head.weight.grad.abs().sum() > 0
    grad_used = hidden.grad.abs().sum(-1) > 0  # (B, T)
    expected = torch.zeros_like(grad_used)
    expected[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(grad_used, expected)


def test_no_supervised_token_is_an_error():
    hidden, labels, head = batch()
    labels[:, 1:] = IGNORE_INDEX  # only position 0 labelled, which nothing predicts
    with pytest.raises(NoSupervisedTokensError, match="chat template"):
        next_token_loss(hidden, labels, head)
