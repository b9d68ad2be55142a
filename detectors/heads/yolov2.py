"""YOLOv2 head (Redmon and Farhadi 2017): anchors on one grid, direct location prediction, darknet's
region-layer assignment and loss, batched over the padded batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectors.boxes import paired_box_iou
from detectors.heads.class_axes import ClassAxis
from detectors.heads.yolo_grid import YOLOGridHead
from detectors.timing import stage

__all__ = ["VOC_ANCHORS_416", "YOLOv2Head", "YOLOv2Raw"]

# the paper's VOC anchors (darknet's yolov2-voc.cfg, in 13x13 grid cells) in pixels of a 416 x 416 input
VOC_ANCHORS_416 = ((42.31, 55.41), (102.17, 128.30), (161.79, 259.17), (303.08, 154.90), (359.56, 320.23))


@dataclass
class YOLOv2Raw:
    """Raw YOLOv2 outputs: output (B, h, w, A, 5 + C) = t_x, t_y, t_w, t_h, t_o (objectness logit) and the
    class logits per cell and anchor, before any activation."""

    output: Tensor

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """((h, w),): the one grid, as YOLOv3Raw's levels."""
        return ((self.output.shape[1], self.output.shape[2]),)


class YOLOv2Head(YOLOGridHead):
    """YOLOv2's detection layer, region loss and decoding.

    Args:
        in_channels: channels of the neck's one map (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1).
        anchors: (A, 2) anchor widths and heights in pixels of an input of ``input_size``; at another
            input size they scale with the image, as darknet's anchors in grid cells do (multi-scale).
        input_size: (H, W) the anchors are given for.
        default_anchors, auto_anchors: ``anchors="auto"``'s starting anchors and refit settings
            (``YOLOGridHead``).
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
        default_anchors: Sequence[Sequence[float]] = VOC_ANCHORS_416,
        auto_anchors: Mapping[str, float] | None = None,
    ):
        if len(in_channels) != 1:
            raise ValueError(f"the YOLOv2 head predicts on one map, the neck gives {len(in_channels)}")
        super().__init__("YOLOv2", num_classes, anchors, input_size, 1, ignore_threshold=ignore_threshold,
                         coord_scale=coord_scale, object_scale=object_scale, noobject_scale=noobject_scale,
                         class_scale=class_scale, losses=losses, default_cls="ce", score_threshold=score_threshold,
                         nms_threshold=nms_threshold, max_detections=max_detections, pre_nms_top_k=pre_nms_top_k,
                         strides=strides, default_anchors=default_anchors, auto_anchors=auto_anchors)
        self.prior_warmup_images, self.prior_scale = prior_warmup_images, prior_scale
        self.predictor = nn.Conv2d(in_channels[0], self.num_anchors * (5 + num_classes), 1)
        self.init_predictor(self.predictor)
        # training images seen, for the prior-matching term; in the state dict, so a resumed run goes on counting
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))

    def class_axes(self) -> dict[str, ClassAxis]:
        return self.predictor_axes([self.predictor])

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> YOLOv2Raw:
        """feats: [(B, C, h, w)] -> YOLOv2Raw (B, h, w, A, 5 + C); darknet's channel layout is
        (anchor, 5 + C), so the 1x1 conv's output reshapes to it."""
        x = self.predictor(feats[-1])
        batch, _, h, w = x.shape
        return YOLOv2Raw(x.view(batch, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2))

    def loss(self, raw: YOLOv2Raw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """darknet's region loss over the batch, divided by the batch size: the box term (plus, for the first
        images, the prior-matching term), objectness towards the IoU of the responsible box (rescore), the
        class loss. The assignment is ``YOLOGridHead.assign`` on the one grid.

        Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls', 'num_positives'}; no host sync.
        """
        out, offsets, pred_boxes, t = self.decode_for_loss(raw, targets, image_size)  # (B, h w A, ...)
        with stage("loss"):
            loss_box = self.box_term(out, offsets, pred_boxes, t, xy_bce=False)
            if self.training:
                # the prior-matching term: non-responsible boxes towards their anchor, for the first images
                early = (self.images_seen < self.prior_warmup_images).float()
                to_prior = (offsets - 0.5).pow(2).sum(-1) + out[..., 2:4].pow(2).sum(-1)
                loss_box = loss_box + early * 0.5 * self.prior_scale * (to_prior * ~t.positive).sum()
                self.images_seen += out.shape[0]
            iou = paired_box_iou(pred_boxes.detach(), t.boxes)  # rescore: objectness learns the IoU
            return self.loss_terms(out, t, loss_box, iou)
