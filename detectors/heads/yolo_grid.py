"""What the YOLOv2 and YOLOv3 heads share: slots of (t_x, t_y, t_w, t_h, t_o, C class logits) on anchor
grids, their decoding by the grid coder, darknet's assignment and loss terms over them, and the scores and
NMS of prediction. Each head keeps its layers, its raw layout and what darknet's region layer (YOLOv2) and
yolo layer (YOLOv3) do differently: the rescore, the prior-matching term, the logistic x and y."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.anchors import AnchorGrid, YOLOAnchors
from detectors.assign import GridTargets, assign_to_grid
from detectors.boxes import GridCoder, clip_boxes
from detectors.heads.class_axes import ClassAxis, layer_axes
from detectors.losses import (
    BOX_LOSSES,
    CLASS_LOSSES,
    IOU_LOSSES,
    OBJECTNESS_LOSSES,
    box_regression_loss,
    choose_losses,
    class_loss,
    class_probabilities,
    objectness_loss,
)
from detectors.postprocess import multiclass_nms
from detectors.timing import stage


class GridRaw(Protocol):
    """A YOLO head's raw outputs: output (B, ..., 5 + C), every slot once in the ``AnchorGrid`` order when
    flattened; shapes (h_l, w_l) per level."""

    output: Tensor

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]: ...


class YOLOGridHead(nn.Module):
    """The base of ``YOLOv2Head`` and ``YOLOv3Head`` (their docstrings give the arguments): a subclass builds
    its predictors (``init_predictor`` each) and ``forward`` to a ``GridRaw``, and writes its ``loss`` from
    ``decode_for_loss``, ``box_term`` and ``loss_terms``.

    Args (besides the heads'):
        name: the head's, for the message that refuses a loss it cannot use.
        num_levels: the grids the anchors are grouped for.
        strides: the grids' strides; the coarsest is the head's ``size_divisor`` (32 when not given).
        default_cls: the class loss when ``loss.cls`` is not set.
        default_anchors: with ``anchors="auto"``, the anchors to start from: before the first training step
            ``detectors.callbacks.auto_anchors.AutoAnchors`` measures their fit to the training boxes and, when
            it is low, replaces them with k-means anchors that fit better (``detectors.anchors.auto``); the
            chosen anchors are then a buffer of the state dict (``chosen_anchors``).
        auto_anchors: {threshold, iou} of that refit: k-means is tried when fewer than ``threshold`` (0.98) of
            the boxes have a best-anchor shape IoU >= ``iou`` (0.5).
    """

    def __init__(self, name: str, num_classes: int, anchors: Sequence[Sequence[float]], input_size: Sequence[int],
                 num_levels: int, *, ignore_threshold: float, coord_scale: float, object_scale: float,
                 noobject_scale: float, class_scale: float, losses: Mapping[str, Any] | None, default_cls: str,
                 score_threshold: float, nms_threshold: float, max_detections: int, pre_nms_top_k: int,
                 strides: Sequence[int] = (), default_anchors: Sequence[Sequence[float]] | None = None,
                 auto_anchors: Mapping[str, float] | None = None):
        super().__init__()
        # the grid must tile the input, as darknet's cfgs require: sides in multiples of the coarsest stride
        # (Detector combines this with the backbone's and the neck's rules; DetectionModule checks sizes)
        self.size_divisor = int(max(strides, default=32))
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # anchors=auto: start from default_anchors; AutoAnchors (detectors.callbacks.auto_anchors) refits them to
        # the training boxes before the first step (``set_anchors``). Only then are they a persistent buffer:
        # the run config of such a checkpoint says auto, so predict, export and a resume rebuild the head with
        # the defaults and take the chosen anchors from the state dict; a head of listed anchors keeps a state
        # dict without them, as its checkpoints always had (init_from then never overrides listed anchors).
        self.auto_anchors = None
        if isinstance(anchors, str):
            if anchors != "auto":
                raise ValueError(f"head.anchors must be a list of [w, h] pairs or 'auto', got {anchors!r}")
            if default_anchors is None:
                raise ValueError("head.anchors=auto starts from head.default_anchors, which is not set")
            self.auto_anchors = {"threshold": 0.98, "iou": 0.5, **dict(auto_anchors or {})}
            if set(self.auto_anchors) != {"threshold", "iou"} or not all(
                    0 < float(v) <= 1 for v in self.auto_anchors.values()):
                raise ValueError(f"head.auto_anchors takes threshold and iou in (0, 1], got {dict(auto_anchors)}")
            anchors = default_anchors
        self.yolo_anchors = YOLOAnchors(anchors, input_size, num_levels=num_levels)
        # True until AutoAnchors (or a checkpoint) has set the anchors of an anchors=auto head
        self.anchors_pending = self.auto_anchors is not None
        if self.auto_anchors is not None:
            self.register_buffer("chosen_anchors", self.yolo_anchors.anchors.clone())
        self.num_classes = num_classes
        self.ignore_threshold = ignore_threshold
        self.coord_scale, self.object_scale = coord_scale, object_scale
        self.noobject_scale, self.class_scale = noobject_scale, class_scale
        self.losses = choose_losses(name, losses, {"box": "sse", "cls": default_cls, "obj": "bce"},
                                    {"box": BOX_LOSSES, "cls": CLASS_LOSSES, "obj": OBJECTNESS_LOSSES})
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections, self.pre_nms_top_k = max_detections, pre_nms_top_k
        self.coder = GridCoder()

    @property
    def anchors(self) -> Tensor:
        """(K, 2) the anchors in pixels of an input of ``input_size``, grouped by level."""
        return self.yolo_anchors.anchors

    def set_anchors(self, anchors: Tensor | Sequence[Sequence[float]]) -> None:
        """Replace the (K, 2) anchors (pixels of an input of ``input_size``, grouped by level as before: the
        same count); an anchors=auto head keeps them in its state dict."""
        anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().cpu()
        if anchors.shape != self.anchors.shape:
            raise ValueError(f"{len(self.anchors)} anchors expected, got shape {tuple(anchors.shape)}")
        self.yolo_anchors = YOLOAnchors(anchors.tolist(), self.input_size, num_levels=self.yolo_anchors.num_levels)
        if self.auto_anchors is not None:
            self.chosen_anchors.copy_(anchors)
        self.anchors_pending = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.auto_anchors is not None and prefix + "chosen_anchors" in state_dict:
            self.set_anchors(self.chosen_anchors)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.yolo_anchors.input_size

    @property
    def num_anchors(self) -> int:
        """Anchors per level (per cell)."""
        return self.yolo_anchors.per_level

    def anchors_for(self, image_size: tuple[int, int], device: torch.device) -> Tensor:
        """(K, 2) anchor sizes in pixels of an input of ``image_size``: scaled with the image."""
        return self.yolo_anchors.scaled(image_size, device)

    def init_predictor(self, conv: nn.Conv2d) -> None:
        """A predictor of A x (5 + C) channels: N(0, 0.01) weights, zero biases but the objectness's."""
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        # objectness starts at 1% (RetinaNet's prior): the no-object term does not swamp the start
        with torch.no_grad():
            conv.bias.view(self.num_anchors, 5 + self.num_classes)[:, 4] = math.log(0.01 / 0.99)

    def predictor_axes(self, predictors: list[nn.Conv2d]) -> dict[str, ClassAxis]:
        """A subclass's ``class_axes`` (``detectors.init_from``): its ``predictors``' outputs are, per anchor,
        t_x, t_y, t_w, t_h, t_o then the C classes."""
        return layer_axes(self, predictors, ClassAxis(before=5))

    def grid(self, raw: GridRaw, image_size: tuple[int, int]) -> AnchorGrid:
        return self.yolo_anchors.grid(raw.shapes, image_size, raw.output.device)

    def _decode_slots(self, out: Tensor, grid: AnchorGrid) -> tuple[Tensor, Tensor]:
        """out (B, N, 5 + C) float32 -> offsets (B, N, 2) (the sigmoids of t_x, t_y), boxes (B, N, 4) xyxy."""
        offsets = out[..., :2].sigmoid()
        return offsets, self.coder.decode(offsets, out[..., 2:4], grid.cells, grid.strides, grid.anchors)

    def decode(self, raw: GridRaw, image_size: tuple[int, int]) -> Tensor:
        """(B, ..., 4) xyxy boxes in pixels of the input, in the raw output's layout."""
        out = raw.output.float()
        boxes = self._decode_slots(out.flatten(1, -2), self.grid(raw, image_size))[1]
        return boxes.view(*out.shape[:-1], 4)

    def assign(self, raw: GridRaw, pred_boxes: Tensor, targets: dict[str, Tensor],
               image_size: tuple[int, int]) -> GridTargets:
        """darknet's assignment over all levels at once (``detectors.assign.assign_to_grid``): each ground
        truth (not difficult) goes to the one anchor of best shape IoU among all K, at its centre's cell on
        that anchor's level; the later of two keeps a slot; predictions overlapping any ground truth by more
        than ``ignore_threshold`` are ignored. pred_boxes: (B, N, 4), detached -> GridTargets of (B, N[, k])."""
        return assign_to_grid(pred_boxes, targets, self.grid(raw, image_size),
                              self.anchors_for(image_size, pred_boxes.device), image_size, self.ignore_threshold,
                              self.coder)

    def decode_for_loss(self, raw: GridRaw, targets: dict[str, Tensor],
                        image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, GridTargets]:
        """-> out (B, N, 5 + C) float32, every slot in the grid's order; offsets (B, N, 2) the sigmoids of
        t_x, t_y; pred_boxes (B, N, 4) decoded; and every slot's targets."""
        if self.training and self.anchors_pending:  # a Python flag: no host sync
            raise RuntimeError("head.anchors=auto: the anchors were not fitted before training; train.py fits them "
                               "with the auto_anchors callback (configs/callbacks/default.yaml), which is off here")
        out = raw.output.float().flatten(1, -2)
        offsets, pred_boxes = self._decode_slots(out, self.grid(raw, image_size))
        with stage("assign"):
            t = self.assign(raw, pred_boxes.detach(), targets, image_size)
        return out, offsets, pred_boxes, t

    def box_term(self, out: Tensor, offsets: Tensor, pred_boxes: Tensor, t: GridTargets, xy_bce: bool) -> Tensor:
        """The box loss summed over the responsible slots, each scaled by darknet's 2 - w h and its box's
        weight, times ``coord_scale``: ``losses.box`` on the decoded boxes (the IoU family) or on the sigmoid
        offsets and t_w, t_h; with ``xy_bce`` the offsets learn by BCE of their logits instead."""
        log_wh = out[..., 2:4]
        if self.losses.box in IOU_LOSSES:
            per_box = box_regression_loss(self.losses.box, pred_boxes, t.boxes)
        elif xy_bce:
            xy = F.binary_cross_entropy_with_logits(out[..., :2], t.offsets, reduction="none").sum(-1)
            per_box = xy + box_regression_loss(self.losses.box, log_wh, t.log_wh, self.losses.smooth_l1_beta)
        else:
            per_box = box_regression_loss(self.losses.box, torch.cat([offsets, log_wh], -1),
                                          torch.cat([t.offsets, t.log_wh], -1), self.losses.smooth_l1_beta)
        # torch.where, not a product: a slot without a ground truth has no meaningful target
        return self.coord_scale * torch.where(t.positive, t.weight * t.box_scale * per_box, 0.0).sum()

    def loss_terms(self, out: Tensor, t: GridTargets, loss_box: Tensor, obj_target: Tensor) -> dict[str, Tensor]:
        """The loss dict from the box term and the objectness target of the responsible slots (B, N): the
        objectness towards it there (times the box's weight) and towards 0 at the slots neither responsible
        nor ignored, the class loss of the responsible slots; every term divided by the batch size (darknet
        divides the learning rate by it).

        Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls', 'num_positives'}; no host sync.
        """
        batch, objectness = out.shape[0], out[..., 4]
        loss_obj = self.object_scale * (t.weight * self._objectness(objectness, obj_target)).sum()
        noobj = ~t.positive & ~t.ignore
        loss_noobj = self.noobject_scale * (noobj * self._objectness(objectness, torch.zeros_like(objectness))).sum()
        loss_cls = self.class_scale * (t.weight * class_loss(self.losses, out[..., 5:], t.labels)).sum()
        terms = {"loss_box": loss_box / batch, "loss_obj": loss_obj / batch, "loss_noobj": loss_noobj / batch,
                 "loss_cls": loss_cls / batch}
        return {"loss": sum(terms.values()), **terms, "num_positives": t.positive.sum().float()}

    def _objectness(self, logits: Tensor, target: Tensor) -> Tensor:
        return objectness_loss(self.losses.obj, logits, target, self.losses.focal_alpha, self.losses.focal_gamma)

    def decode_scores(self, raw: GridRaw, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Every slot decoded, in the grid's order (level, row, column, anchor): boxes (B, N, 4) xyxy in pixels
        of the input, clipped to it, and scores (B, N, C) = objectness x class probability (as ``loss.cls``
        trained them: a softmax over the classes for ce and softmax_focal, a sigmoid per class for bce and
        focal). What ``predict`` runs NMS on, and what an exported model outputs."""
        out = raw.output.float()
        batch = out.shape[0]
        scores = out[..., 4:5].sigmoid() * class_probabilities(self.losses, out[..., 5:])
        boxes = clip_boxes(self.decode(raw, image_size), image_size)
        return boxes.reshape(batch, -1, 4), scores.reshape(batch, -1, self.num_classes)

    @torch.no_grad()
    def predict(self, raw: GridRaw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """``decode_scores``, per class above ``score_threshold``, per-class NMS, the best ``max_detections``
        per image.

        Returns one dict per image: boxes (N, 4) xyxy in pixels of the input, scores (N,), labels (N,) 0..C-1.
        """
        boxes, scores = self.decode_scores(raw, image_size)
        return multiclass_nms(boxes, scores, self.score_threshold, self.nms_threshold, self.pre_nms_top_k,
                              self.max_detections)
