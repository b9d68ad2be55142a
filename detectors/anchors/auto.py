"""``head.anchors=auto``: keep a YOLO head's configured anchors when they fit the training boxes, else
k-means anchors when those fit better (Ultralytics' AutoAnchor, with YOLOv2's dimension clusters).

The fit is ``detectors.anchors.fit.shape_fit``: the share of boxes whose best anchor shape IoU is >= ``iou``
(0.5) and the mean best IoU. Below ``threshold`` (0.98) of the boxes, ``kmeans_anchors`` clusters as many
anchors as configured (sorted by area, as the heads group them by level) and the better of the two is kept:
the higher share, then the higher mean IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detectors.anchors import kmeans_anchors
from detectors.anchors.fit import AnchorFit, shape_fit


@dataclass(frozen=True)
class AnchorChoice:
    """anchors: (K, 2) the ones to use; configured / kmeans: the fits of both (kmeans None when not run);
    used_kmeans: whether ``anchors`` are k-means'; note: why k-means did not run or could not."""

    anchors: Tensor
    configured: AnchorFit
    kmeans: AnchorFit | None
    kmeans_anchors: Tensor | None
    used_kmeans: bool
    threshold: float
    note: str = ""

    def describe(self) -> str:
        """One log line: ``anchors: configured fit 0.71 of 2804 boxes >= 0.5 IoU (mean 0.62), k-means 0.99
        (mean 0.84): using k-means [[w, h], ...]``."""
        c = self.configured
        line = f"anchors: configured fit {c.share:.4f} of {c.num_boxes} boxes >= {c.threshold:g} IoU (mean {c.mean_iou:.4f})"
        if self.kmeans is not None:
            line += f", k-means {self.kmeans.share:.4f} (mean {self.kmeans.mean_iou:.4f})"
            verdict = "using k-means" if self.used_kmeans else "keeping the configured ones (k-means fits no better)"
        elif self.note:
            verdict = f"keeping the configured ones ({self.note})"
        else:
            verdict = f"keeping the configured ones (>= {self.threshold:g})"
        pairs = ", ".join(f"[{w:.2f}, {h:.2f}]" for w, h in self.anchors.tolist())
        return f"{line}: {verdict} [{pairs}]"


def better(a: AnchorFit, b: AnchorFit) -> bool:
    """Whether fit ``a`` is better than ``b``: a higher share of boxes reached, then a higher mean IoU."""
    return (a.share, a.mean_iou) > (b.share, b.mean_iou)


def choose_anchors(wh: Tensor, anchors: Tensor, threshold: float = 0.98, iou: float = 0.5,
                   seed: int = 0) -> AnchorChoice:
    """The anchors to train with. wh: (N, 2) the training boxes' widths and heights in pixels of the input;
    anchors: (K, 2) the configured ones in the same pixels. Returns an ``AnchorChoice`` (anchors float32)."""
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    wh = torch.as_tensor(wh, dtype=torch.float64).reshape(-1, 2)
    configured = shape_fit(wh, anchors, iou)
    keep = {"anchors": anchors, "configured": configured, "kmeans": None, "kmeans_anchors": None,
            "used_kmeans": False, "threshold": float(threshold)}
    if not len(wh):
        return AnchorChoice(**keep, note="no training boxes")
    if configured.share >= threshold:
        return AnchorChoice(**keep)
    try:
        clustered = kmeans_anchors(wh, len(anchors), seed=seed).float()
    except ValueError as e:  # fewer distinct box shapes than anchors
        return AnchorChoice(**keep, note=f"no k-means: {e}")
    fit = shape_fit(wh, clustered, iou)
    use = better(fit, configured)
    return AnchorChoice(clustered if use else anchors, configured, fit, clustered, use, float(threshold))
