"""SSD head (Liu et al. 2016): per-level 3x3 conv predictors, bipartite + threshold matching,
smooth L1 + softmax cross-entropy with hard negative mining, softmax + per-class NMS; the box and class
losses can be swapped by config (``loss.box``, ``loss.cls``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectors.anchors import SSDPriors
from detectors.assign import gather_gt, match_priors
from detectors.boxes import DeltaBoxCoder, clip_boxes
from detectors.heads.class_axes import ClassAxis, layer_axes
from detectors.losses import (
    BOX_LOSSES,
    CLASS_LOSSES,
    SIGMOID_CLASS_LOSSES,
    choose_losses,
    class_loss,
    class_probabilities,
    delta_box_loss,
    hard_negative_mask,
)
from detectors.postprocess import multiclass_nms
from detectors.timing import stage


@dataclass
class SSDRaw:
    """Raw SSD outputs. cls_logits (B, A, C + 1) with background at index 0; box_offsets (B, A, 4)
    encoded against the priors; feature_shapes (h, w) per level, from which the priors are made."""

    cls_logits: Tensor
    box_offsets: Tensor
    feature_shapes: list[tuple[int, int]]


class SSDHead(nn.Module):
    """Predictors, loss and decoding of SSD.

    Args:
        in_channels: channels of each feature map from the neck (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1); the head adds the background itself.
        priors: the prior generator (its levels must match the feature maps).
        variances: box encoding variances (0.1, 0.2).
        iou_threshold: matching threshold (0.5).
        neg_pos_ratio: hard negatives per positive (3).
        min_negatives: negatives mined in an image even without objects (SSD: 0).
        score_threshold, nms_threshold, max_detections, pre_nms_top_k: decoding (0.01, 0.45, 200,
            and 400 candidates per class and image before NMS, as torchvision's SSD).
        predictor: 'conv' (SSD's 3x3 conv per level) or 'depthwise' (SSDLite: depthwise 3x3 + BN +
            ReLU6, then a 1x1 conv; torchvision's ``SSDLiteHead``).
        strides: the neck's nominal strides (set by ``Detector``; priors come from the maps' shapes).
        class_columns: the logit column of each class 0..C-1 (column 0 is the background); None: 1..C.
            The predictors have ``max(class_columns) + 1`` columns per prior and the softmax runs over all of
            them; columns no class names are computed but never reported (torchvision's COCO SSD has 91:
            its 10 "N/A" ids stay in the softmax, so its scores need them).
        losses: the ``loss`` config: ``box`` (default smooth_l1 on the offsets; l1, sse; iou, giou, diou,
            ciou on the decoded boxes), ``cls`` (default ce: softmax cross-entropy with hard negative
            mining, as the paper; softmax_focal, bce or focal over every prior, no mining: the focal
            term does the down-weighting of easy negatives mining did; the sigmoid ones score classes
            with sigmoids of the C foreground logits, the background logit unused), ``smooth_l1_beta``,
            ``focal_alpha``, ``focal_gamma``. SSD has no objectness: ``loss.obj`` is refused.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        priors: SSDPriors | None = None,
        variances: Sequence[float] = (0.1, 0.2),
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3.0,
        min_negatives: int = 0,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        max_detections: int = 200,
        pre_nms_top_k: int = 400,
        predictor: str = "conv",
        strides: Sequence[int] = (),
        losses: Mapping[str, Any] | None = None,
        class_columns: Sequence[int] | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        columns = list(range(1, num_classes + 1)) if class_columns is None else [int(c) for c in class_columns]
        if len(columns) != num_classes or min(columns) < 1 or len(set(columns)) != num_classes:
            raise ValueError(f"head.class_columns must be {num_classes} distinct columns >= 1 (0 is the "
                             f"background), one per class; got {list(class_columns)}")
        self.class_columns = columns
        self.num_columns = max(columns) + 1  # logits per prior, background included
        self.plain_columns = columns == list(range(1, num_classes + 1))  # class c in column c + 1
        self.register_buffer("_columns", torch.tensor(columns), persistent=False)
        self.priors = priors or SSDPriors()
        self.coder = DeltaBoxCoder.from_variances(tuple(variances))
        self.iou_threshold, self.neg_pos_ratio, self.min_negatives = iou_threshold, neg_pos_ratio, min_negatives
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections, self.pre_nms_top_k = max_detections, pre_nms_top_k
        per_cell = self.priors.num_priors_per_cell
        if len(per_cell) != len(in_channels):
            raise ValueError(f"SSDHead has {len(in_channels)} input levels but the priors define {len(per_cell)}")
        if predictor not in ("conv", "depthwise"):
            raise ValueError(f"head.predictor must be 'conv' or 'depthwise', got {predictor!r}")
        self.losses = choose_losses("SSD", losses, {"box": "smooth_l1", "cls": "ce"},
                                    {"box": BOX_LOSSES, "cls": CLASS_LOSSES, "obj": ()})
        make = predictor_conv if predictor == "conv" else depthwise_predictor
        self.cls_convs = nn.ModuleList(make(c, p * self.num_columns) for c, p in zip(in_channels, per_cell))
        self.box_convs = nn.ModuleList(make(c, p * 4) for c, p in zip(in_channels, per_cell))
        if self.losses.cls != "ce":
            # RetinaNet's prior: every class starts at probability 0.01 (sigmoid), or the background at 0.99
            # (softmax), so the many background priors do not swamp the first steps of a loss over all priors
            for conv in self.cls_convs:
                bias = (conv if isinstance(conv, nn.Conv2d) else conv[-1]).bias.data.view(-1, self.num_columns)
                if self.losses.cls in SIGMOID_CLASS_LOSSES:
                    bias.fill_(-math.log((1 - 0.01) / 0.01))
                else:
                    bias[:, 0] = math.log(0.99 / 0.01 * num_classes)

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> SSDRaw:
        """feats: [(B, C_k, h_k, w_k)] -> SSDRaw with A = sum_k h_k w_k P_k priors (one-stage: no use
        for ``targets``)."""
        batch = feats[0].shape[0]
        cls, box = [], []
        for f, cls_conv, box_conv in zip(feats, self.cls_convs, self.box_convs):
            # (B, P*K, h, w) -> (B, h, w, P*K) -> (B, h*w*P, K): the priors' order
            cls.append(cls_conv(f).permute(0, 2, 3, 1).reshape(batch, -1, self.num_columns))
            box.append(box_conv(f).permute(0, 2, 3, 1).reshape(batch, -1, 4))
        return SSDRaw(torch.cat(cls, 1), torch.cat(box, 1), [tuple(f.shape[-2:]) for f in feats])

    def class_axes(self) -> dict[str, ClassAxis]:
        """The class predictors' outputs: per prior, background then the C classes (``detectors.init_from``)."""
        layers = [conv if isinstance(conv, nn.Conv2d) else conv[-1] for conv in self.cls_convs]
        return layer_axes(self, layers, ClassAxis(before=1))

    def make_priors(self, raw: SSDRaw, image_size: tuple[int, int]) -> Tensor:
        return self.priors(raw.feature_shapes, image_size, raw.box_offsets.device)

    def loss(self, raw: SSDRaw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """SSD multibox loss over the batch, normalised by the number of positives.

        targets: padded batch tensors from ``collate_detection``: boxes (B, M, 4), labels (B, M),
        mask (B, M), weights (B, M), optional difficult (B, M): priors matched to a difficult
        object are ignored (neither positive nor mined as negative), as VOC training does.
        Returns {'loss', 'loss_cls', 'loss_box', 'num_positives'}. No host sync inside.
        """
        priors = self.make_priors(raw, image_size)
        with stage("assign"):
            match = match_priors(priors, targets["boxes"], targets["mask"], self.iou_threshold)
            positive = match.positive
            ignore = torch.zeros_like(positive)
            if "difficult" in targets:
                ignore = positive & gather_gt(targets["difficult"], match.gt_index)
                positive = positive & ~ignore
            matched_labels = gather_gt(targets["labels"], match.gt_index)
            columns = (matched_labels + 1 if self.plain_columns
                       else self._columns[matched_labels.clamp(min=0)])  # padding's -1 is masked out below
            labels = torch.where(positive, columns, 0)
            pos_weight = positive * gather_gt(targets["weights"].float(), match.gt_index)
            matched_boxes = gather_gt(targets["boxes"], match.gt_index)
        with stage("loss"):
            return self._multibox_loss(raw, priors, labels, matched_boxes, positive, ignore, pos_weight)

    def _multibox_loss(self, raw: SSDRaw, priors: Tensor, labels: Tensor, matched_boxes: Tensor, positive: Tensor,
                       ignore: Tensor, pos_weight: Tensor) -> dict[str, Tensor]:
        """labels (B, A) with 0 = background; matched_boxes (B, A, 4); positive/ignore (B, A) bool;
        pos_weight (B, A) per-box weight on positives, 0 elsewhere."""
        num_pos = positive.sum().clamp(min=1).float()
        per_prior = class_loss(self.losses, raw.cls_logits.float(), labels, background=True)
        if self.losses.cls == "ce":
            negative = hard_negative_mask(per_prior, positive, self.neg_pos_ratio, self.min_negatives, exclude=ignore)
            loss_cls = ((per_prior * pos_weight).sum() + (per_prior * negative).sum()) / num_pos
        else:
            # every prior that is not ignored: positives weighted by their box's weight, the rest by 1
            weight = torch.where(positive, pos_weight, (~ignore).float())
            loss_cls = (per_prior * weight).sum() / num_pos
        per_box = delta_box_loss(self.losses, raw.box_offsets.float(), matched_boxes, self.coder, priors)
        # torch.where, not a product: an unmatched prior's target can be far off (its IoU loss is finite,
        # but 0 x inf would not be)
        loss_box = torch.where(positive, per_box * pos_weight, 0.0).sum() / num_pos
        return {"loss": loss_cls + loss_box, "loss_cls": loss_cls, "loss_box": loss_box, "num_positives": num_pos}

    def decode_scores(self, raw: SSDRaw, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Every prior decoded: boxes (B, A, 4) xyxy in pixels of the input, clipped to it, and scores
        (B, A, C) per foreground class (the softmax's foreground columns, or each class's own sigmoid
        under loss.cls=bce or focal). What ``predict`` runs NMS on, and what an exported model outputs."""
        priors = self.make_priors(raw, image_size)
        scores = class_probabilities(self.losses, raw.cls_logits.float(), background=True)
        if not self.plain_columns:  # the named columns only (column c is scores[..., c - 1])
            scores = scores[..., self._columns - 1]
        return clip_boxes(self.coder.decode(raw.box_offsets.float(), priors), image_size), scores

    @torch.no_grad()
    def predict(self, raw: SSDRaw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """``decode_scores``, the top ``pre_nms_top_k`` per class and image above ``score_threshold``,
        per-class NMS, then the best ``max_detections`` per image.

        Returns one dict per image: boxes (N, 4) xyxy in pixels of the input, scores (N,), labels (N,) 0..C-1.
        """
        boxes, scores = self.decode_scores(raw, image_size)
        return multiclass_nms(boxes, scores, self.score_threshold, self.nms_threshold, self.pre_nms_top_k,
                              self.max_detections)


def predictor_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """SSD's predictor: one 3x3 conv (Xavier init, zero bias, as the reference implementation)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def depthwise_predictor(in_channels: int, out_channels: int) -> nn.Sequential:
    """SSDLite's predictor (Sandler et al. 2018, sec. 6.2): depthwise 3x3 + BN + ReLU6, then 1x1."""
    pointwise = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.xavier_uniform_(pointwise.weight)
    nn.init.zeros_(pointwise.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU6(inplace=True),
        pointwise,
    )
