"""Target assignment: which ground truth each prior / anchor learns from.

Every matcher works on the whole batch at once: ground truths are padded to
the batch maximum with a mask (see ``detectors.data.collate``), so there is no
Python loop over images or ground truths in a training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import box_convert

from detectors.boxes import GridCoder, batched_box_iou

if TYPE_CHECKING:
    from detectors.anchors import AnchorGrid


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


# ---- threshold matching and balanced sampling (Faster R-CNN's RPN and RoI head) -------------------

@dataclass
class ThresholdMatch:
    """Result of ``match_by_threshold`` for a batch (all (B, N)).

    gt_index: long, each reference box's best ground truth (its GT of highest IoU; meaningful where
        ``positive``). positive / negative: bool, foreground / background candidates (neither: ignored).
    iou: that best IoU, 0 for images without ground truth.
    """

    gt_index: Tensor
    positive: Tensor
    negative: Tensor
    iou: Tensor


def match_by_threshold(boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor, fg_iou: float, bg_iou: float,
                       bg_iou_low: float = 0.0, best_match: bool = False) -> ThresholdMatch:
    """Faster R-CNN's labelling of anchors or proposals by IoU (Ren et al. 2015, sec. 3.1.2), batched.

    A box whose best IoU with a ground truth is ``>= fg_iou`` is positive; one whose best IoU is in
    ``[bg_iou_low, bg_iou)`` negative; the rest ignored. With ``best_match`` (the RPN's rule) every
    ground truth also makes positive the box(es) of highest IoU with it, ties included, as
    torchvision's ``Matcher(allow_low_quality_matches=True)``; such a box learns its own best ground
    truth (py-faster-rcnn and torchvision alike), and a ground truth overlapping no box at all makes
    none positive (torchvision would make every box of IoU 0 positive). Images without ground truth:
    every box has IoU 0.

    Args:
        boxes: (N, 4) xyxy shared by every image (anchors) or (B, N, 4) per image (proposals).
        gt_boxes: (B, M, 4) xyxy, padded; gt_mask: (B, M) bool.
    Returns:
        ThresholdMatch of (B, N) tensors.
    """
    batch, num_gt = gt_mask.shape
    num_boxes = boxes.shape[-2]
    if num_gt == 0:
        zeros = torch.zeros(batch, num_boxes, device=boxes.device)
        return ThresholdMatch(zeros.long(), zeros.bool(), (zeros < bg_iou) & (zeros >= bg_iou_low), zeros)
    iou = batched_box_iou(gt_boxes.float(), boxes.float())  # (B, M, N)
    iou = iou.masked_fill(~gt_mask.unsqueeze(-1), -1.0)  # padding: below every real IoU
    best_iou = iou.amax(dim=1).clamp(min=0)  # (B, N); 0 where the image has no ground truth
    gt_index = iou.argmax(dim=1)
    positive = best_iou >= fg_iou
    negative = (best_iou < bg_iou) & (best_iou >= bg_iou_low)
    if best_match:
        best_of_gt = iou.amax(dim=2, keepdim=True)  # (B, M, 1)
        is_best = (iou == best_of_gt) & (best_of_gt > 0) & gt_mask.unsqueeze(-1)
        positive = positive | is_best.any(dim=1)
        negative = negative & ~positive
    return ThresholdMatch(gt_index, positive, negative, best_iou)


def sample_balanced(positive: Tensor, negative: Tensor, num_samples: int,
                    positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Up to ``num_samples`` boxes per image, at most ``positive_fraction`` of them positive, drawn
    uniformly at random; negatives fill the rest (torchvision's ``BalancedPositiveNegativeSampler``,
    batched: random keys, and each row's best ranks against its own quota; no loop over images).

    positive, negative: (B, N) bool, disjoint -> (sampled positives, sampled negatives), (B, N) bool.
    Per image: ``min(#positive, int(num_samples * positive_fraction))`` positives and
    ``min(#negative, num_samples - positives taken)`` negatives. Draws from torch's global generator
    (seeded by the run, restored on resume).
    """
    max_positive = int(num_samples * positive_fraction)
    num_pos = positive.sum(1).clamp(max=max_positive)
    num_neg = torch.minimum(num_samples - num_pos, negative.sum(1))
    return _random_subset(positive, num_pos, max_positive), _random_subset(negative, num_neg, num_samples)


def _random_subset(candidates: Tensor, count: Tensor, max_count: int) -> Tensor:
    """(B, N) bool candidates, (B,) how many to take (<= candidates per row) -> (B, N) bool, the taken."""
    taken = torch.zeros_like(candidates)
    k = min(max_count, candidates.shape[1])
    if k == 0:
        return taken
    # candidates get keys in [0, 1), the rest -1: a row's top-k lists its candidates first, in random order
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, -1.0)
    top = keys.topk(k, dim=1).indices
    rank = torch.arange(k, device=candidates.device)
    return taken.scatter_(1, top, rank < count.unsqueeze(1))


