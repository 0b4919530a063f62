"""Training losses: contrastive (CLIP, SigLIP) with a gradient-preserving distributed all-gather."""

from vlmkit.losses.contrastive import ClipLoss, SigLipLoss, create_loss, gather_features

__all__ = ["ClipLoss", "SigLipLoss", "create_loss", "gather_features"]
