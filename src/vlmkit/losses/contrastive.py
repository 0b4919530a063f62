"""Contrastive losses for dual encoders: CLIP's softmax InfoNCE and SigLIP's pairwise sigmoid.

The losses, not the model, own the distributed all-gather. Each rank scores its local images
(and, for CLIP, its local texts) against the features gathered from every rank, so that the mean
of the per-rank losses equals the loss on the global batch. The gather keeps the autograd graph:
the gradient that rank r's loss sends to rank s's features is returned to rank s, and after DDP
averages the parameter gradients they equal those of a one-process run on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlmkit.errors import ConfigError


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward routes every rank's gradient back to the owner.

    A plain `dist.all_gather` returns tensors without a grad_fn, so the gradient other ranks'
    losses send to this rank's features is silently dropped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _rank_and_world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (world * B, ...), in rank order

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Sum the gradient every rank's loss sends to the gathered tensor, then keep our own rows.
        # all_reduce + slice rather than reduce_scatter, which gloo lacks.
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may still hold `grad`
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]  # (B, ...)


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank in rank order, keeping gradients: (world * B, ...).

    Every rank must pass the same shape. Returns `x` itself when not distributed or world size 1.
    """
    _, world = _rank_and_world()
    if world == 1:
        return x
    return _AllGather.apply(x)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: logits of scale ~100 lose too many digits in bfloat16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _ContrastiveLoss(nn.Module):
    """Shared by both losses: input checks and a cache of where each local row's positive sits."""

    def __init__(self):
        super().__init__()
        self._positives: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def positives(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) column of each local row's positive among the gathered features: rank * B + i."""
        rank, _ = _rank_and_world()
        key = (device, batch, rank)
        if key not in self._positives:
            self._positives[key] = torch.arange(batch, device=device) + rank * batch
        return self._positives[key]

    @staticmethod
    def check_shapes(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image features {tuple(image_features.shape)} and text features "
                f"{tuple(text_features.shape)} must both be (B, D) with the same B and D"
            )


class ClipLoss(_ContrastiveLoss):
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropy (CLIP). The one InfoNCE of
    vlmkit: CoCa's contrastive loss is this one over its caption rows (`rows`)."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) normalised features, the exp'd scale and an optional bias -> scalar loss.

        The bias adds the same constant to every logit, so it cancels in the softmax; it is
        accepted so that both losses take a `CLIPOutput`'s fields. `rows` (B,) bool: only those rows are
        pairs (and negatives) of the loss; a (global) batch without one gives 0, still in the graph.
        """
        self.check_shapes(image_features, text_features)
        if rows is not None:
            rows = rows.to(device=image_features.device, dtype=torch.bool)
            if rows.shape != image_features.shape[:1]:
                raise ValueError(
                    f"rows has shape {tuple(rows.shape)}; expected one flag per row ({image_features.shape[0]},)"
                )
            if _rank_and_world()[1] > 1:
                return self.global_loss(image_features, text_features, logit_scale, rows)
            if not rows.any():
                return (
                    image_features.sum() + text_features.sum()
                ) * 0.0  # keeps every parameter in the graph
            image_features, text_features = image_features[rows], text_features[rows]
        # Autocast would run the matmuls below in bfloat16 again; keep them in float32.
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image, text = _upcast(image_features), _upcast(text_features)  # (B, D)
            all_image = _upcast(gather_features(image_features))  # (N, D), N = world * B
            all_text = _upcast(gather_features(text_features))  # (N, D)
            scale = _upcast(logit_scale)
            logits_per_image = scale * image @ all_text.T  # (B, N)
            logits_per_text = scale * text @ all_image.T  # (B, N)
            if logit_bias is not None:
                logits_per_image = logits_per_image + _upcast(logit_bias)
                logits_per_text = logits_per_text + _upcast(logit_bias)
            labels = self.positives(image.shape[0], image.device)  # (B,)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def global_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The loss over the flagged rows of the global batch, computed whole on every rank.

        The local-rows-against-gathered-columns form needs the same number of rows on every rank; flagged
        rows per rank differ. So every rank gathers all rows (same shape everywhere, with gradient), keeps
        the flagged ones and computes the whole loss: each rank's value is the global loss, and after the
        gather's backward and DDP's averaging the gradients equal a one-process run's.
        """
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            keep = gather_features(rows.to(torch.uint8)).bool()  # (N,)
            image = _upcast(gather_features(image_features))[keep]  # (n, D)
            text = _upcast(gather_features(text_features))[keep]  # (n, D)
            if not len(image):  # no flagged row in the global batch
                return (image.sum() + text.sum()) * 0.0
            logits = _upcast(logit_scale) * image @ text.T  # (n, n)
            labels = torch.arange(len(logits), device=logits.device)  # (n,)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class SigLipLoss(_ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP): every image-text pair is an independent binary label."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) normalised features, the exp'd scale and the bias (None = 0) -> scalar loss.

        `-sum(logsigmoid(labels * logits)) / B` with labels +1 for matching pairs, -1 otherwise.
        """
        self.check_shapes(image_features, text_features)
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            # Only the texts are gathered: each rank scores its images against every text, which
            # covers every pair of the global batch exactly once across ranks.
            image = _upcast(image_features)  # (B, D)
            all_text = _upcast(gather_features(text_features))  # (N, D), N = world * B
            logits = _upcast(logit_scale) * image @ all_text.T  # (B, N)
            if logit_bias is not None:
                logits = logits + _upcast(logit_bias)
            B, N = logits.shape
            labels = 2 * F.one_hot(self.positives(B, image.device), N).to(logits.dtype) - 1  # (B, N), +-1
            return -F.logsigmoid(labels * logits).sum() / B


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(name: str) -> nn.Module:
    """The loss named by a model config's `loss` field: "clip" or "siglip"."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]()