# ---- grid assignment (YOLO heads) ----------------------------------------------------------------

def cells_of_centres(boxes: Tensor, grid_shape: tuple[int, int], image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The grid cell holding each box's centre (YOLO's "responsible" cell), batched.

    Args:
        boxes: (..., 4) xyxy in pixels of an image of ``image_size`` (H, W).
        grid_shape: (h, w) cells; a cell is H / h by W / w pixels.
    Returns:
        (row, col), each (...) long, clamped into the grid: a centre exactly on the right or bottom
        border belongs to the last cell, one on an inner border to the cell below / right of it
        (floor), as darknet's ``(int)(x * w)``.
    """
    h, w = grid_shape
    cx = (boxes[..., 0] + boxes[..., 2]) * 0.5
    cy = (boxes[..., 1] + boxes[..., 3]) * 0.5
    col = torch.floor(cx * (w / image_size[1])).long().clamp(0, w - 1)
    row = torch.floor(cy * (h / image_size[0])).long().clamp(0, h - 1)
    return row, col


def owner_of_slots(slot: Tensor, valid: Tensor, num_slots: int, keep: str = "last") -> Tensor:
    """Which ground truth owns each prediction slot when several claim one, batched.

    Args:
        slot: (B, M) long, the slot each ground truth claims (a cell, or cell x anchor), in 0..num_slots-1.
        valid: (B, M) bool, ground truths that claim at all (padding and ignored ones do not).
        keep: ``"last"`` (the later ground truth wins: darknet's region and yolo layers overwrite the
            deltas in their loop over truths) or ``"first"`` (the earlier one wins: darknet's YOLOv1
            label grid keeps the first box of a cell).
    Returns:
        (B, num_slots) long, the owning ground truth's index on the padded axis, -1 where none.
    """
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    batch, num_gt = slot.shape
    device = slot.device
    ids = torch.arange(num_gt, device=device).expand(batch, num_gt)
    if keep == "last":
        owner = torch.full((batch, num_slots), -1, dtype=torch.long, device=device)
        owner.scatter_reduce_(1, slot.clamp(0, num_slots - 1), torch.where(valid, ids, -1), reduce="amax")
        return owner
    none = num_gt  # above every real index, so amin keeps the first claimant
    owner = torch.full((batch, num_slots), none, dtype=torch.long, device=device)
    owner.scatter_reduce_(1, slot.clamp(0, num_slots - 1), torch.where(valid, ids, none), reduce="amin")
    return torch.where(owner == none, -1, owner)


def shape_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """IoU of boxes and anchors with their centres aligned (YOLO's anchor choice: shape alone).

    wh: (..., 2) box widths and heights; anchors: (K, 2), same unit -> (..., K).
    """
    inter = torch.minimum(wh[..., None, :], anchors).prod(-1)
    union = wh.prod(-1)[..., None] + anchors.prod(-1) - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def overlaps_any(pred_boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor, threshold: float) -> Tensor:
    """Predictions whose IoU with some ground truth exceeds ``threshold`` (YOLO's ignore rule), batched.

    pred_boxes: (B, N, 4), gt_boxes: (B, M, 4) xyxy, gt_mask: (B, M) -> (B, N) bool.
    """
    if gt_boxes.shape[1] == 0:
        return torch.zeros(pred_boxes.shape[:2], dtype=torch.bool, device=pred_boxes.device)
    overlap = batched_box_iou(pred_boxes, gt_boxes).masked_fill(~gt_mask[:, None, :], 0)
    return overlap.amax(-1) > threshold


@dataclass
class GridTargets:
    """What darknet's grid assignment gives each prediction slot (all (B, N[, k]) over the slots of an
    ``AnchorGrid``; a one-level head may view them as (B, h, w, A[, k])).

    positive: the slot is responsible for a ground truth; weight: that ground truth's per-box weight
    (0 elsewhere); offsets, log_wh: the coder's targets; box_scale: 2 - w h (w, h as fractions of the
    image); labels: class index; ignore: a non-responsible slot whose box overlaps some ground truth
    by more than the ignore threshold (no objectness loss); boxes: the matched ground truth.
    """

    positive: Tensor
    weight: Tensor
    offsets: Tensor
    log_wh: Tensor
    box_scale: Tensor
    labels: Tensor
    ignore: Tensor
    boxes: Tensor


def assign_to_grid(pred_boxes: Tensor, targets: dict[str, Tensor], grid: AnchorGrid, anchors: Tensor,
                   image_size: tuple[int, int], ignore_threshold: float, coder: GridCoder | None = None) -> GridTargets:
    """darknet's assignment for YOLO heads on one grid (YOLOv2's region layer) or several (YOLOv3's yolo
    layers), for the whole batch.

    Each ground truth (not difficult) is learnt by the one anchor of best shape IoU among all K
    (centres aligned; ties: the first), at the cell of its centre on that anchor's level; of two
    claiming one slot the later keeps it (darknet's loop over truths overwrites). Every other slot
    whose predicted box overlaps any ground truth (difficult ones included) by more than
    ``ignore_threshold`` is ignored by the no-object loss.

    Args:
        pred_boxes: (B, N, 4) decoded predictions, detached, in the grid's slot order.
        targets: boxes (B, M, 4) xyxy px, labels, mask, weights (B, M), optional difficult (B, M).
        grid: the head's slots; anchors: (K, 2) all its anchors at this input size, grouped by level
            in order (``YOLOAnchors.scaled``): anchor k serves level k // (K / L).
    """
    coder = coder or GridCoder()
    batch, num_slots = pred_boxes.shape[:2]
    boxes, mask = targets["boxes"].float(), targets["mask"]
    difficult = targets.get("difficult")
    claims = mask if difficult is None else mask & ~difficult
    per_level = len(anchors) // len(grid.shapes)

    best = shape_iou(boxes[..., 2:] - boxes[..., :2], anchors).argmax(-1)  # (B, M) over all K anchors
    level, index = best // per_level, best % per_level
    # the slot each ground truth claims on every level, then the one on its anchor's level (L is 1 to 5:
    # a loop over levels, not over images or boxes)
    slots = []
    for (h, w), start in zip(grid.shapes, grid.starts):
        row, col = cells_of_centres(boxes, (h, w), image_size)
        slots.append(start + (row * w + col) * per_level + index)
    slot = torch.stack(slots).gather(0, level[None]).squeeze(0)
    owner = owner_of_slots(slot, claims, num_slots, keep="last")  # (B, N)
    positive = owner >= 0
    matched = gather_gt(boxes, owner)
    weight = gather_gt(targets["weights"].float(), owner) * positive
    labels = gather_gt(targets["labels"], owner).clamp(min=0)

    offsets, log_wh = coder.encode(matched, grid.cells, grid.strides, grid.anchors)
    # darknet's 2 - w h, w and h as fractions of the image: small boxes weigh up to twice as much
    width, height = matched[..., 2] - matched[..., 0], matched[..., 3] - matched[..., 1]
    box_scale = 2.0 - width / image_size[1] * height / image_size[0]
    ignore = overlaps_any(pred_boxes, boxes, mask, ignore_threshold) & ~positive
    return GridTargets(positive, weight, offsets, log_wh, box_scale, labels, ignore, matched)
