"""The detections and ground truth of one evaluation, matched at IoU 0.5 as the metrics match them.

The confusion matrix, the P/R/F1-against-threshold curves and the per-image AP all start from the
same step: every detection is matched to a ground truth of its own class by pycocotools' greedy rule
(:func:`~detectors.evaluation.coco_match.match_detections`: in score order, each detection takes the
free GT of its class with the highest IoU >= 0.5), and a GT the metrics ignore (COCO's crowd,
VOC's difficult) neither counts as a GT to find nor makes the detection on it a false positive.

``ScoredDetections`` keeps what that needs as a torchmetrics ``Metric`` (so a training run under DDP
gathers every rank's images); ``match_at_iou50`` does the matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detectors.evaluation.coco_match import IOU_THRESHOLDS, _segment_starts, match_detections
from detectors.evaluation.detection_state import DetectionStateMetric

__all__ = ["Matches", "ScoredDetections", "match_at_iou50", "rank_in_groups"]

# match_detections works at COCO's ten IoU thresholds; the first is 0.5
assert IOU_THRESHOLDS[0] == 0.5


class ScoredDetections(DetectionStateMetric):
    """Every detection and GT box of an evaluation, with the GT's crowd and difficult flags.

    ``update(preds, targets)`` as :class:`~detectors.evaluation.detection_state.DetectionStateMetric`
    (targets may carry ``iscrowd`` and ``difficult`` ``(M,)``, default False); ``gathered()`` returns the
    flat tensors of ``DetectionStateMetric._concatenated`` (gathered across DDP ranks): ``det_boxes``
    ``(N, 4)``, ``det_scores``, ``det_labels``, ``det_image`` ``(N,)``, ``gt_boxes`` ``(M, 4)``,
    ``gt_labels``, ``gt_image``, ``gt_crowd``, ``gt_difficult`` ``(M,)``.
    """

    _GT_STATES = {"gt_crowd": ((), torch.uint8), "gt_difficult": ((), torch.uint8)}

    def _gt_fields(self, targets: Sequence[dict[str, Tensor]], gt_boxes: Tensor) -> dict[str, Tensor]:
        def flag(key: str) -> Tensor:
            parts = [t.get(key, torch.zeros(t["boxes"].shape[0], dtype=torch.bool)).reshape(-1) for t in targets]
            return torch.cat([p.to(self.device, torch.uint8) for p in parts])

        return {"gt_crowd": flag("iscrowd"), "gt_difficult": flag("difficult")}

    def compute(self) -> dict[str, Tensor]:
        """Use :meth:`gathered`: torchmetrics squeezes what ``compute`` returns, a one-row tensor to 0-d."""
        return self._concatenated()

    def gathered(self) -> dict[str, Tensor]:
        """The flat tensors listed in the class docstring, every rank's rows after a DDP gather (collective:
        every rank calls it)."""
        with self.sync_context():
            return self._concatenated()


@dataclass
class Matches:
    """The outcome of :func:`match_at_iou50`, in the detections' and GTs' own (input) order.

    Attributes:
        tp: ``(N,)`` bool, matched a scored GT of its class (a true positive at IoU 0.5).
        ignored: ``(N,)`` bool, matched only an ignored (crowd or difficult) GT: neither TP nor FP.
        gt_index: ``(N,)`` int64, the GT row a TP matched (-1 otherwise).
        gt_scored: ``(M,)`` bool, neither crowd nor difficult: the GTs recall counts.
    """

    tp: Tensor
    ignored: Tensor
    gt_index: Tensor
    gt_scored: Tensor

    @property
    def fp(self) -> Tensor:
        """``(N,)`` bool, a false positive: neither a TP nor ignored."""
        return ~self.tp & ~self.ignored


def rank_in_groups(scores: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Order of detections by (group key, score descending, input order) and each one's rank in its group.

    Returns:
        ``order`` ``(N,)`` (indices into the inputs) and ``rank`` ``(N,)`` of the sorted rows.
    """
    by_score = torch.argsort(-scores, stable=True)
    order = by_score[torch.argsort(keys[by_score], stable=True)]
    rank = torch.arange(order.numel(), device=scores.device) - _segment_starts(keys[order])
    return order, rank


def match_groups(det_boxes: Tensor, det_scores: Tensor, det_key: Tensor, gt_boxes: Tensor, gt_key: Tensor,
                 gt_crowd: Tensor, gt_ignore: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pycocotools' greedy matching at IoU 0.5 inside groups given by integer keys (e.g. image * C + class).

    Args:
        det_boxes: ``(N, 4)`` xyxy; det_scores, det_key: ``(N,)``.
        gt_boxes: ``(M, 4)``; gt_key, gt_crowd, gt_ignore: ``(M,)`` (crowd GTs may match many detections).

    Returns:
        ``matched`` ``(N,)`` bool, ``matched_ignored`` ``(N,)`` bool and ``gt_index`` ``(N,)`` int64 (a row of
        the inputs, -1 for none), in the input order.
    """
    n, device = det_scores.numel(), det_scores.device
    out_matched = torch.zeros(n, dtype=torch.bool, device=device)
    out_ignored = torch.zeros(n, dtype=torch.bool, device=device)
    out_index = torch.full((n,), -1, dtype=torch.int64, device=device)
    if n == 0 or gt_key.numel() == 0:
        return out_matched, out_ignored, out_index
    order, rank = rank_in_groups(det_scores, det_key)
    gt_order = torch.argsort(gt_key, stable=True)
    matched, matched_ignored, gt_index = match_detections(
        det_boxes[order].double(), det_key[order], rank, gt_boxes[gt_order].double(), gt_key[gt_order],
        gt_crowd[gt_order].bool(), gt_ignore[gt_order].bool()[:, None], return_gt_index=True)
    out_matched[order], out_ignored[order] = matched[:, 0, 0], matched_ignored[:, 0, 0]
    found = gt_index[:, 0, 0]
    out_index[order] = torch.where(found >= 0, gt_order[found.clamp(min=0)], found)
    return out_matched, out_ignored, out_index


def match_at_iou50(s: dict[str, Tensor], num_classes: int) -> Matches:
    """Match every detection of ``ScoredDetections.gathered()``'s output ``s`` to the GT of its class.

    Detections of every score take part: pycocotools' greedy order is by score, so the detections
    above any threshold match exactly as they would if the lower ones were not there.
    """
    ignore = s["gt_crowd"].bool() | s["gt_difficult"].bool()
    det_key = s["det_image"] * num_classes + s["det_labels"]
    gt_key = s["gt_image"] * num_classes + s["gt_labels"]
    matched, matched_ignored, gt_index = match_groups(s["det_boxes"], s["det_scores"], det_key, s["gt_boxes"],
                                                      gt_key, s["gt_crowd"], ignore)
    tp = matched & ~matched_ignored
    return Matches(tp=tp, ignored=matched_ignored, gt_index=torch.where(tp, gt_index, torch.full_like(gt_index, -1)),
                   gt_scored=~ignore)
