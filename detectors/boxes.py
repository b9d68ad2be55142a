"""Box formats, batched IoU, the delta box coder (SSD, RPN, RoI heads) and the grid coder (YOLOv2, YOLOv3).

Boxes are ``xyxy`` in absolute pixels everywhere outside a head (see DESIGN.md).
The centre-size form (``cxcywh``) lives only inside encoders.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair, batched over the leading dimension.

    Args:
        boxes1: (B, N, 4) xyxy.
        boxes2: (B, M, 4) or (M, 4) xyxy (the latter shared by every batch item, e.g. priors).

    Returns:
        (B, N, M) IoU. Degenerate boxes (zero area) give IoU 0, never NaN.
    """
    if boxes2.dim() == 2:
        boxes2 = boxes2.unsqueeze(0)
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    # union is 0 only when both boxes are empty; their IoU is defined as 0
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box with its partner: (..., 4), (..., 4) xyxy (broadcastable) -> (...). Empty boxes give 0."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).tiny)


class DeltaBoxCoder:
    """The R-CNN / SSD delta encoding of boxes relative to reference boxes (priors, anchors, proposals).

    ``t = (wx (cx - pcx) / pw, wy (cy - pcy) / ph, ww log(w / pw), wh log(h / ph))`` (Girshick et al.
    2014, appendix C; Ren et al. 2015, eq. 2). SSD's variances (0.1, 0.2) are the weights
    (10, 10, 5, 5); Faster R-CNN's RPN uses (1, 1, 1, 1) and its RoI head (10, 10, 5, 5), as torchvision's
    ``BoxCoder``. The scale is relative, so references and boxes only need to share one unit (pixels here).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 max_log_scale: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        # decoded w/h = exp(t / ww) * reference: clamped like torchvision so an untrained head cannot overflow
        self.max_log_scale = max_log_scale
        self._weight_tensors: dict[tuple, Tensor] = {}

    def _weights_like(self, x: Tensor) -> Tensor:
        """The weights as a (4,) tensor on ``x``'s device, made once per device and dtype: a new tensor
        per call would be a host-to-device copy (and a wait for the GPU) in every training step."""
        key = (x.device, x.dtype)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.tensor(self.weights, dtype=x.dtype, device=x.device)
        return self._weight_tensors[key]

    @classmethod
    def from_variances(cls, variances: tuple[float, float]) -> "DeltaBoxCoder":
        """SSD's form: centre variance v0 and size variance v1 are weights 1/v0, 1/v0, 1/v1, 1/v1."""
        v0, v1 = variances
        return cls((1.0 / v0, 1.0 / v0, 1.0 / v1, 1.0 / v1))

    def encode(self, boxes: Tensor, references: Tensor) -> Tensor:
        """boxes (..., 4) xyxy, references (..., 4) cxcywh (broadcastable) -> deltas (..., 4)."""
        w = self._weights_like(boxes)
        b = box_convert(boxes, "xyxy", "cxcywh")
        # a degenerate GT never becomes a positive (dropped at load), the clamp only guards log(0)
        wh = b[..., 2:].clamp(min=1e-6)
        return torch.cat(
            [
                (b[..., :2] - references[..., :2]) / references[..., 2:] * w[:2],
                torch.log(wh / references[..., 2:]) * w[2:],
            ],
            dim=-1,
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """deltas (..., 4), references (..., 4) cxcywh (broadcastable) -> boxes (..., 4) xyxy."""
        w = self._weights_like(deltas)
        centre = references[..., :2] + deltas[..., :2] / w[:2] * references[..., 2:]
        size = references[..., 2:] * torch.exp((deltas[..., 2:] / w[2:]).clamp(max=self.max_log_scale))
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip (..., 4) xyxy boxes to an image of ``size`` = (H, W)."""
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


#: torch float dtypes whose arithmetic NumPy scalars reproduce (IEEE, rounded once per operation)
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (as ``torch.tensor(value, dtype=dtype)`` rounds it), as a Python float,
    computed on the host without a tensor."""
    if dtype in _NUMPY_FLOATS:
        return float(_NUMPY_FLOATS[dtype](value))
    return torch.tensor(value, dtype=dtype).item()


def scale_xy(values: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """(..., 4) laid out (x, y, x, y) (xyxy boxes, or frames (scale_x, scale_y, pad_left, pad_top)) times
    ``scale_x`` and ``scale_y``, Python numbers: no tensor is made for them, so nothing is copied to the
    device (a tensor made from Python numbers on a GPU is a blocking copy, a wait in every training step).
    The same numbers as a multiplication by a tensor of the scales where they are exact in the dtype
    (``in_dtype``)."""
    return torch.stack([values[..., 0::2] * scale_x, values[..., 1::2] * scale_y], -1).flatten(-2)


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: Tensor | tuple[int, int]) -> Tensor:
    """Rescale (..., 4) xyxy boxes from an image of ``from_size`` (H, W) to ``to_size`` (H, W).

    ``to_size`` may be a tensor broadcastable to ``boxes[..., :2]`` (e.g. (B, 1, 2) per image). Sizes given
    as numbers make no tensor (``scale_xy``): the scales are divided on the host in the boxes' dtype, as
    the device divides them.
    """
    if not isinstance(to_size, Tensor) and boxes.dtype in _NUMPY_FLOATS:
        real = _NUMPY_FLOATS[boxes.dtype]
        scale_y, scale_x = (float(real(int(t)) / real(int(f))) for t, f in zip(to_size, from_size))
        return scale_xy(boxes, scale_x, scale_y)
    to = torch.as_tensor(to_size, dtype=boxes.dtype, device=boxes.device)
    scale_hw = to / torch.tensor(from_size, dtype=boxes.dtype, device=boxes.device)
    scale_xyxy = torch.cat([scale_hw.flip(-1), scale_hw.flip(-1)], dim=-1)
    return boxes * scale_xyxy


# A frame (scale_x, scale_y, pad_left, pad_top) says where a resize put an image in the network input:
# x = x0 * scale_x + pad_left, y = y0 * scale_y + pad_top (``detectors.data.transforms.input_frame``).
# A plain resize has no padding; a letterbox has one scale (up to rounding) and centred padding.


def stretch_frames(orig_sizes: Tensor, size: tuple[int, int]) -> Tensor:
    """Frames ``(..., 4)`` of a plain resize from images of ``orig_sizes`` ``(..., 2)`` (H0, W0) to
    ``size`` (H, W)."""
    orig = orig_sizes.to(torch.float32)
    scale_x, scale_y = size[1] / orig[..., 1], size[0] / orig[..., 0]
    zero = torch.zeros_like(scale_x)
    return torch.stack([scale_x, scale_y, zero, zero], dim=-1)


def _frame_xyxy(frames: Tensor) -> tuple[Tensor, Tensor]:
    scale_x, scale_y, pad_left, pad_top = frames.unbind(-1)
    scale = torch.stack([scale_x, scale_y, scale_x, scale_y], -1)
    return scale, torch.stack([pad_left, pad_top, pad_left, pad_top], -1)


def boxes_to_original(boxes: Tensor, frames: Tensor, orig_sizes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes of the network input -> the original image's pixels, clipped to it.

    ``frames`` ``(..., 4)`` and ``orig_sizes`` ``(..., 2)`` (H0, W0) broadcast against ``boxes[..., :4]``
    and ``boxes[..., :2]`` (e.g. (4,) and (2,) for one image's boxes, (B, 1, 4) and (B, 1, 2) for a
    padded batch). Boxes reaching into a letterbox's padding end at the image border.
    """
    scale, offset = _frame_xyxy(frames.to(device=boxes.device, dtype=boxes.dtype))
    out = (boxes - offset) / scale
    h0, w0 = orig_sizes.to(device=boxes.device, dtype=boxes.dtype).unbind(-1)
    limit = torch.stack([w0, h0, w0, h0], -1)
    return torch.minimum(out.clamp(min=0), limit)


def boxes_to_input(boxes: Tensor, frames: Tensor) -> Tensor:
    """(..., 4) xyxy boxes of the original image -> the network input (the inverse of
    :func:`boxes_to_original` inside the image); ``frames`` as there."""
    scale, offset = _frame_xyxy(frames.to(device=boxes.device, dtype=boxes.dtype))
    return boxes * scale + offset


class GridCoder:
    """YOLOv2/v3's direct location prediction (Redmon and Farhadi 2017, eq. under "Direct location
    prediction"): a box is its cell's corner plus an offset in 0..1 (the sigmoid of t_x, t_y), in cells,
    and an anchor's size times ``exp(t_w)``, ``exp(t_h)``. Offsets here are the sigmoids themselves, so the
    coder needs no activation; sizes are in pixels of the input, as the anchors.

    It works on slots laid out flat over one or several grids (``detectors.anchors.AnchorGrid``): each slot
    carries its cell, its cell's size and its anchor, so one grid (YOLOv2) and the levels of a multi-scale
    head (YOLOv3) decode alike, in one go.

    ``max_log_scale`` caps ``t_w``, ``t_h`` when decoding (an untrained head cannot overflow ``exp``).
    """

    def __init__(self, max_log_scale: float = math.log(1000.0 / 16)):
        self.max_log_scale = max_log_scale

    def decode(self, offsets: Tensor, log_wh: Tensor, cells: Tensor, strides: Tensor, anchors: Tensor) -> Tensor:
        """offsets (B, N, 2) in 0..1 of the cell; log_wh (B, N, 2); cells (N, 2) column, row; strides (N, 2)
        cell width, height in pixels; anchors (N, 2) w, h in pixels -> boxes (B, N, 4) xyxy in pixels."""
        centre = (cells + offsets) * strides
        wh = anchors * torch.exp(log_wh.clamp(max=self.max_log_scale))
        return torch.cat([centre - wh / 2, centre + wh / 2], -1)

    def encode(self, boxes: Tensor, cells: Tensor, strides: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """The targets of ``decode``: boxes (B, N, 4) xyxy in pixels, each learnt by its slot ->
        (offsets (B, N, 2), log_wh (B, N, 2)); offsets are in 0..1 where the box's centre is in the cell."""
        cxcywh = box_convert(boxes, "xyxy", "cxcywh")
        offsets = cxcywh[..., :2] / strides - cells
        # a degenerate GT never becomes a target (dropped at load); the clamp only guards log(0) in padding
        log_wh = torch.log(cxcywh[..., 2:].clamp(min=1e-6) / anchors.clamp(min=1e-6))
        return offsets, log_wh
