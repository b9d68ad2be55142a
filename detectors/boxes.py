"""Box formats, batched IoU and the SSD box encoder.

Boxes are ``xyxy`` in absolute pixels everywhere outside a head (see DESIGN.md).
The centre-size form (``cxcywh``) lives only inside encoders.
"""

from __future__ import annotations

import math

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


class SSDBoxCoder:
    """SSD's offset encoding of boxes relative to priors, with variances.

    ``t = ((cx - pcx) / (pw * v0), (cy - pcy) / (ph * v0), log(w / pw) / v1, log(h / ph) / v1)``
    (Liu et al. 2016, eq. 2; the variances are the reference implementation's scaling).
    The scale is relative, so priors and boxes only need to share one unit (pixels here).
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2), max_log_scale: float = math.log(1000.0 / 16)):
        self.variances = variances
        # decoded w/h = exp(t * v1) * prior: clamp like torchvision so an untrained head cannot overflow
        self.max_log_scale = max_log_scale

    def encode(self, boxes: Tensor, priors: Tensor) -> Tensor:
        """boxes (..., 4) xyxy, priors (..., 4) cxcywh (broadcastable) -> offsets (..., 4)."""
        v0, v1 = self.variances
        b = box_convert(boxes, "xyxy", "cxcywh")
        # a degenerate GT never becomes a positive (it is dropped at load), the clamp only guards log(0)
        wh = b[..., 2:].clamp(min=1e-6)
        return torch.cat(
            [
                (b[..., :2] - priors[..., :2]) / (priors[..., 2:] * v0),
                torch.log(wh / priors[..., 2:]) / v1,
            ],
            dim=-1,
        )

    def decode(self, offsets: Tensor, priors: Tensor) -> Tensor:
        """offsets (..., 4), priors (..., 4) cxcywh (broadcastable) -> boxes (..., 4) xyxy."""
        v0, v1 = self.variances
        centre = priors[..., :2] + offsets[..., :2] * v0 * priors[..., 2:]
        size = priors[..., 2:] * torch.exp((offsets[..., 2:] * v1).clamp(max=self.max_log_scale))
        return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip (..., 4) xyxy boxes to an image of ``size`` = (H, W)."""
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: Tensor | tuple[int, int]) -> Tensor:
    """Rescale (..., 4) xyxy boxes from an image of ``from_size`` (H, W) to ``to_size`` (H, W).

    ``to_size`` may be a tensor broadcastable to ``boxes[..., :2]`` (e.g. (B, 1, 2) per image).
    """
    to = torch.as_tensor(to_size, dtype=boxes.dtype, device=boxes.device)
    scale_hw = to / torch.tensor(from_size, dtype=boxes.dtype, device=boxes.device)
    scale_xyxy = torch.cat([scale_hw.flip(-1), scale_hw.flip(-1)], dim=-1)
    return boxes * scale_xyxy
