"""Loss pieces shared by the heads.

Element-wise losses have one form, ``(pred, target, weight) -> per-slot loss``: pred and target
(..., K), weight broadcastable to (...) (a per-box mixup weight, a 0/1 mask, or 1), the loss summed
over the last axis and multiplied by the weight. A head names one per term (``POINTWISE_LOSSES``), so
a term's function is a config choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PointwiseLoss = Callable[[Tensor, Tensor, Tensor | float], Tensor]


def binary_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """BCE on logits against targets in 0..1 (soft targets too): (..., K) -> (...). Its gradient with
    respect to a logit is ``sigmoid(logit) - target``: darknet's delta on a logistic output, which its
    yolo layer passes back without the logistic's slope."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1) * weight


def half_squared_error(pred: Tensor, target: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """``(pred - target)^2 / 2`` summed: (..., K) -> (...); gradient ``pred - target`` (darknet's delta on a
    linear output, e.g. t_w, t_h)."""
    return 0.5 * (pred - target).pow(2).sum(-1) * weight


def sigmoid_half_squared_error(logits: Tensor, target: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """``(sigmoid(logit) - target)^2 / 2`` summed: (..., K) -> (...); the squared error on a logistic
    output as the papers write it (its gradient carries the logistic's slope)."""
    return half_squared_error(logits.sigmoid(), target, weight)


#: losses on logits of outputs in 0..1 (objectness, sigmoid offsets), by config name
POINTWISE_LOSSES: dict[str, PointwiseLoss] = {"bce": binary_cross_entropy, "sse": sigmoid_half_squared_error}


def pointwise_loss(name: str, key: str) -> PointwiseLoss:
    """The loss ``name`` of ``POINTWISE_LOSSES``; an unknown name fails when the head is built, with ``key``."""
    if name not in POINTWISE_LOSSES:
        raise ValueError(f"{key} must be one of {sorted(POINTWISE_LOSSES)}, got {name!r}")
    return POINTWISE_LOSSES[name]


def hard_negative_mask(
    background_loss: Tensor,
    positive: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives: int = 0,
    exclude: Tensor | None = None,
) -> Tensor:
    """Hard negative mining (SSD, Liu et al. 2016, sec. 2.2), batched over images.

    Per image keep the ``neg_pos_ratio * num_positives`` negatives with the highest
    classification loss (at least ``min_negatives``, so images without objects still teach the
    background; SSD's own rule keeps none there), never more than there are negatives.

    Args:
        background_loss: (B, A) classification loss of each prior against the background class.
        positive: (B, A) bool.
        exclude: (B, A) bool, priors that are neither positive nor eligible as negatives (ignored).
    Returns:
        (B, A) bool mask of the selected negatives (disjoint from ``positive`` and ``exclude``).
    """
    unavailable = positive if exclude is None else positive | exclude
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = (num_pos * neg_pos_ratio).long().clamp(min=min_negatives)
    num_neg = torch.minimum(num_neg, (~unavailable).sum(dim=1, keepdim=True))
    loss = background_loss.detach().masked_fill(unavailable, float("-inf"))
    # rank of each prior in descending loss order: argsort of the argsort
    order = loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    return (rank < num_neg) & ~unavailable

