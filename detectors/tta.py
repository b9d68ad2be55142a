"""Test-time augmentation (``evaluate.py tta=true``, ``predict.py tta=true``): every image is also seen
horizontally flipped and at other scales of its network input, and the detections of all views are
merged, per class, by greedy NMS or by weighted box fusion.

A view is a scale of the batch's input size (each side rounded to the model's size divisor and checked
as ``DetectionModule._check_input_size`` checks any size) and, with ``flip``, its mirror image. Each view
goes through the detector's own ``predict`` (its score threshold, NMS and cut); its boxes are un-flipped
and un-scaled into the input frame, the views are merged there, and the merged boxes go back to each
image's original pixels as ``DetectionModule.predictions_in_original_frame`` maps them. One view (scale 1,
no flip) is that method itself: the same detections, bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, nms

from detectors.boxes import boxes_to_original, scale_xy, stretch_frames

log = logging.getLogger(__name__)

MERGES = ("nms", "wbf")
DEFAULTS = {"scales": (0.83, 1.0, 1.17), "flip": True, "merge": "nms", "iou_threshold": None,
            "max_detections": None}


def per_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes ``(N, 4)`` that greedy NMS keeps inside each class, in descending score: what
    ``torchvision.ops.batched_nms`` keeps, one ``nms`` per class (exact: batched_nms's coordinate offset for
    small inputs rounds float32 coordinates, ``detectors.postprocess``)."""
    kept = [members[nms(boxes[members], scores[members], iou_threshold)]
            for members in (torch.nonzero(labels == c)[:, 0] for c in labels.unique())]
    kept = torch.cat(kept) if kept else labels.new_zeros(0)
    return kept[scores[kept].argsort(descending=True, stable=True)]


