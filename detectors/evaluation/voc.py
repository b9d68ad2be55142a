"""PASCAL VOC average precision (VOC2007 11-point and VOC2010+ area) as a torchmetrics ``Metric``.

Semantics follow the VOC devkit (``VOCevaldet.m`` / py-faster-rcnn's
``voc_eval.py``), with these notes:

* IoU uses continuous coordinates, ``(x2 - x1) * (y2 - y1)``, without the
  devkit's "+1": our boxes are continuous xyxy, 0-based, and the VOC reader
  maps the devkit's 1-based inclusive ``[xmin, xmax]`` to ``[xmin - 1, xmax]``
  (``detectors.data.formats.voc``), so every width and intersection is the
  devkit's ``xmax - xmin + 1`` and this IoU equals the devkit's on the xml's
  integer boxes exactly (``tests/test_voc_ap.py`` checks it).
* A detection is a hit when IoU >= threshold, as the MATLAB devkit
  (py-faster-rcnn's ``voc_eval.py`` uses ``>``).

Detections of a class are ranked by descending score with a *stable* sort in
the order they were given (image order of ``update`` calls, then the order
inside each image); the devkit's quicksort leaves ties in an unspecified order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.evaluation.detection_state import DetectionStateMetric

__all__ = ["VOCMeanAP", "voc_ap"]

# The devkit's np.arange(0., 1.1, 0.1): its 0.30000000000000004 etc. decide ties at a
# threshold, so take the same floats rather than torch.linspace.
_VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


def voc_ap(recall: Tensor | np.ndarray, precision: Tensor | np.ndarray, use_07_metric: bool) -> float:
    """VOC AP of one class from its ranked recall/precision curve.

    Args:
        recall: ``(D,)`` cumulative recall after each ranked detection.
        precision: ``(D,)`` cumulative precision after each ranked detection.
        use_07_metric: True for VOC2007's 11-point interpolated AP (mean over
            recall 0, 0.1, ..., 1 of the max precision at recall >= r); False for
            VOC2010+'s area under the monotone precision envelope.

    Returns:
        AP as a Python float (0.0 for an empty curve).
    """
    rec = torch.as_tensor(recall).detach().to(torch.float64).reshape(-1)
    prec = torch.as_tensor(precision).detach().to(torch.float64).reshape(-1).to(rec.device)
    if use_07_metric:
        thr = torch.tensor(_VOC07_RECALLS, dtype=torch.float64, device=rec.device)
        reach = rec[None, :] >= thr[:, None]  # (11, D)
        best = torch.where(reach, prec[None, :], torch.zeros_like(reach, dtype=torch.float64)).amax(1)
        best = torch.where(reach.any(1), best, torch.zeros_like(best)) if rec.numel() else torch.zeros_like(thr)
        ap = 0.0
        for p in best.tolist():  # the devkit's running sum, same rounding
            ap = ap + p / 11.0
        return ap
    zero, one = rec.new_zeros(1), rec.new_ones(1)
    mrec = torch.cat([zero, rec, one])
    mpre = torch.cat([zero, prec, zero])
    mpre = mpre.flip(0).cummax(0).values.flip(0)  # precision envelope
    i = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1)  # where recall changes
    return float(((mrec[i + 1] - mrec[i]) * mpre[i + 1]).sum())


def voc_box_iou(dets: Tensor, gts: Tensor) -> Tensor:
    """IoU of each detection with its own row of GT boxes, continuous coordinates (no +1).

    On boxes read from VOC xml (``x1 = xmin - 1``, ``x2 = xmax``) this is the devkit's "+1" IoU
    of the xml's own numbers.

    Args:
        dets: ``(N, 4)`` xyxy. gts: ``(N, G, 4)`` xyxy.

    Returns:
        ``(N, G)`` float64; 0 where the union is empty.
    """
    d, g = dets.double()[:, None, :], gts.double()
    iw = (torch.minimum(d[..., 2], g[..., 2]) - torch.maximum(d[..., 0], g[..., 0])).clamp(min=0)
    ih = (torch.minimum(d[..., 3], g[..., 3]) - torch.maximum(d[..., 1], g[..., 1])).clamp(min=0)
    inter = iw * ih
    union = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1]) + (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1]) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


class VOCMeanAP(DetectionStateMetric):
    """PASCAL VOC mean AP at one IoU threshold, devkit semantics (see the module docstring).

    ``update(preds, targets)`` takes one dict per image:

    * preds: ``boxes`` ``(N, 4)`` xyxy absolute pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` int64.
    * targets: ``boxes`` ``(M, 4)``, ``labels`` ``(M,)``, optional ``difficult`` ``(M,)`` bool.

    ``compute()`` returns, with ``P = "voc07"`` for the 11-point metric and
    ``"voc"`` for the area metric and ``T = round(100 * iou_threshold)``:

    * ``{P}_map_{T}``: mean AP over classes that have at least one non-difficult GT.
    * ``{P}_ap_per_class``: ``(C,)`` AP per class, **-1 for a class without any
      non-difficult GT** (excluded from the mean; the devkit would divide by zero).
    * ``{P}_ap_{T}/{name}``: the same per class, when ``class_names`` is given.

    A detection of class c takes the GT of class c with the highest IoU in its
    image (difficult or already taken ones included, first one on equal IoU). At
    IoU >= threshold: difficult GT -> ignored; free GT -> TP (and taken);
    taken GT -> FP. Below the threshold, or no GT: FP.
    """

    # Per-GT state besides the shared ones; uint8, as gloo cannot gather bool.
    _GT_STATES = {"gt_difficult": ((), torch.uint8)}

    def __init__(
        self,
        num_classes: int,
        iou_threshold: float = 0.5,
        use_07_metric: bool = False,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, **kwargs)
        self.iou_threshold = float(iou_threshold)
        self.use_07_metric = bool(use_07_metric)
        self.prefix = "voc07" if use_07_metric else "voc"
        self.thr_tag = f"{round(100 * self.iou_threshold):d}"

    def _gt_fields(self, targets: Sequence[dict[str, Tensor]], gt_boxes: Tensor) -> dict[str, Tensor]:
        """``gt_difficult`` from each target's ``difficult`` (default False)."""
        difficult = [t.get("difficult", torch.zeros(t["boxes"].shape[0], dtype=torch.bool)) for t in targets]
        return {"gt_difficult": torch.cat([d.reshape(-1).to(self.device, torch.uint8) for d in difficult])}

    def _match(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TP/FP flags of all detections in ranked order.

        Returns:
            ``tp`` ``(N,)`` bool, ``fp`` ``(N,)`` bool, ``labels`` ``(N,)`` int64 in
            (class, score descending, given order) order, and ``npos`` ``(C,)``.
        """
        dev, C = self.device, self.num_classes
        s = self._concatenated()
        boxes, scores, labels, det_image = s["det_boxes"], s["det_scores"], s["det_labels"], s["det_image"]
        gt_boxes, gt_labels, gt_image, difficult = s["gt_boxes"], s["gt_labels"], s["gt_image"], s["gt_difficult"]
        npos = torch.bincount(gt_labels[~difficult], minlength=C)

        # Rank: class-major, score descending, stable so ties keep the given order.
        order = torch.argsort(-scores, stable=True)
        order = order[torch.argsort(labels[order], stable=True)]
        boxes, labels, det_image = boxes[order], labels[order], det_image[order]
        n = labels.numel()
        tp = torch.zeros(n, dtype=torch.bool, device=dev)
        fp = torch.ones(n, dtype=torch.bool, device=dev)  # no GT of the class in the image: FP
        if n == 0 or gt_labels.numel() == 0:
            return tp, fp, labels, npos

        # GT of each (image, class) in a padded table, in given order (argmax keeps the first).
        gt_key = gt_image * C + gt_labels
        gt_order = torch.argsort(gt_key, stable=True)
        keys, group, count = torch.unique_consecutive(gt_key[gt_order], return_inverse=True, return_counts=True)
        slot = torch.arange(gt_order.numel(), device=dev) - (count.cumsum(0) - count)[group]
        g_max = int(count.max())
        table = torch.full((keys.numel(), g_max), -1, dtype=torch.int64, device=dev)
        table[group, slot] = gt_order
        table_boxes = torch.zeros(keys.numel(), g_max, 4, dtype=torch.float64, device=dev)
        table_boxes[group, slot] = gt_boxes[gt_order]

        det_key = det_image * C + labels
        pos = torch.searchsorted(keys, det_key).clamp(max=keys.numel() - 1)
        has_gt = keys[pos] == det_key
        target = torch.full((n,), -1, dtype=torch.int64, device=dev)
        hit = torch.zeros(n, dtype=torch.bool, device=dev)
        chunk = max(1, (1 << 20) // g_max)  # bounds the (chunk, G, 4) GT block to ~32 MB
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            g = pos[sl]
            iou = voc_box_iou(boxes[sl], table_boxes[g]).masked_fill(table[g] < 0, -1.0)
            best = iou.amax(1, keepdim=True)
            j = (iou == best).to(torch.uint8).argmax(1, keepdim=True)  # first max, as np.argmax
            hit[sl] = has_gt[sl] & (best.squeeze(1) >= self.iou_threshold)
            target[sl] = table[g].gather(1, j).squeeze(1)

        # Each detection's GT is fixed (the max-IoU one, taken or not), so the greedy
        # devkit loop reduces to: the first ranked detection on a free GT is the TP,
        # later ones on the same GT are FP. Hits on difficult GT count as neither.
        ignored = hit & difficult[target.clamp(min=0)]
        cand = hit & ~ignored
        rank = torch.arange(n, device=dev)
        first = torch.full((gt_labels.numel(),), n, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, target[cand], rank[cand], reduce="amin")
        tp = cand & (first[target.clamp(min=0)] == rank)
        fp = ~hit | (cand & ~tp)
        return tp, fp, labels, npos

    def compute(self) -> dict[str, Tensor]:
        """``{P}_map_{T}``, ``{P}_ap_per_class`` (and named per-class APs); see the class docstring."""
        tp, fp, labels, npos = self._match()
        C = self.num_classes
        count = torch.bincount(labels, minlength=C)
        ends = count.cumsum(0).tolist()
        tp_cum, fp_cum = tp.double().cumsum(0), fp.double().cumsum(0)
        ap = torch.full((C,), -1.0, dtype=torch.float64)
        for c, (start, end, n_pos) in enumerate(zip([0] + ends[:-1], ends, npos.tolist())):
            if n_pos == 0:
                continue
            # Cumulative counts inside the class's segment of the ranked list.
            base_tp = tp_cum[start - 1] if start > 0 else tp_cum.new_zeros(())
            base_fp = fp_cum[start - 1] if start > 0 else fp_cum.new_zeros(())
            t, f = tp_cum[start:end] - base_tp, fp_cum[start:end] - base_fp
            rec = t / float(n_pos)
            prec = t / torch.clamp(t + f, min=float(np.finfo(np.float64).eps))
            ap[c] = voc_ap(rec, prec, self.use_07_metric)
        valid = ap > -1
        mean = ap[valid].mean() if bool(valid.any()) else torch.tensor(-1.0, dtype=torch.float64)
        out = {
            f"{self.prefix}_map_{self.thr_tag}": mean.float().to(self.device),
            f"{self.prefix}_ap_per_class": ap.float().to(self.device),
            "num_gt_per_class": npos.to(self.device),  # non-difficult ground truths: VOC's npos
        }
        if self.class_names is not None:
            for name, value in zip(self.class_names, out[f"{self.prefix}_ap_per_class"]):
                out[f"{self.prefix}_ap_{self.thr_tag}/{name}"] = value
        return out

    def pr_curves(self) -> list[dict[str, Tensor | float | int]]:
        """The ranked precision/recall curve of each class, the one its AP in :meth:`compute` integrates.

        Returns one dict per class (label order): ``recall`` ``(D_c,)`` and ``precision``
        ``(D_c,)`` float64 on the CPU after each of the class's D_c ranked detections
        (difficult hits dropped from the curve, as they count as neither TP nor FP),
        ``ap`` (float, as ``compute``; -1 without non-difficult GT, then the curve is empty)
        and ``num_gt`` (non-difficult GT count).
        """
        tp, fp, labels, npos = self._match()
        tp, fp, labels = tp.cpu(), fp.cpu(), labels.cpu()
        curves = []
        for c, n_pos in enumerate(npos.tolist()):
            counted = (labels == c) & (tp | fp)  # a hit on a difficult GT moves neither count
            if n_pos == 0:
                empty = torch.zeros(0, dtype=torch.float64)
                curves.append({"recall": empty, "precision": empty, "ap": -1.0, "num_gt": 0})
                continue
            t, f = tp[counted].double().cumsum(0), fp[counted].double().cumsum(0)
            rec = t / float(n_pos)
            prec = t / torch.clamp(t + f, min=float(np.finfo(np.float64).eps))
            curves.append({"recall": rec, "precision": prec, "ap": voc_ap(rec, prec, self.use_07_metric),
                           "num_gt": int(n_pos)})
        return curves
