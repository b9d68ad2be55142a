"""Target assignment: which ground truth each prior / anchor learns from.

Every matcher works on the whole batch at once: ground truths are padded to
the batch maximum with a mask (see ``detectors.data.collate``), so there is no
Python loop over images or ground truths in a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert

from detectors.boxes import batched_box_iou


@dataclass
class PriorMatch:
    """Result of matching priors to ground truths for a batch.

    gt_index: (B, A) long, index of the matched ground truth in the padded GT axis (valid only where
        ``positive``; for negatives it is the best-overlap GT, useful for diagnostics).
    positive: (B, A) bool, prior is a foreground training sample.
    iou: (B, A) IoU of each prior with its matched ground truth (forced matches keep their real IoU).
    """

    gt_index: Tensor
    positive: Tensor
    iou: Tensor


def match_priors(priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, iou_threshold: float = 0.5) -> PriorMatch:
    """SSD matching (Liu et al. 2016, sec. 2.2 "Matching strategy"), batched.

    1. Every ground truth takes the prior it overlaps most, even below the threshold
       (ties between priors: the lowest prior index; two GTs wanting one prior: the later GT wins,
       as in the reference implementation's loop).
    2. Every other prior with IoU >= ``iou_threshold`` with some GT takes its best GT
       (ties: the lowest GT index).

    Args:
        priors: (A, 4) cxcywh, same pixel frame as the boxes.
        gt_boxes: (B, M, 4) xyxy, padded.
        gt_mask: (B, M) bool, True for real ground truths. Images without objects have no True.
        iou_threshold: IoU at or above which a prior becomes positive.

    Returns:
        PriorMatch with (B, A) tensors.
    """
    batch, num_gt = gt_mask.shape
    num_priors = priors.shape[0]
    device = priors.device
    if num_gt == 0:
        empty = torch.zeros(batch, num_priors, device=device)
        return PriorMatch(empty.long(), empty.bool(), empty)

    iou = batched_box_iou(gt_boxes.float(), box_convert(priors.float(), "cxcywh", "xyxy"))  # (B, M, A)
    # padding never matches: below any real IoU (>= 0), so argmax never picks it while a real GT exists
    iou = iou.masked_fill(~gt_mask.unsqueeze(-1), -1.0)

    best_gt = iou.argmax(dim=1)  # (B, A) per prior; argmax documents first-index ties, max(dim) does not
    best_iou = iou.amax(dim=1)
    best_prior = iou.argmax(dim=2)  # (B, M) per GT

    # Step 1 as a scatter: per prior, the largest GT index among the GTs that chose it (-1: none).
    gt_ids = torch.arange(num_gt, device=device).expand(batch, num_gt)
    gt_ids = torch.where(gt_mask, gt_ids, torch.full_like(gt_ids, -1))
    forced = torch.full((batch, num_priors), -1, dtype=torch.long, device=device)
    forced.scatter_reduce_(1, best_prior, gt_ids, reduce="amax", include_self=True)
    is_forced = forced >= 0

    gt_index = torch.where(is_forced, forced, best_gt)
    matched_iou = iou.gather(1, gt_index.unsqueeze(1)).squeeze(1).clamp(min=0)
    positive = is_forced | (best_iou >= iou_threshold)
    return PriorMatch(gt_index=gt_index, positive=positive, iou=matched_iou)


def gather_gt(values: Tensor, gt_index: Tensor) -> Tensor:
    """Pick, for each prior, the value of its matched GT.

    values: (B, M, ...) per-GT values (boxes, labels, weights); gt_index: (B, A) -> (B, A, ...).
    """
    if values.shape[1] == 0:
        return values.new_zeros(gt_index.shape + values.shape[2:])
    index = gt_index.clamp(min=0)
    if values.dim() == 2:
        return values.gather(1, index)
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)
