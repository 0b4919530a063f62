"""CoCa's loss: a contrastive loss on the image/text embeddings plus a captioning (next-token) loss.

    loss = contrastive_weight * contrastive(image_features, text_features) + caption_weight * caption

Only rows that are captions take part in the contrastive loss (`is_caption`): a question-answer row
has no caption whose embedding should match its image. Every row with supervised labels takes part in
the captioning loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.losses.captioning import next_token_loss
from vlmkit.losses.contrastive import _rank_and_world, create_loss


class CoCaLoss(nn.Module):
    """Weighted sum of a contrastive loss ("clip" or "siglip") and the captioning loss.

    `forward` returns a dict of scalars: loss (the weighted sum to back-propagate), contrastive_loss and
    caption_loss (unweighted, for logging).
    """

    def __init__(self, caption_weight: float = 2.0, contrastive_weight: float = 1.0, loss: str = "clip"):
        super().__init__()
        self.caption_weight = caption_weight
        self.contrastive_weight = contrastive_weight
        self.loss_name = loss
        self.contrastive = create_loss(loss)  # owns the distributed all-gather

    def contrastive_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        is_caption: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The contrastive loss over the rows flagged by `is_caption` (B,) bool (None: all rows).

        A batch (global batch, when distributed) without a caption row gives 0, still in the graph.
        """
        if is_caption is None:
            return self.contrastive(image_features, text_features, logit_scale, logit_bias)
        is_caption = is_caption.to(device=image_features.device, dtype=torch.bool)
        if is_caption.shape != image_features.shape[:1]:
            raise ValueError(
                f"is_caption has shape {tuple(is_caption.shape)}; expected one flag per row ({image_features.shape[0]},)"
            )
        if self.loss_name == "clip":
            return self.contrastive(image_features, text_features, logit_scale, logit_bias, rows=is_caption)
        if _rank_and_world()[1] > 1:
            raise ConfigError(
                f"is_caption with loss={self.loss_name!r} is only supported in one process; use loss='clip'"
            )
        if not is_caption.any():
            return (image_features.sum() + text_features.sum()) * 0.0  # keeps every parameter in the graph
        return self.contrastive(
            image_features[is_caption], text_features[is_caption], logit_scale, logit_bias
        )

    def forward(
        self,
        output,
        labels: torch.Tensor,
        lm_head: Callable[[torch.Tensor], torch.Tensor],
        is_caption: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`output`: a CoCaOutput (image_features, text_features, logit_scale, logit_bias, hidden (B, T, C));
        `labels` (B, T) aligned with the inputs, IGNORE_INDEX where unsupervised; `lm_head`: the decoder's
        (`model.decoder.lm_head`); `is_caption` (B,) bool, None = every row is a caption."""
        contrastive = self.contrastive_loss(
            output.image_features, output.text_features, output.logit_scale, output.logit_bias, is_caption
        )
        caption = next_token_loss(output.hidden, labels, lm_head)
        loss = self.contrastive_weight * contrastive + self.caption_weight * caption
        return {"loss": loss, "contrastive_loss": contrastive, "caption_loss": caption}
