"""Captioning / language-modelling loss: next-token cross-entropy on the supervised positions only."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from vlmkit.errors import NoSupervisedTokensError

IGNORE_INDEX = -100  # a label that is not supervised (prompt, image, padding), as Hugging Face and PyTorch


def next_token_loss(
    hidden: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor], label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from hidden[:, t] (labels aligned with the
    inputs, as Hugging Face). Logits only at supervised positions (memory/time). Raises
    NoSupervisedTokensError when no label is supervised.

    hidden (B, T, C) final (normed) decoder states; labels (B, T) token ids or IGNORE_INDEX;
    lm_head maps (N, C) -> (N, V); `label_smoothing` as in `F.cross_entropy` (BLIP's decoder: 0.1). Returns a
    float32 scalar.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    if not bool(keep.any()):
        raise NoSupervisedTokensError(
            "no token in this batch is supervised (every label is IGNORE_INDEX): the chat template probably "
            "does not match the data, so there are no assistant turns to learn"
        )
    # A vocabulary of 32k makes full (B, T, V) logits the largest activation; prompts and images are most
    # of T and carry no loss, so project only the supervised positions.
    logits = lm_head(hidden[:, :-1][keep])  # (N, V)
    # float32 log-softmax, also under bf16
    return F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)
