"""Faster R-CNN's region proposal network (Ren et al. 2015, sec. 3.1): the 3x3 conv and its two sibling
1x1 predictors, the batched proposal selection (decode, clip, drop tiny boxes, pre-NMS top-k, NMS, post-NMS
top-k, all images at once) and the RPN's anchor labelling, sampling and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detectors.assign import gather_gt, match_by_threshold, sample_balanced
from detectors.boxes import DeltaBoxCoder, clip_boxes
from detectors.losses import LossChoice, delta_box_loss, objectness_loss
from detectors.postprocess import grouped_nms


class RPNHead(nn.Module):
    """The RPN's network: a 3x3 conv of ``channels`` + ReLU slid over the map (the paper's "mini-network",
    512-d for VGG16), then per anchor an objectness logit (a sigmoid, as torchvision, instead of the
    paper's two-way softmax) and 4 deltas (1x1 convs). Weights N(0, 0.01), biases 0 (the paper's init).

    forward: (B, C, h, w) -> objectness (B, h w k), deltas (B, h w k, 4), in ``RPNAnchors``' order
    (row-major cells, then anchor).
    """

    def __init__(self, in_channels: int, num_anchors: int, channels: int = 512):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.relu(self.conv(feat))
        batch, _, h, w = x.shape
        objectness = self.objectness(x).permute(0, 2, 3, 1).reshape(batch, -1)
        # (B, k * 4, h, w) -> (B, k, 4, h, w) -> (B, h, w, k, 4): torchvision's channel layout
        deltas = self.deltas(x).view(batch, self.num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        return objectness, deltas


@torch.no_grad()
@torch.compiler.disable  # data-dependent NMS: eager even under model.compile
def select_proposals(objectness: Tensor, deltas: Tensor, anchors: Tensor, coder: DeltaBoxCoder,
                     image_size: tuple[int, int], pre_nms_top_k: int, post_nms_top_k: int, nms_threshold: float,
                     min_size: float = 1e-3, score_threshold: float = 0.0,
                     nms_strategy: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The RPN's proposals for every image at once, as torchvision's ``RegionProposalNetwork.filter_proposals``
    selects them for one level: per image the ``pre_nms_top_k`` anchors of highest objectness, decoded and
    clipped to ``image_size``, without boxes narrower or lower than ``min_size`` or scoring (sigmoid) under
    ``score_threshold``, NMS at ``nms_threshold`` (exact per-image greedy NMS, one call for the batch:
    ``postprocess.grouped_nms`` with the image as the group), then the best ``post_nms_top_k`` survivors.
    Nothing here is differentiated (the paper's approximate joint training: no gradient through proposals).
    ``nms_strategy``: ``grouped_nms``'s strategy; ``"scan"`` (the training step's) reads nothing back from
    the device, so the whole selection runs without a host sync; None: its rule (per-image ``nms`` calls).

    Args:
        objectness: (B, A) logits; deltas: (B, A, 4); anchors: (A, 4) cxcywh.
    Returns:
        boxes (B, P, 4) xyxy, scores (B, P) sigmoid, valid (B, P) bool, P = min(post_nms_top_k, A): each
        image's proposals first, in descending score, then padding (zeros, not valid).
    """
    batch, num_anchors = objectness.shape
    k = min(pre_nms_top_k, num_anchors)
    logits, index = objectness.float().topk(k, dim=1)  # (B, k), descending
    chosen = deltas.float().gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    boxes = clip_boxes(coder.decode(chosen, anchors.float()[index]), image_size)
    scores = logits.sigmoid()
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (wh >= min_size).all(-1) & (scores >= score_threshold)
    kept = grouped_nms(boxes, scores, valid, nms_threshold, nms_strategy)  # (B, k), in score order
    kept &= kept.cumsum(1) <= post_nms_top_k
    # the kept ones of each row to the front, in their score order (a stable sort of "not kept")
    slots = (~kept).to(torch.uint8).argsort(dim=1, stable=True)[:, :min(post_nms_top_k, k)]
    valid = kept.gather(1, slots)
    boxes = torch.where(valid.unsqueeze(-1), boxes.gather(1, slots.unsqueeze(-1).expand(-1, -1, 4)), 0.0)
    return boxes, torch.where(valid, scores.gather(1, slots), 0.0), valid


@dataclass
class RPNTargets:
    """The RPN's sampled anchors (all (B, A)): positive / negative bool, weight (the matched ground
    truth's per-box weight on positives, 1 on negatives, 0 elsewhere), matched_boxes (B, A, 4)."""

    positive: Tensor
    negative: Tensor
    weight: Tensor
    matched_boxes: Tensor


def rpn_targets(anchors_xyxy: Tensor, targets: dict[str, Tensor], fg_iou: float, bg_iou: float, num_samples: int,
                positive_fraction: float) -> RPNTargets:
    """Label the anchors (IoU >= ``fg_iou`` or the best anchor(s) of a ground truth: positive; < ``bg_iou``:
    negative; the rest ignored) and sample ``num_samples`` per image, at most ``positive_fraction`` positive
    (the paper's 256 anchors, up to 1:1). An anchor whose ground truth is ``difficult`` is ignored, as VOC
    training ignores those objects.

    anchors_xyxy: (A, 4); targets: boxes (B, M, 4), mask, weights (B, M), optional difficult (B, M).
    """
    boxes, mask = targets["boxes"], targets["mask"]
    match = match_by_threshold(anchors_xyxy, boxes, mask, fg_iou, bg_iou, best_match=True)
    positive = match.positive
    if "difficult" in targets:
        positive = positive & ~gather_gt(targets["difficult"], match.gt_index)
    positive, negative = sample_balanced(positive, match.negative, num_samples, positive_fraction)
    weight = torch.where(positive, gather_gt(targets["weights"].float(), match.gt_index), negative.float())
    return RPNTargets(positive, negative, weight, gather_gt(boxes.float(), match.gt_index))


def rpn_loss(objectness: Tensor, deltas: Tensor, anchors: Tensor, t: RPNTargets, coder: DeltaBoxCoder,
             losses: LossChoice) -> tuple[Tensor, Tensor]:
    """The RPN's two terms, normalised as torchvision's: the objectness loss (``losses.obj``, BCE by default)
    averaged over the sampled anchors, the box loss (``losses.box``: smooth L1 on the deltas by default,
    the IoU family on the decoded boxes) summed over the sampled positives and divided by the number of
    sampled anchors (the paper's lambda = 10 over ~2400 anchor positions is about that, 1/256).

    objectness (B, A) logits; deltas (B, A, 4); anchors (A, 4) cxcywh -> (loss_objectness, loss_rpn_box).
    """
    num_sampled = (t.positive | t.negative).sum().clamp(min=1).float()
    per_anchor = objectness_loss(losses.obj, objectness, t.positive.float(), losses.focal_alpha, losses.focal_gamma)
    loss_objectness = (per_anchor * t.weight).sum() / num_sampled
    per_box = delta_box_loss(losses, deltas.float(), t.matched_boxes, coder, anchors)
    # torch.where, not a product: a negative's target can be far off (0 x inf would be NaN)
    loss_box = torch.where(t.positive, per_box * t.weight, 0.0).sum() / num_sampled
    return loss_objectness, loss_box

