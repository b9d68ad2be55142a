"""Faster R-CNN (Ren et al. 2015) as one head: the RPN and the RoI head on the backbone's one stride-16 map,
batched over the padded batch (the two-stage head contract: see ``FasterRCNNHead``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from detectors.anchors import RPNAnchors
from detectors.boxes import DeltaBoxCoder, clip_boxes
from detectors.heads.class_axes import ClassAxis, layer_axes
from detectors.heads.roi import RoIBoxHead, RoISamples, roi_loss, sample_rois
from detectors.heads.rpn import RPNHead, rpn_loss, rpn_targets, select_proposals
from detectors.losses import BOX_LOSSES, CLASS_LOSSES, OBJECTNESS_LOSSES, choose_losses, class_probabilities
from detectors.postprocess import multiclass_nms
from detectors.timing import stage


@dataclass
class FasterRCNNRaw:
    """What ``FasterRCNNHead.forward`` returns (batch-first tensors).

    objectness (B, A) RPN logits and rpn_deltas (B, A, 4), A = h w k anchors of the map of ``feature_shape``;
    rois (B, K, 4) xyxy and roi_valid (B, K): in training the sampled RoIs (K = the RoIs per image), in
    evaluation the proposals (K = the post-NMS top-k); cls_logits (B, K, C + 1) and box_deltas (B, K, C, 4),
    the RoI head's outputs on them (zeros where not valid); samples: the RoIs' training targets (training
    only, None in evaluation).
    """

    objectness: Tensor
    rpn_deltas: Tensor
    rois: Tensor
    roi_valid: Tensor
    cls_logits: Tensor
    box_deltas: Tensor
    feature_shape: tuple[int, int]
    samples: RoISamples | None = None


class FasterRCNNHead(nn.Module):
    """Faster R-CNN's two stages, their targets, losses and decoding.

    The two-stage contract (DESIGN.md's head contract, with targets): ``forward(feats, targets)`` runs the
    RPN, selects proposals (no gradient through them: the paper's approximate joint training), and

    * with ``targets`` (training: the module's training step passes the batch): adds the ground truths to
      the proposals, samples the RoIs and their targets (``sample_rois``) and runs the RoI head on those;
    * without (evaluation): runs the RoI head on the proposals.

    It returns a ``FasterRCNNRaw`` either way. ``loss(raw, targets, image_size)`` labels and samples the
    anchors (``rpn_targets``) and adds the RPN's and the RoI head's terms: {'loss', 'loss_objectness',
    'loss_rpn_box', 'loss_cls', 'loss_box', 'num_positives' (foreground RoIs)}; it needs a raw made with
    targets. ``predict(raw, image_size)``: softmax (or the sigmoids of a sigmoid class loss), class-specific
    boxes decoded from the RoIs and clipped, scores over ``score_threshold``, per-class NMS at
    ``nms_threshold``, the best ``max_detections`` per image (``multiclass_nms``).

    The head's forward does not see the input size, so anchors lie on the map's cells at ``stride`` and
    proposals are clipped to the map's extent (h stride, w stride): the input itself when its sides are
    multiples of the stride, which the head therefore requires (``size_divisor``, checked when the model
    is built), and predictions are clipped to the true input size in ``predict``.

    Args:
        in_channels: channels of the neck's one map (set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1); background is the RoI head's class 0.
        anchor_sizes, aspect_ratios: ``RPNAnchors`` (the paper's 128, 256, 512 px and 0.5, 1, 2).
        rpn_channels: the RPN's 3x3 conv width (512, the paper's for VGG16).
        rpn_fg_iou, rpn_bg_iou: anchors with IoU >= 0.7 (and each ground truth's best) are positive, < 0.3
            negative; rpn_batch_size, rpn_positive_fraction: 256 sampled per image, up to half positive.
        rpn_pre_nms_top_k, rpn_post_nms_top_k: {train, test} proposals per image before and after NMS
            (torchvision's 2000/2000 and 1000/1000); rpn_nms_threshold 0.7; rpn_min_size: proposals narrower
            or lower than this (px) are dropped (torchvision's 1e-3; the paper's 16 px at its scale);
            rpn_score_threshold: proposals under this objectness (sigmoid) are dropped (0: none).
        roi_output_size, roi_sampling_ratio, roi_pool, fc_width: ``RoIBoxHead`` (7, 2, RoIAlign, 4096).
        roi_batch_size, roi_positive_fraction: 512 RoIs per image, up to 25% foreground; roi_fg_iou 0.5;
            roi_bg_iou_low: background is [roi_bg_iou_low, roi_fg_iou) (torchvision's 0; Fast R-CNN's 0.1).
        score_threshold, nms_threshold, max_detections: decoding (0.05, 0.5, 100: torchvision's).
        losses: the ``loss`` config: ``box`` (smooth_l1 on the deltas by default, l1, sse; iou, giou, diou,
            ciou on the decoded boxes) for both stages; ``cls`` the RoI head's (ce by default; softmax_focal;
            bce, focal on the C foreground logits); ``obj`` the RPN's objectness (bce by default; focal, sse);
            ``smooth_l1_beta`` (the model config's 1/9, torchvision's, for both stages).
        strides: the neck's strides (set by ``Detector``): the map's stride for anchors and RoIAlign.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        anchor_sizes: Sequence[float] = (128.0, 256.0, 512.0),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_channels: int = 512,
        rpn_fg_iou: float = 0.7,
        rpn_bg_iou: float = 0.3,
        rpn_batch_size: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_pre_nms_top_k: Mapping[str, int] | None = None,
        rpn_post_nms_top_k: Mapping[str, int] | None = None,
        rpn_nms_threshold: float = 0.7,
        rpn_min_size: float = 1e-3,
        rpn_score_threshold: float = 0.0,
        roi_output_size: int = 7,
        roi_sampling_ratio: int = 2,
        roi_pool: bool = False,
        fc_width: int = 4096,
        roi_batch_size: int = 512,
        roi_positive_fraction: float = 0.25,
        roi_fg_iou: float = 0.5,
        roi_bg_iou_low: float = 0.0,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        losses: Mapping[str, Any] | None = None,
        strides: Sequence[int] = (16,),
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(in_channels) != 1 or len(strides) != 1:
            raise ValueError(f"Faster R-CNN takes one feature map (backbone.out_strides=[16]), the neck gives "
                             f"{len(in_channels)} at strides {list(strides)}")
        self.num_classes = num_classes
        self.stride = float(strides[0])
        # proposals are clipped to the map's extent: it must be the input's (see above)
        self.size_divisor = int(strides[0])
        self.anchors = RPNAnchors(anchor_sizes, aspect_ratios)
        self.rpn_coder = DeltaBoxCoder((1.0, 1.0, 1.0, 1.0))
        self.roi_coder = DeltaBoxCoder((10.0, 10.0, 5.0, 5.0))
        self.rpn = RPNHead(in_channels[0], self.anchors.num_anchors_per_cell, rpn_channels)
        self.roi_head = RoIBoxHead(in_channels[0], num_classes, self.stride, roi_output_size, roi_sampling_ratio,
                                   roi_pool, fc_width)
        self.rpn_fg_iou, self.rpn_bg_iou = rpn_fg_iou, rpn_bg_iou
        self.rpn_batch_size, self.rpn_positive_fraction = rpn_batch_size, rpn_positive_fraction
        pre = rpn_pre_nms_top_k or {"train": 2000, "test": 1000}
        post = rpn_post_nms_top_k or {"train": 2000, "test": 1000}
        self.rpn_pre_nms_top_k = {k: int(pre[k]) for k in ("train", "test")}
        self.rpn_post_nms_top_k = {k: int(post[k]) for k in ("train", "test")}
        self.rpn_nms_threshold, self.rpn_min_size = rpn_nms_threshold, rpn_min_size
        self.rpn_score_threshold = rpn_score_threshold
        self.roi_batch_size, self.roi_positive_fraction = roi_batch_size, roi_positive_fraction
        self.roi_fg_iou, self.roi_bg_iou_low = roi_fg_iou, roi_bg_iou_low
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections = max_detections
        self.losses = choose_losses("Faster R-CNN", losses, {"box": "smooth_l1", "cls": "ce", "obj": "bce"},
                                    {"box": BOX_LOSSES, "cls": CLASS_LOSSES, "obj": OBJECTNESS_LOSSES})

    def class_axes(self) -> dict[str, ClassAxis]:
        """The RoI head's class scores (background, then the C classes) and its class-specific deltas (4 per
        class) (``detectors.init_from``); the RPN is class-agnostic."""
        return {**layer_axes(self, [self.roi_head.cls_score], ClassAxis(before=1)),
                **layer_axes(self, [self.roi_head.bbox_pred], ClassAxis(before=0, inner=4))}

    def make_anchors(self, feature_shape: tuple[int, int], device: torch.device) -> Tensor:
        """(A, 4) cxcywh anchors of a map of ``feature_shape``."""
        return self.anchors(feature_shape, self.stride, device)

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> FasterRCNNRaw:
        """feats: [(B, C, h, w)] (the one stride-16 map) [, targets: the padded batch] -> FasterRCNNRaw."""
        feat = feats[-1]
        feature_shape = (int(feat.shape[-2]), int(feat.shape[-1]))
        objectness, rpn_deltas = self.rpn(feat)
        anchors = self.make_anchors(feature_shape, feat.device)
        extent = (int(feature_shape[0] * self.stride), int(feature_shape[1] * self.stride))
        phase = "train" if self.training else "test"
        with stage("proposals"):
            # with targets (a training step): the NMS that reads nothing back from the device (no host sync in
            # a step); without (evaluation, which syncs for its per-image results anyway): the fastest exact one
            proposals, _, valid = select_proposals(
                objectness, rpn_deltas, anchors, self.rpn_coder, extent, self.rpn_pre_nms_top_k[phase],
                self.rpn_post_nms_top_k[phase], self.rpn_nms_threshold, self.rpn_min_size, self.rpn_score_threshold,
                nms_strategy="scan" if targets is not None else None)
        if targets is None:
            cls_logits, box_deltas = self.roi_head(feat, proposals, valid)
            return FasterRCNNRaw(objectness, rpn_deltas, proposals, valid, cls_logits, box_deltas, feature_shape)
        with stage("assign"):
            samples = sample_rois(proposals, valid, targets, self.roi_batch_size, self.roi_positive_fraction,
                                  self.roi_fg_iou, self.roi_fg_iou, self.roi_bg_iou_low)
        # every slot runs (padding is rare and masked in the loss): fixed shapes, no host read
        cls_logits, box_deltas = self.roi_head(feat, samples.boxes)
        return FasterRCNNRaw(objectness, rpn_deltas, samples.boxes, samples.valid, cls_logits, box_deltas,
                             feature_shape, samples)

    def loss(self, raw: FasterRCNNRaw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """The RPN's and the RoI head's losses over the batch (see the class doc). No host sync inside."""
        if raw.samples is None:
            raise ValueError("the Faster R-CNN head samples its RoIs in forward: call it with the targets "
                             "(detector(images, targets)) before loss")
        anchors = self.make_anchors(raw.feature_shape, raw.objectness.device)
        with stage("assign"):
            t = rpn_targets(box_convert(anchors, "cxcywh", "xyxy"), targets, self.rpn_fg_iou, self.rpn_bg_iou,
                            self.rpn_batch_size, self.rpn_positive_fraction)
        with stage("loss"):
            loss_objectness, loss_rpn_box = rpn_loss(raw.objectness, raw.rpn_deltas, anchors, t, self.rpn_coder,
                                                     self.losses)
            loss_cls, loss_box = roi_loss(raw.cls_logits, raw.box_deltas, raw.samples, self.roi_coder, self.losses)
        terms = {"loss_objectness": loss_objectness, "loss_rpn_box": loss_rpn_box, "loss_cls": loss_cls,
                 "loss_box": loss_box}
        return {"loss": sum(terms.values()), **terms, "num_positives": (raw.samples.labels > 0).sum().float()}

    @torch.no_grad()
    def predict(self, raw: FasterRCNNRaw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Returns one dict per image: boxes (N, 4) xyxy in pixels of the input, scores (N,) descending,
        labels (N,) 0..C-1."""
        scores = class_probabilities(self.losses, raw.cls_logits.float(), background=True)
        scores = scores * raw.roi_valid.unsqueeze(-1)  # (B, K, C); padding scores 0, under any threshold
        references = box_convert(raw.rois.float(), "xyxy", "cxcywh").unsqueeze(2)  # (B, K, 1, 4)
        boxes = clip_boxes(self.roi_coder.decode(raw.box_deltas.float(), references), image_size)  # (B, K, C, 4)
        return multiclass_nms(boxes, scores, self.score_threshold, self.nms_threshold, raw.rois.shape[1],
                              self.max_detections)
