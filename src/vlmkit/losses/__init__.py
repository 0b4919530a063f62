"""Training losses: contrastive (CLIP, SigLIP) with a gradient-preserving distributed all-gather, and
next-token captioning."""

from vlmkit.losses.captioning import IGNORE_INDEX, next_token_loss
from vlmkit.losses.coca import CoCaLoss
from vlmkit.losses.contrastive import ClipLoss, SigLipLoss, create_loss, gather_features

__all__ = [
    "IGNORE_INDEX",
    "ClipLoss",
    "CoCaLoss",
    "SigLipLoss",
    "create_loss",
    "gather_features",
    "next_token_loss",
]
