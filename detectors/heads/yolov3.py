"""YOLOv3 head (Redmon and Farhadi 2018): 3 anchors per scale on three grids, darknet's yolo-layer
assignment and loss, independent logistic classifiers, batched over the padded batch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.anchors import AnchorGrid, YOLOAnchors
from detectors.assign import GridTargets, assign_to_grid
from detectors.boxes import GridCoder, clip_boxes
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

# the paper's COCO anchors (darknet's yolov3.cfg) in pixels of a 416 x 416 input, by area: three per scale,
# strides 8, 16, 32 in turn
COCO_ANCHORS_416 = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))


@dataclass
class YOLOv3Raw:
    """Raw YOLOv3 outputs, every level's (B, h_l, w_l, A, 5 + C) flattened and concatenated, finest level
    first (the slot order of ``detectors.anchors.AnchorGrid``): output (B, N, 5 + C) = t_x, t_y, t_w, t_h,
    t_o (objectness logit) and the class logits, before any activation; shapes: (h_l, w_l) per level."""

    output: Tensor
    shapes: tuple[tuple[int, int], ...]


class YOLOv3Head(nn.Module):
    """YOLOv3's predictors (one 1x1 conv per scale to A x (5 + C)), yolo-layer loss and decoding.

    Args:
        in_channels: channels of the neck's maps, strides ascending (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1).
        anchors: (K, 2) widths and heights in pixels of an input of ``input_size``, K / L per level in
            order, the first group on the finest level (``detectors.anchors.YOLOAnchors``); they scale with
            the image at other input sizes.
        input_size: (H, W) the anchors are given for.
        ignore_threshold: a non-responsible prediction whose box overlaps a ground truth by more than
            this gets no objectness loss (the paper's 0.5; darknet's yolov3.cfg has ``ignore_thresh = .7``).
        coord_scale, object_scale, noobject_scale, class_scale: weights of the four terms (darknet: all 1).
        losses: the ``loss`` config (configs/loss/default.yaml). ``box``: sse (default: half the squared error
            of t_w, t_h, darknet's), smooth_l1, l1 (on the offsets and t_w, t_h), iou, giou, diou, ciou (on the
            decoded boxes); all scaled by 2 - w h. ``cls``: bce (default: a logistic classifier per class, the
            paper's multi-label choice), focal, ce, softmax_focal (a softmax, YOLOv2's). ``obj``: bce
            (default: darknet's delta ``1 - sigmoid(x)`` is BCE's gradient on the logit), sse, focal.
        xy_bce: with the offset box losses (sse, smooth_l1, l1), x and y learn by BCE of their logits against
            the target offsets in the cell (default): darknet's yolo layer writes ``scale (t - sigmoid(x))``
            as the delta of x and passes it back without the logistic's slope, which is the gradient of BCE
            with the soft target t. False: the box loss of the sigmoid offsets (with sse: the squared error the
            paper writes). The IoU losses take the whole decoded box and ignore it.
        score_threshold, nms_threshold, max_detections, pre_nms_top_k: decoding (darknet's mAP settings:
            0.005, 0.45; 100 per image; candidates per class and image before NMS).
        strides: the neck's strides (set by ``Detector``; the grids come from the maps' shapes).

    The loss is darknet's deltas as gradients: the box term ``(2 - w h)`` x (xy loss + ``(t_wh - t)^2 / 2``),
    objectness BCE with target 1 at responsible slots (no rescore: darknet's yolo layer, unlike its
    region layer, learns 1, not the IoU) and 0 elsewhere except the ignored, and BCE on every class
    (multi-label: independent logistic classifiers, no softmax). Each term of a box is scaled by its
    per-box weight (mixup). Sums over the batch are divided by its size (darknet divides the learning
    rate by it). Of two ground truths claiming one slot the later keeps it, box and class (darknet lets
    the later one add its class to the earlier's one-hot; here it takes the slot whole).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        anchors: Sequence[Sequence[float]] = COCO_ANCHORS_416,
        input_size: Sequence[int] = (416, 416),
        ignore_threshold: float = 0.5,
        coord_scale: float = 1.0,
        object_scale: float = 1.0,
        noobject_scale: float = 1.0,
        class_scale: float = 1.0,
        losses: Mapping[str, Any] | None = None,
        xy_bce: bool = True,
        score_threshold: float = 0.005,
        nms_threshold: float = 0.45,
        max_detections: int = 100,
        pre_nms_top_k: int = 300,
        strides: Sequence[int] = (),
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.yolo_anchors = YOLOAnchors(anchors, input_size, num_levels=len(in_channels))
        self.num_classes = num_classes
        self.ignore_threshold = ignore_threshold
        self.coord_scale, self.object_scale = coord_scale, object_scale
        self.noobject_scale, self.class_scale = noobject_scale, class_scale
        self.losses = choose_losses("YOLOv3", losses, {"box": "sse", "cls": "bce", "obj": "bce"},
                                    {"box": BOX_LOSSES, "cls": CLASS_LOSSES, "obj": OBJECTNESS_LOSSES})
        self.xy_bce = xy_bce
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections, self.pre_nms_top_k = max_detections, pre_nms_top_k
        self.coder = GridCoder()
        per_level = self.yolo_anchors.per_level
        self.predictors = nn.ModuleList(nn.Conv2d(c, per_level * (5 + num_classes), 1) for c in in_channels)
        for predictor in self.predictors:
            nn.init.normal_(predictor.weight, std=0.01)
            nn.init.zeros_(predictor.bias)
            with torch.no_grad():  # objectness starts at 1% (RetinaNet's prior): the no-object term does not swamp the start
                predictor.bias.view(per_level, 5 + num_classes)[:, 4] = math.log(0.01 / 0.99)

    @property
    def anchors(self) -> Tensor:
        """(K, 2) the anchors in pixels of an input of ``input_size``, grouped by level."""
        return self.yolo_anchors.anchors

    @property
    def num_anchors(self) -> int:
        """Anchors per level (per cell)."""
        return self.yolo_anchors.per_level

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> YOLOv3Raw:
        """feats: [(B, C_l, h_l, w_l)] strides ascending -> YOLOv3Raw (B, sum_l h_l w_l A, 5 + C); darknet's
        channel layout per level is (anchor, 5 + C), so each 1x1 conv's output reshapes to it."""
        outputs, shapes = [], []
        for feat, predictor in zip(feats, self.predictors, strict=True):
            x = predictor(feat)
            batch, _, h, w = x.shape
            x = x.view(batch, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(x.reshape(batch, h * w * self.num_anchors, 5 + self.num_classes))
            shapes.append((h, w))
        return YOLOv3Raw(torch.cat(outputs, 1), tuple(shapes))

    def grid(self, raw: YOLOv3Raw, image_size: tuple[int, int]) -> AnchorGrid:
        return self.yolo_anchors.grid(raw.shapes, image_size, raw.output.device)

    def decode(self, raw: YOLOv3Raw, image_size: tuple[int, int]) -> Tensor:
        """(B, N, 4) xyxy boxes in pixels of the input."""
        out, grid = raw.output.float(), self.grid(raw, image_size)
        return self.coder.decode_slots(out[..., :2].sigmoid(), out[..., 2:4], grid.cells, grid.strides, grid.anchors)

    def assign(self, raw: YOLOv3Raw, pred_boxes: Tensor, targets: dict[str, Tensor],
               image_size: tuple[int, int]) -> GridTargets:
        """darknet's yolo-layer assignment over all levels at once (``detectors.assign.assign_to_grid``):
        each ground truth (not difficult) goes to the one anchor of best shape IoU among all K, at its
        centre's cell on that anchor's level; the later of two keeps a slot; predictions overlapping any
        ground truth by more than ``ignore_threshold`` are ignored. pred_boxes: (B, N, 4), detached."""
        return assign_to_grid(pred_boxes, targets, self.grid(raw, image_size),
                              self.yolo_anchors.scaled(image_size, pred_boxes.device), image_size,
                              self.ignore_threshold, self.coder)

    def loss(self, raw: YOLOv3Raw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """darknet's yolo-layer loss over the batch, divided by the batch size.

        Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls', 'num_positives'}; no host sync.
        """
        out = raw.output.float()
        xy_logits, log_wh, objectness, class_logits = out[..., :2], out[..., 2:4], out[..., 4], out[..., 5:]
        grid = self.grid(raw, image_size)
        offsets = xy_logits.sigmoid()
        pred_boxes = self.coder.decode_slots(offsets, log_wh, grid.cells, grid.strides, grid.anchors)
        with stage("assign"):
            t = self.assign(raw, pred_boxes.detach(), targets, image_size)
        with stage("loss"):
            batch = out.shape[0]
            per_box = self._box_loss(xy_logits, offsets, log_wh, pred_boxes, t)
            # torch.where, not a product: a slot without a ground truth has no meaningful target
            loss_box = self.coord_scale * torch.where(t.positive, t.weight * t.box_scale * per_box, 0.0).sum()
            loss_obj = self.object_scale * (t.weight * self._objectness(objectness, torch.ones_like(objectness))).sum()
            noobj = ~t.positive & ~t.ignore
            loss_noobj = self.noobject_scale * (noobj * self._objectness(objectness, torch.zeros_like(objectness))).sum()
            loss_cls = self.class_scale * (t.weight * label_class_loss(self.losses, class_logits, t.labels)).sum()
            terms = {"loss_box": loss_box / batch, "loss_obj": loss_obj / batch, "loss_noobj": loss_noobj / batch,
                     "loss_cls": loss_cls / batch}
            return {"loss": sum(terms.values()), **terms, "num_positives": t.positive.sum().float()}

    def _box_loss(self, xy_logits: Tensor, offsets: Tensor, log_wh: Tensor, pred_boxes: Tensor,
                  t: GridTargets) -> Tensor:
        """Per-slot box loss (B, N), before the 2 - w h scale and the box's weight."""
        if self.losses.box in IOU_LOSSES:
            return box_regression_loss(self.losses.box, pred_boxes, t.boxes)
        if self.xy_bce:
            xy = F.binary_cross_entropy_with_logits(xy_logits, t.offsets, reduction="none").sum(-1)
            return xy + box_regression_loss(self.losses.box, log_wh, t.log_wh, self.losses.smooth_l1_beta)
        return box_regression_loss(self.losses.box, torch.cat([offsets, log_wh], -1),
                                   torch.cat([t.offsets, t.log_wh], -1), self.losses.smooth_l1_beta)

    def _objectness(self, logits: Tensor, target: Tensor) -> Tensor:
        return objectness_loss(self.losses.obj, logits, target, self.losses.focal_alpha, self.losses.focal_gamma)

    @torch.no_grad()
    def predict(self, raw: YOLOv3Raw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Score = objectness x class probability (a sigmoid per class, as the default bce trains them; a
        softmax under loss.cls=ce), per class above ``score_threshold``, per-class NMS, the best
        ``max_detections`` per image.

        Returns one dict per image: boxes (N, 4) xyxy in pixels of the input, scores (N,), labels (N,) 0..C-1.
        """
        out = raw.output.float()
        scores = out[..., 4:5].sigmoid() * class_probabilities(self.losses, out[..., 5:])  # (B, N, C)
        boxes = clip_boxes(self.decode(raw, image_size), image_size)
        return multiclass_nms(boxes, scores, self.score_threshold, self.nms_threshold, self.pre_nms_top_k,
                              self.max_detections)
