"""Faster R-CNN's RoI head (Girshick 2015, Fast R-CNN; Ren et al. 2015, sec. 3): RoIAlign (or RoI pooling)
of each proposal from the stride-s map, two fully connected layers, class scores over C + 1 (background 0)
and class-specific box deltas; the batched sampling of RoIs with their targets, and the RoI loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, roi_align, roi_pool

from detectors.assign import gather_gt, match_by_threshold, sample_balanced
from detectors.boxes import DeltaBoxCoder
from detectors.losses import LossChoice, class_loss, delta_box_loss


class RoIBoxHead(nn.Module):
    """Pool every RoI to ``output_size`` x ``output_size`` (``torchvision.ops.roi_align``, spatial scale
    1 / stride, ``sampling_ratio`` 2, as torchvision's Faster R-CNN; ``roi_pool=True``: the paper's RoI max
    pooling, ``torchvision.ops.roi_pool``), then fc6 and fc7 of ``fc_width`` + ReLU (VGG16's 4096 in the paper;
    torchvision's ``TwoMLPHead``, no dropout), then the class scores (C + 1) and the class-specific deltas
    (4 per foreground class: the background's would never be used). Predictors N(0, 0.01) and N(0, 0.001)
    (the Fast R-CNN init), fc6/fc7 PyTorch's default init.

    forward: feat (B, C_in, h, w), boxes (B, K, 4) xyxy in input pixels [, valid (B, K)] -> class logits
    (B, K, C + 1), deltas (B, K, C, 4). With ``valid``, only the valid RoIs are pooled and classified (one
    host read: for evaluation, where images have up to 1000 proposals of which some may be padding); the
    others come back as zeros. Without grad it runs ``eval_chunk`` RoIs at a time (bounded memory: a batch
    of 32 x 1000 RoIs of VGG16's 512 x 7 x 7 is 3.2 GB at once).
    """

    def __init__(self, in_channels: int, num_classes: int, stride: float, output_size: int = 7,
                 sampling_ratio: int = 2, roi_pool: bool = False, fc_width: int = 4096, eval_chunk: int = 4096):
        super().__init__()
        self.num_classes = num_classes
        self.spatial_scale = 1.0 / stride
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.use_roi_pool = roi_pool
        self.eval_chunk = eval_chunk
        self.fc6 = nn.Linear(in_channels * output_size * output_size, fc_width)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.cls_score = nn.Linear(fc_width, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_width, num_classes * 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def pool(self, feat: Tensor, rois: Tensor) -> Tensor:
        """feat (B, C, h, w), rois (K, 5) = (image index, x1, y1, x2, y2) in input pixels -> (K, C, s, s)
        float32: the op wants one dtype, and bf16 coordinates would be 2 to 4 px off at 600 px (torchvision's
        autocast wrapper casts both to float32 too)."""
        feat, rois = feat.float(), rois.float()
        if self.use_roi_pool:
            return roi_pool(feat, rois, self.output_size, self.spatial_scale)
        return roi_align(feat, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def classify(self, feat: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """feat (B, C, h, w), rois (K, 5) -> logits (K, C + 1), deltas (K, C * 4)."""
        x = self.pool(feat, rois).flatten(1)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, feat: Tensor, boxes: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, num_rois = boxes.shape[:2]
        rois = to_rois(boxes)
        keep = None
        if valid is not None:
            keep = valid.flatten().nonzero().squeeze(1)
            rois = rois[keep]
        if torch.is_grad_enabled() or len(rois) <= self.eval_chunk:
            logits, deltas = self.classify(feat, rois)
        else:
            parts = [self.classify(feat, part) for part in rois.split(self.eval_chunk)]
            logits, deltas = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if keep is not None:
            logits = logits.new_zeros(batch * num_rois, logits.shape[1]).index_copy_(0, keep, logits)
            deltas = deltas.new_zeros(batch * num_rois, deltas.shape[1]).index_copy_(0, keep, deltas)
        return logits.view(batch, num_rois, -1), deltas.view(batch, num_rois, self.num_classes, 4)


def to_rois(boxes: Tensor) -> Tensor:
    """(B, K, 4) xyxy per image -> (B K, 5) rows (image index, x1, y1, x2, y2), image-major: the form
    ``torchvision.ops.roi_align`` takes for a whole batch at once."""
    batch, num_rois = boxes.shape[:2]
    image_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(num_rois)
    return torch.cat([image_index[:, None], boxes.reshape(-1, 4)], dim=1)


@dataclass
class RoISamples:
    """The RoIs sampled for training (all (B, S[, 4])): boxes xyxy (proposals and ground truths), valid
    (False: padding, where an image had fewer candidates than S), labels (0 background, 1..C), matched_boxes
    (the ground truth of a foreground RoI), weight (its per-box weight on foreground, 1 on background,
    0 on padding)."""

    boxes: Tensor
    valid: Tensor
    labels: Tensor
    matched_boxes: Tensor
    weight: Tensor


@torch.no_grad()
@torch.compiler.disable  # data-dependent sampling: eager even under model.compile
def sample_rois(proposals: Tensor, valid: Tensor, targets: dict[str, Tensor], num_samples: int,
                positive_fraction: float, fg_iou: float, bg_iou: float, bg_iou_low: float = 0.0) -> RoISamples:
    """Fast R-CNN's RoI sampling (Girshick 2015, sec. 2.3; torchvision's ``RoIHeads.select_training_samples``),
    batched: the ground truths join each image's proposals, each candidate takes its best ground truth,
    IoU >= ``fg_iou`` is foreground, ``[bg_iou_low, bg_iou)`` background (the paper's [0.1, 0.5); torchvision's
    [0, 0.5)), and ``num_samples`` per image are drawn, at most ``positive_fraction`` foreground (512 at 25%).
    A foreground candidate of a ``difficult`` ground truth is ignored (VOC training ignores those objects).

    Args:
        proposals: (B, P, 4) xyxy; valid: (B, P) bool.
        targets: boxes (B, M, 4), labels, mask, weights (B, M), optional difficult (B, M).
    Returns:
        RoISamples of S = min(num_samples, P + M) slots per image, the sampled ones first.
    """
    gt_boxes, gt_mask = targets["boxes"].float(), targets["mask"]
    candidates = torch.cat([proposals.float(), gt_boxes], dim=1)  # (B, N, 4), N = P + M
    usable = torch.cat([valid, gt_mask], dim=1)
    match = match_by_threshold(candidates, gt_boxes, gt_mask, fg_iou, bg_iou, bg_iou_low)
    positive, negative = match.positive & usable, match.negative & usable
    if "difficult" in targets:
        positive = positive & ~gather_gt(targets["difficult"], match.gt_index)
    positive, negative = sample_balanced(positive, negative, num_samples, positive_fraction)
    sampled = positive | negative
    slots = (~sampled).to(torch.uint8).argsort(dim=1, stable=True)[:, :min(num_samples, candidates.shape[1])]
    taken = sampled.gather(1, slots)
    gt_index = match.gt_index.gather(1, slots)
    foreground = positive.gather(1, slots)
    labels = torch.where(foreground, gather_gt(targets["labels"], gt_index) + 1, 0)
    weight = torch.where(foreground, gather_gt(targets["weights"].float(), gt_index), taken.float())
    boxes = candidates.gather(1, slots.unsqueeze(-1).expand(-1, -1, 4))
    return RoISamples(boxes, taken, labels, gather_gt(gt_boxes, gt_index), weight)


def roi_loss(logits: Tensor, deltas: Tensor, samples: RoISamples, coder: DeltaBoxCoder,
             losses: LossChoice) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's multi-task loss (Girshick 2015, eq. 1), normalised as torchvision's ``fastrcnn_loss``:
    the class loss (``losses.cls``: softmax cross-entropy by default; softmax_focal; bce / focal on sigmoids of
    the C foreground logits) averaged over the sampled RoIs, the box loss (``losses.box`` on the true class's
    deltas against ``coder``'s targets, or on the decoded boxes for the IoU family) summed over the foreground
    and divided by the number of sampled RoIs.

    logits (B, S, C + 1), deltas (B, S, C, 4) -> (loss_cls, loss_box).
    """
    labels = samples.labels
    num_sampled = samples.valid.sum().clamp(min=1).float()
    loss_cls = (class_loss(losses, logits.float(), labels, background=True) * samples.weight).sum() / num_sampled

    foreground = labels > 0
    index = (labels - 1).clamp(min=0)[..., None, None].expand(-1, -1, 1, 4)
    pred = deltas.float().gather(2, index).squeeze(2)  # (B, S, 4): the true class's deltas
    references = box_convert(samples.boxes, "xyxy", "cxcywh")
    # padding's zero boxes would give infinite targets (and NaN gradients through the mask)
    references = torch.cat([references[..., :2], references[..., 2:].clamp(min=1e-3)], dim=-1)
    per_box = delta_box_loss(losses, pred, samples.matched_boxes, coder, references)
    loss_box = torch.where(foreground, per_box * samples.weight, 0.0).sum() / num_sampled
    return loss_cls, loss_box
