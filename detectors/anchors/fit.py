"""How well a head's anchors or priors fit a dataset's boxes at the network input.

Two numbers, both over the training boxes: the share whose best anchor IoU is >= ``threshold`` (0.5:
a box no anchor reaches at 0.5 has no natural positive; Ultralytics' AutoAnchor calls the share "best
possible recall") and the mean best IoU (YOLOv2's "Avg IOU", Table 1).

What "IoU with an anchor" means follows how the head assigns: a YOLO head picks a box's anchor by shape
alone, centres aligned (darknet, and ``kmeans_anchors``), so ``shape_fit`` compares widths and heights;
SSD's priors and the RPN's anchors are boxes at places on a grid, matched by their IoU with the box where
they lie, so ``box_fit`` takes every placed prior (``anchor_boxes`` makes them from a built detector, the
head's own generators at the input size) and ``torchvision.ops.box_iou``, a chunk of boxes at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from detectors.assign import shape_iou

SHAPE = "shape"  # YOLO anchors: (K, 2) widths and heights, compared centred
BOXES = "boxes"  # SSD priors, RPN anchors: (A, 4) xyxy boxes where the grid puts them


@dataclass(frozen=True)
class AnchorFit:
    """The fit of ``num_anchors`` anchors (``kind``: SHAPE or BOXES) to ``num_boxes`` boxes.

    share: boxes with best IoU >= ``threshold``, over ``num_boxes`` (nan without boxes);
    mean_iou: the mean best IoU (nan without boxes); best_iou: (N,) each box's best IoU.
    """

    kind: str
    num_boxes: int
    num_anchors: int
    threshold: float
    share: float
    mean_iou: float
    best_iou: Tensor

    @classmethod
    def from_best_iou(cls, best_iou: Tensor, kind: str, num_anchors: int, threshold: float) -> AnchorFit:
        n = int(best_iou.numel())
        share = float((best_iou >= threshold).double().mean()) if n else float("nan")
        mean = float(best_iou.double().mean()) if n else float("nan")
        return cls(kind, n, num_anchors, float(threshold), share, mean, best_iou)


def shape_fit(wh: Tensor, anchors: Tensor | Sequence[Sequence[float]], threshold: float = 0.5) -> AnchorFit:
    """The fit of YOLO anchors by shape: each box's best IoU with an anchor, centres aligned.

    wh: (N, 2) box widths and heights; anchors: (K, 2) in the same unit (pixels of the same input).
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float64)
    if anchors.ndim != 2 or anchors.shape[1] != 2 or not len(anchors):
        raise ValueError(f"anchors must be (K, 2) widths and heights, got shape {tuple(anchors.shape)}")
    wh = torch.as_tensor(wh, dtype=torch.float64).reshape(-1, 2)
    best = shape_iou(wh, anchors).amax(1) if len(wh) else wh.new_zeros(0)
    return AnchorFit.from_best_iou(best, SHAPE, len(anchors), threshold)


def box_fit(boxes: Tensor, anchors: Tensor, threshold: float = 0.5, max_pairs: int = 1 << 24) -> AnchorFit:
    """The fit of placed priors or anchors: each box's best IoU with any of them (``box_iou``).

    boxes: (N, 4) xyxy; anchors: (A, 4) xyxy, same pixels. The (N, A) IoU is computed ``max_pairs``
    entries at a time (2^24: 64 MB of float32), so COCO's ~860k boxes against 20k anchors stay bounded.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if anchors.ndim != 2 or anchors.shape[1] != 4 or not len(anchors):
        raise ValueError(f"anchors must be (A, 4) xyxy boxes, got shape {tuple(anchors.shape)}")
    chunk = max(1, max_pairs // len(anchors))
    best = [box_iou(part, anchors).amax(1) for part in boxes.split(chunk)]
    best_iou = torch.cat(best) if best else boxes.new_zeros(0)
    return AnchorFit.from_best_iou(best_iou, BOXES, len(anchors), threshold)


@torch.no_grad()
def anchor_boxes(detector: nn.Module, input_size: Sequence[int]) -> tuple[str, Tensor] | None:
    """A built detector's anchors at ``input_size`` (H, W), made by its head's own generator.

    Returns (SHAPE, (K, 2) w, h) for a YOLO head (``yolo_anchors``), (BOXES, (A, 4) xyxy) for SSD's
    priors (``priors``) and the RPN's anchors (``make_anchors``), or None for a head without anchors
    (YOLOv1). The maps' shapes, which the priors depend on, come from one forward of a zero image
    through the backbone and neck.
    """
    head = detector.head
    size = (int(input_size[0]), int(input_size[1]))
    if hasattr(head, "yolo_anchors"):
        return SHAPE, head.yolo_anchors.scaled(size, "cpu").double()
    if not (hasattr(head, "priors") or hasattr(head, "make_anchors")):
        return None
    was_training = detector.training
    detector.eval()
    try:
        param = next(detector.parameters())
        feats = detector.neck(detector.backbone(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)))
    finally:
        detector.train(was_training)
    shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
    if hasattr(head, "priors"):
        priors = head.priors(shapes, size, "cpu")
    else:  # Faster R-CNN: the RPN on the last map
        priors = head.make_anchors(shapes[-1], torch.device("cpu"))
    return BOXES, box_convert(priors.float(), "cxcywh", "xyxy")


def detector_fit(detector: nn.Module, boxes: Tensor, input_size: Sequence[int],
                 threshold: float = 0.5) -> AnchorFit | None:
    """The fit of ``detector``'s anchors to ``boxes`` (N, 4) xyxy in pixels of an input of ``input_size``
    (shape IoU for YOLO anchors, placed IoU for priors); None when the head has no anchors."""
    made = anchor_boxes(detector, input_size)
    if made is None:
        return None
    kind, anchors = made
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if kind == SHAPE:
        return shape_fit(boxes[:, 2:] - boxes[:, :2], anchors, threshold)
    return box_fit(boxes, anchors, threshold)
