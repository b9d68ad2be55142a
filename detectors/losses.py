"""Loss pieces shared by the heads."""

from __future__ import annotations

import torch
from torch import Tensor


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

