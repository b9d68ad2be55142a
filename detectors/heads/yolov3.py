"""YOLOv3 head (Redmon and Farhadi 2018): 3 anchors per scale on three grids, darknet's yolo-layer
assignment and loss, independent logistic classifiers, batched over the padded batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectors.heads.class_axes import ClassAxis
from detectors.heads.yolo_grid import YOLOGridHead
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


class YOLOv3Head(YOLOGridHead):
    """YOLOv3's predictors (one 1x1 conv per scale to A x (5 + C)), yolo-layer loss and decoding.

    Args:
        in_channels: channels of the neck's maps, strides ascending (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1).
        anchors: (K, 2) widths and heights in pixels of an input of ``input_size``, K / L per level in
            order, the first group on the finest level (``detectors.anchors.YOLOAnchors``); they scale with
            the image at other input sizes.
        input_size: (H, W) the anchors are given for.
        default_anchors, auto_anchors: ``anchors="auto"``'s starting anchors and refit settings
            (``YOLOGridHead``).
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
        default_anchors: Sequence[Sequence[float]] = COCO_ANCHORS_416,
        auto_anchors: Mapping[str, float] | None = None,
    ):
        super().__init__("YOLOv3", num_classes, anchors, input_size, len(in_channels),
                         ignore_threshold=ignore_threshold, coord_scale=coord_scale, object_scale=object_scale,
                         noobject_scale=noobject_scale, class_scale=class_scale, losses=losses, default_cls="bce",
                         score_threshold=score_threshold, nms_threshold=nms_threshold,
                         max_detections=max_detections, pre_nms_top_k=pre_nms_top_k,
                         strides=strides, default_anchors=default_anchors, auto_anchors=auto_anchors)
        self.xy_bce = xy_bce
        self.predictors = nn.ModuleList(nn.Conv2d(c, self.num_anchors * (5 + num_classes), 1) for c in in_channels)
        for predictor in self.predictors:
            self.init_predictor(predictor)

    def class_axes(self) -> dict[str, ClassAxis]:
        return self.predictor_axes(list(self.predictors))

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

    def loss(self, raw: YOLOv3Raw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """darknet's yolo-layer loss over the batch, divided by the batch size: the box term (``xy_bce``),
        objectness towards 1 at the responsible slots (no rescore), the class loss. The assignment is
        ``YOLOGridHead.assign`` over all levels at once.

        Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls', 'num_positives'}; no host sync.
        """
        out, offsets, pred_boxes, t = self.decode_for_loss(raw, targets, image_size)
        with stage("loss"):
            loss_box = self.box_term(out, offsets, pred_boxes, t, self.xy_bce)
            return self.loss_terms(out, t, loss_box, torch.ones_like(out[..., 4]))
