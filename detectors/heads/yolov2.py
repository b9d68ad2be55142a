"""YOLOv2 head (Redmon and Farhadi 2017): anchors on one grid, direct location prediction, darknet's
region-layer assignment and loss, batched over the padded batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectors.anchors import YOLOAnchors
from detectors.assign import GridTargets, assign_to_grid
from detectors.boxes import GridCoder, clip_boxes, paired_box_iou
from detectors.losses import (
    BOX_LOSSES,
    CLASS_LOSSES,
    IOU_LOSSES,
    OBJECTNESS_LOSSES,
    box_regression_loss,
    choose_losses,
    class_probabilities,
    label_class_loss,
    objectness_loss,
)
from detectors.postprocess import multiclass_nms
from detectors.timing import stage

__all__ = ["VOC_ANCHORS_416", "GridTargets", "YOLOv2Head", "YOLOv2Raw"]

# the paper's VOC anchors (darknet's yolov2-voc.cfg, in 13x13 grid cells) in pixels of a 416 x 416 input
VOC_ANCHORS_416 = ((42.31, 55.41), (102.17, 128.30), (161.79, 259.17), (303.08, 154.90), (359.56, 320.23))


@dataclass
class YOLOv2Raw:
    """Raw YOLOv2 outputs: output (B, h, w, A, 5 + C) = t_x, t_y, t_w, t_h, t_o (objectness logit) and the
    class logits per cell and anchor, before any activation."""

    output: Tensor


class YOLOv2Head(nn.Module):
    """YOLOv2's detection layer, region loss and decoding.

    Args:
        in_channels: channels of the neck's one map (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1).
        anchors: (A, 2) anchor widths and heights in pixels of an input of ``input_size``; at another
            input size they scale with the image, as darknet's anchors in grid cells do (multi-scale).
        input_size: (H, W) the anchors are given for.
        coord_scale, object_scale, noobject_scale, class_scale: darknet's region-layer scales (1, 5, 1, 1).
        ignore_threshold: a non-responsible prediction whose box overlaps a ground truth by more than
            this gets no no-object loss (darknet's ``thresh``, 0.6).
        prior_warmup_images: for the first this many training images every non-responsible prediction
            also learns its anchor's box (offset 0.5, size the anchor's) at ``prior_scale`` (12800, 0.01).
        losses: the ``loss`` config. ``box``: sse (default: darknet's squared error on the sigmoid offsets
            and t_w, t_h), smooth_l1, l1 (on the same), iou, giou, diou, ciou (on the decoded boxes); all
            scaled by 2 - w h. ``cls``: ce (default: softmax, darknet's), softmax_focal, bce, focal (sigmoids
            per class). ``obj``: bce (default), sse (darknet's squared error on the sigmoid), focal. BCE is
            the default objectness because SSE's gradient vanishes with the sigmoid's slope: from scratch,
            the objectness of a fresh head sits where both terms push it to 0 and stays there (the overfit
            preset's objectness stalled near 0 with SSE). ``focal_alpha``, ``focal_gamma``,
            ``smooth_l1_beta`` as in configs/loss/default.yaml.
        score_threshold, nms_threshold, max_detections, pre_nms_top_k: decoding (darknet's mAP settings:
            0.005, 0.45; 100 per image; candidates per class and image before NMS).
        strides: the neck's nominal stride (set by ``Detector``; the grid comes from the map's shape).

    The loss terms are darknet's deltas as gradients: squared errors carry a factor 1/2 (the gradient of
    ``s (t - x)^2 / 2`` is darknet's delta ``s (t - x)``), the softmax cross-entropy's gradient is darknet's
    class delta. Sums over the batch are divided by its size (darknet divides the learning rate by it).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        anchors: Sequence[Sequence[float]] = VOC_ANCHORS_416,
        input_size: Sequence[int] = (416, 416),
        coord_scale: float = 1.0,
        object_scale: float = 5.0,
        noobject_scale: float = 1.0,
        class_scale: float = 1.0,
        ignore_threshold: float = 0.6,
        prior_warmup_images: int = 12800,
        prior_scale: float = 0.01,
        losses: Mapping[str, Any] | None = None,
        score_threshold: float = 0.005,
        nms_threshold: float = 0.45,
        max_detections: int = 100,
        pre_nms_top_k: int = 300,
        strides: Sequence[int] = (),
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(in_channels) != 1:
            raise ValueError(f"the YOLOv2 head predicts on one map, the neck gives {len(in_channels)}")
        self.yolo_anchors = YOLOAnchors(anchors, input_size, num_levels=1)
        self.num_classes = num_classes
        self.coord_scale, self.object_scale = coord_scale, object_scale
        self.noobject_scale, self.class_scale = noobject_scale, class_scale
        self.ignore_threshold = ignore_threshold
        self.prior_warmup_images, self.prior_scale = prior_warmup_images, prior_scale
        self.losses = choose_losses("YOLOv2", losses, {"box": "sse", "cls": "ce", "obj": "bce"},
                                    {"box": BOX_LOSSES, "cls": CLASS_LOSSES, "obj": OBJECTNESS_LOSSES})
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections, self.pre_nms_top_k = max_detections, pre_nms_top_k
        self.coder = GridCoder()
        num_anchors = len(self.anchors)
        self.predictor = nn.Conv2d(in_channels[0], num_anchors * (5 + num_classes), 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)
        with torch.no_grad():  # objectness starts at 1% (RetinaNet's prior): the no-object term does not swamp the start
            self.predictor.bias.view(num_anchors, 5 + num_classes)[:, 4] = math.log(0.01 / 0.99)
        # training images seen, for the prior-matching term; in the state dict, so a resumed run goes on counting
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))

    @property
    def anchors(self) -> Tensor:
        """(A, 2) the anchors in pixels of an input of ``input_size``."""
        return self.yolo_anchors.anchors

    @property
    def input_size(self) -> tuple[int, int]:
        return self.yolo_anchors.input_size

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> YOLOv2Raw:
        """feats: [(B, C, h, w)] -> YOLOv2Raw (B, h, w, A, 5 + C); darknet's channel layout is
        (anchor, 5 + C), so the 1x1 conv's output reshapes to it."""
        x = self.predictor(feats[-1])
        batch, _, h, w = x.shape
        return YOLOv2Raw(x.view(batch, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2))

    def anchors_for(self, image_size: tuple[int, int], device: torch.device) -> Tensor:
        """(A, 2) anchor sizes in pixels of an input of ``image_size``: scaled with the image."""
        return self.yolo_anchors.scaled(image_size, device)

    def decode(self, raw: YOLOv2Raw, image_size: tuple[int, int]) -> Tensor:
        """(B, h, w, A, 4) xyxy boxes in pixels of the input."""
        out = raw.output.float()
        return self.coder.decode(out[..., :2].sigmoid(), out[..., 2:4], self.anchors_for(image_size, out.device),
                                 image_size)

    def assign(self, pred_boxes: Tensor, targets: dict[str, Tensor], image_size: tuple[int, int]) -> GridTargets:
        """darknet's region-layer assignment for the whole batch (``detectors.assign.assign_to_grid`` on
        one grid): each ground truth (not difficult) is learnt by the anchor of best shape IoU at the cell
        of its centre, the later of two keeps a slot, and predictions overlapping any ground truth by more
        than ``ignore_threshold`` are ignored by the no-object loss.

        pred_boxes: (B, h, w, A, 4) decoded, detached; targets: boxes (B, M, 4), labels, mask, weights
        (B, M), optional difficult (B, M) -> GridTargets of (B, h, w, A[, k]).
        """
        batch, grid_h, grid_w, num_anchors, _ = pred_boxes.shape
        grid = self.yolo_anchors.grid([(grid_h, grid_w)], image_size, pred_boxes.device)
        t = assign_to_grid(pred_boxes.reshape(batch, -1, 4), targets, grid,
                           self.anchors_for(image_size, pred_boxes.device), image_size, self.ignore_threshold,
                           self.coder)
        shape = (batch, grid_h, grid_w, num_anchors)
        return GridTargets(*(v.view(*shape, *v.shape[2:]) for v in vars(t).values()))

    def loss(self, raw: YOLOv2Raw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """darknet's region loss over the batch, divided by the batch size.

        Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls', 'num_positives'}; no host sync.
        """
        out = raw.output.float()
        offsets, log_wh, objectness, class_logits = out[..., :2].sigmoid(), out[..., 2:4], out[..., 4], out[..., 5:]
        pred_boxes = self.coder.decode(offsets, log_wh, self.anchors_for(image_size, out.device), image_size)
        with stage("assign"):
            t = self.assign(pred_boxes.detach(), targets, image_size)
        with stage("loss"):
            batch = out.shape[0]
            if self.losses.box in IOU_LOSSES:
                per_box = box_regression_loss(self.losses.box, pred_boxes, t.boxes)
            else:
                per_box = box_regression_loss(self.losses.box, torch.cat([offsets, log_wh], -1),
                                              torch.cat([t.offsets, t.log_wh], -1), self.losses.smooth_l1_beta)
            # torch.where, not a product: a slot without a ground truth has no meaningful target
            loss_box = self.coord_scale * torch.where(t.positive, t.weight * t.box_scale * per_box, 0.0).sum()
            if self.training:
                # the prior-matching term: non-responsible boxes towards their anchor, for the first images
                early = (self.images_seen < self.prior_warmup_images).float()
                to_prior = (offsets - 0.5).pow(2).sum(-1) + log_wh.pow(2).sum(-1)
                loss_box = loss_box + early * 0.5 * self.prior_scale * (to_prior * ~t.positive).sum()
                self.images_seen += batch
            iou = paired_box_iou(pred_boxes.detach(), t.boxes)  # rescore: objectness learns the IoU
            loss_obj = self.object_scale * (t.weight * self._objectness(objectness, iou)).sum()
            noobj = ~t.positive & ~t.ignore
            loss_noobj = self.noobject_scale * (noobj * self._objectness(objectness, torch.zeros_like(iou))).sum()
            loss_cls = self.class_scale * (t.weight * label_class_loss(self.losses, class_logits, t.labels)).sum()
            terms = {"loss_box": loss_box / batch, "loss_obj": loss_obj / batch, "loss_noobj": loss_noobj / batch,
                     "loss_cls": loss_cls / batch}
            return {"loss": sum(terms.values()), **terms, "num_positives": t.positive.sum().float()}

    def _objectness(self, logits: Tensor, target: Tensor) -> Tensor:
        return objectness_loss(self.losses.obj, logits, target, self.losses.focal_alpha, self.losses.focal_gamma)

    @torch.no_grad()
    def predict(self, raw: YOLOv2Raw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Score = objectness x class probability, per class above ``score_threshold``, per-class NMS,
        the best ``max_detections`` per image.

        Returns one dict per image: boxes (N, 4) xyxy in pixels of the input, scores (N,), labels (N,) 0..C-1.
        """
        out = raw.output.float()
        batch = out.shape[0]
        scores = out[..., 4:5].sigmoid() * class_probabilities(self.losses, out[..., 5:])  # (B, h, w, A, C)
        boxes = clip_boxes(self.decode(raw, image_size), image_size)
        return multiclass_nms(boxes.reshape(batch, -1, 4), scores.reshape(batch, -1, self.num_classes),
                              self.score_threshold, self.nms_threshold, self.pre_nms_top_k, self.max_detections)