def weighted_box_fusion(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
                        num_views: int) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted box fusion (Solovyev et al. 2021) of the detections of ``num_views`` views of one image.

    Clusters are formed as greedy per-class NMS forms them: each box joins the kept box that suppresses it
    (the best-scored kept box of its class with IoU > ``iou_threshold``). A cluster becomes the score-weighted
    mean of its boxes, scored by its mean score times min(n, num_views) / num_views, so a box that one view
    of several found is trusted less (the paper's rescaling). The paper matches each box against the running
    fused box instead; clusters from the NMS keep the step vectorised and the same where clusters are tight.

    boxes (N, 4) xyxy, scores (N,), labels (N,) -> fused boxes (K, 4), scores (K,), labels (K,) in
    descending score."""
    if len(boxes) == 0:
        return boxes.float(), scores.float(), labels
    leaders = per_class_nms(boxes, scores, labels, iou_threshold)
    match = (box_iou(boxes, boxes[leaders]) > iou_threshold) & (labels[:, None] == labels[leaders][None])
    cluster = match.to(torch.uint8).argmax(1)  # the first match: leaders are in descending score
    weights = scores.float()
    total = torch.zeros(len(leaders), dtype=weights.dtype, device=weights.device).index_add_(0, cluster, weights)
    fused = torch.zeros(len(leaders), 4, dtype=weights.dtype, device=weights.device)
    fused = fused.index_add_(0, cluster, boxes.float() * weights[:, None]) / total[:, None]
    count = torch.bincount(cluster, minlength=len(leaders)).to(weights.dtype)
    fused_scores = total / count.clamp(min=num_views)  # mean * min(n, T) / T
    order = fused_scores.argsort(descending=True, stable=True)
    return fused[order], fused_scores[order], labels[leaders][order]


def view_size(size: Sequence[int], scale: float, divisor: int) -> tuple[int, int]:
    """``size`` (H, W) times ``scale``, each side rounded to the nearest multiple of ``divisor``."""
    return tuple(max(divisor, int(round(side * scale / divisor)) * divisor) for side in size)


class TTA:
    """The detections of a module over flipped and scaled views of each batch, merged.

    Args:
        module: a ``DetectionModule`` (its detector, ``_check_input_size`` and
            ``predictions_in_original_frame``).
        scales: fractions of the batch's input size, e.g. (0.83, 1.0, 1.17); sides rounded to the model's
            size divisor; two scales that round to one size are one view; a size the model cannot take is
            left out with a warning (an error when no scale is left).
        flip: also every scale mirrored left-right.
        merge: ``nms`` (per-class greedy NMS) or ``wbf`` (``weighted_box_fusion``).
        iou_threshold: of the merge; None: the head's ``nms_threshold``.
        max_detections: kept per image after the merge; None: the head's ``max_detections``.

    Called on a normalised batch at the input size (``images`` (B, 3, H, W), ``orig_sizes`` (B, 2), optional
    ``frames`` (B, 4)), returns per image ``boxes`` (N, 4) float32 xyxy in the original pixels, ``scores``,
    ``labels``: what ``predictions_in_original_frame`` returns.
    """

    def __init__(self, module: Any, scales: Sequence[float] = DEFAULTS["scales"], flip: bool = True,
                 merge: str = "nms", iou_threshold: float | None = None, max_detections: int | None = None):
        if isinstance(scales, (int, float)):
            scales = [scales]
        scales = [float(s) for s in scales]
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"tta.scales must be positive numbers, e.g. [0.83, 1.0, 1.17], got {scales}")
        if merge not in MERGES:
            raise ValueError(f"tta.merge must be one of {', '.join(MERGES)}, got {merge!r}")
        head = module.detector.head
        iou_threshold = float(getattr(head, "nms_threshold", 0.5) if iou_threshold is None else iou_threshold)
        if not 0 < iou_threshold < 1:
            raise ValueError(f"tta.iou_threshold must be in (0, 1), got {iou_threshold}")
        self.module, self.scales, self.flip, self.merge = module, scales, bool(flip), merge
        self.iou_threshold = iou_threshold
        self.max_detections = int(getattr(head, "max_detections", 100) if max_detections is None else max_detections)
        self.divisor = int(getattr(module.detector, "size_divisor", 1))
        self.plain = module.predictions_in_original_frame  # bound before install() replaces it
        self._sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.views_of(module.input_size)  # a size the model cannot take fails here, not mid-run

    def views_of(self, size: Sequence[int]) -> list[tuple[tuple[int, int], bool]]:
        """The views of an input of ``size`` (H, W): [(view size, flipped)], checked against the model."""
        size = (int(size[0]), int(size[1]))
        if size not in self._sizes:
            sizes: list[tuple[int, int]] = []
            refused: list[str] = []
            for scale in self.scales:
                resized = size if scale == 1.0 else view_size(size, scale, self.divisor)
                if resized in sizes:
                    continue
                try:
                    if resized != size:
                        self.module._check_input_size(resized, label=f"tta scale {scale:g} of {size}:")
                    sizes.append(resized)
                except ValueError as e:
                    # the default scales serve every model: one whose network needs larger inputs (SSD300's
                    # extras: 257 px) loses its smaller views, with the reason, rather than the whole run
                    refused.append(str(e))
                    log.warning("%s; that view is left out", e)
            if not sizes:
                raise ValueError(f"tta.scales {self.scales}: no view this model takes ({refused[0]})")
            self._sizes[size] = sizes
        return [(s, flipped) for s in self._sizes[size] for flipped in ((False, True) if self.flip else (False,))]

    def describe(self, size: Sequence[int] | None = None) -> str:
        views = self.views_of(size or self.module.input_size)
        sizes = ", ".join(f"{h}x{w}" for h, w in dict.fromkeys(s for s, _ in views))
        flipped = ", each also flipped" if self.flip else ""
        return (f"test-time augmentation: {len(views)} views (H x W {sizes}{flipped}), merged by {self.merge} at IoU "
                f"{self.iou_threshold:g}, {self.max_detections} detections an image")

    def install(self) -> "TTA":
        """Make ``module.predictions_in_original_frame`` this (validation and test steps, predict.py call it)."""
        self.module.predictions_in_original_frame = self
        return self

    def __call__(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        images = batch["images"]
        size = (int(images.shape[-2]), int(images.shape[-1]))
        views = self.views_of(size)
        if views == [(size, False)]:
            return self.plain(batch)
        detector = self.module.detector
        per_view = []
        for view, flipped in views:
            x = images
            if view != size:  # resampled as batch_ops.resize_batch resamples multi-scale training batches
                x = F.interpolate(images, size=view, mode="bilinear", align_corners=False,
                                  antialias=view[0] < size[0] or view[1] < size[1])
                if self.module.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            if flipped:
                x = x.flip(-1)
            preds = detector.predict(detector(x), view)
            for p in preds:
                # float32 first, as predictions_in_original_frame: bf16 boxes would be off by pixels
                boxes = p["boxes"].float()
                if flipped:
                    boxes = torch.stack([view[1] - boxes[:, 2], boxes[:, 1], view[1] - boxes[:, 0], boxes[:, 3]], 1)
                p["boxes"] = scale_xy(boxes, size[1] / view[1], size[0] / view[0])  # Python numbers: no copy
            per_view.append(preds)
        merged = [self.merge_views([v[i] for v in per_view], len(views)) for i in range(len(images))]
        # back to each original, as DetectionModule.predictions_in_original_frame maps a plain prediction
        orig = batch["orig_sizes"]
        frames = batch.get("frames")
        if frames is None:
            frames = stretch_frames(orig, size)
        for i, p in enumerate(merged):
            p["boxes"] = boxes_to_original(p["boxes"], frames[i], orig[i])
        return merged

    def merge_views(self, preds: list[dict[str, Tensor]], num_views: int) -> dict[str, Tensor]:
        """One image's detections of every view (input frame) -> the merged ``max_detections`` best."""
        boxes = torch.cat([p["boxes"] for p in preds])
        scores = torch.cat([p["scores"].float() for p in preds])
        labels = torch.cat([p["labels"] for p in preds])
        if self.merge == "wbf":
            boxes, scores, labels = weighted_box_fusion(boxes, scores, labels, self.iou_threshold, num_views)
        else:
            kept = per_class_nms(boxes, scores, labels, self.iou_threshold)
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        n = self.max_detections
        return {"boxes": boxes[:n], "scores": scores[:n], "labels": labels[:n]}


def tta_from_config(module: Any, setting: Any) -> TTA | None:
    """The ``tta`` setting of evaluate.py and predict.py: null/false (off), true (``DEFAULTS``), or a mapping
    {enabled, scales, flip, merge, iou_threshold, max_detections} (``enabled: false``: off). Installed on
    ``module`` and logged; a bad setting raises ValueError in one line."""
    if setting is None or setting is False:
        return None
    if setting is True:
        options: dict[str, Any] = {}
    elif isinstance(setting, Mapping):
        options = dict(setting)
        if not options.pop("enabled", True):
            return None
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"tta: unknown option(s) {unknown}; the options are enabled, {', '.join(DEFAULTS)}")
    else:
        raise ValueError(f"tta must be true, false or a mapping of options, got {setting!r}")
    options = {k: v for k, v in options.items() if v is not None or k in ("iou_threshold", "max_detections")}
    if "scales" in options and not isinstance(options["scales"], (int, float)):
        options["scales"] = list(options["scales"])
    tta = TTA(module, **options).install()
    log.info(tta.describe())
    return tta
