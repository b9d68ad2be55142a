"""TIDE's error breakdown (Bolya et al. 2020, "TIDE: A General Toolbox for Identifying Object Detection
Errors") of COCO-format detections: how much AP@0.5 fixing each type of error would add (dAP).

The algorithm is the ``tidecv`` package's (1.0.1), reproduced on the COCO files evaluation writes
(``tests/test_tide.py`` checks it against ``tidecv`` on the same files); ``tidecv`` itself is not a
dependency: it requires the GUI ``opencv-python`` (which clashes with the headless OpenCV here), pandas and
seaborn, and its COCO loader needs a ``segmentation`` in every annotation.

Per image, detections sorted by score (the best ``max_dets``) are matched greedily to the unmatched
ground truth of their class with the highest IoU >= ``pos_threshold`` (0.5); an unmatched detection over
a crowd region of its class (crowd IoU > 0.5) is ignored. Each unmatched (or ignored) detection gets the
first error type that fits, in this order:

* ``localisation``: its best IoU with a ground truth of its class lies in [0.1, 0.5];
* ``classification``: IoU >= 0.5 with a ground truth of another class;
* ``duplicate``: IoU >= 0.5 with a ground truth of its class that a higher-scored detection matched;
* ``background``: IoU <= 0.1 with every ground truth (or the image has none);
* ``both``: anything else (wrong class and poorly localised);

and each unmatched ground truth that no localisation or classification error points at is ``missed``.

The dAP of a type is TIDE's mAP after fixing every error of that type alone minus the mAP as it is
(clipped at 0 as TIDE does): a localisation or classification error becomes a true positive of the
ground truth's class (only the highest-scored such error of each ground truth; the others of it are
dropped), duplicate, background and both errors are dropped, and a missed ground truth no longer counts.
AP is TIDE's: precision made monotone, sampled at 101 recall points (COCO's interpolation), in percent;
its mAP averages the classes that have a ground truth or a detection, so a class with detections and no
ground truth counts as AP 0 (COCO leaves it out). Per class, the dAP is that class's AP after the same
fix minus its AP now.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["ERROR_TYPES", "TideBreakdown", "tide_errors"]

# TIDE's order of its main errors (its short names: Cls, Loc, Both, Dupe, Bkg, Miss)
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
_CODE = {name: i for i, name in enumerate(ERROR_TYPES)}
_RECALL_POINTS = np.arange(101) / 100  # == [x / 100 for x in range(101)], bit for bit


@dataclass
class TideBreakdown:
    """What :func:`tide_errors` finds. AP and dAP in percent points (TIDE's scale), AP at ``pos_threshold``.

    ``class_ids`` lists the classes in the order of the per-class fields: the ground-truth file's
    categories, then any other category id that a detection names. A class with neither a ground truth
    nor a detection has AP nan (TIDE does not score it), dAP 0 and no errors.
    """

    ap: float
    dap: dict[str, float]
    counts: dict[str, int]
    class_ids: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    class_gt: list[int] = field(default_factory=list)
    class_ap: list[float] = field(default_factory=list)
    class_dap: list[dict[str, float]] = field(default_factory=list)
    class_counts: list[dict[str, int]] = field(default_factory=list)


def _ap(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """TIDE's AP (percent) of one class: ``scores`` ``(D,)`` and ``tp`` ``(D,)`` bool in TIDE's push order
    (ties keep it), ``num_gt`` ground truths."""
    if num_gt == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = tp[order]
    num_true = np.cumsum(hits)
    precision = num_true / np.arange(1, len(hits) + 1)
    recall = num_true / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # remove the dips, as COCOeval does
    # each recall point takes the precision of the first rank that reaches it, 0 past the last recall
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    sampled = np.append(precision, 0.0)[idx]
    return sum(sampled.tolist()) / len(sampled) * 100  # Python's sum: TIDE's rounding


def _class_aps(cls: np.ndarray, scores: np.ndarray, tp: np.ndarray, gt_count: Mapping[int, int],
               classes: Sequence[int]) -> dict[int, float]:
    """AP of each of ``classes`` that is not empty (a ground truth or a detection); empty ones are left out."""
    out = {}
    for c in classes:
        sel = cls == c
        if gt_count.get(c, 0) == 0 and not sel.any():
            continue
        out[c] = _ap(scores[sel], tp[sel], gt_count.get(c, 0))
    return out


def _mean(aps: Mapping[int, float]) -> float:
    return sum(aps.values()) / len(aps) if aps else 0.0


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: bool) -> np.ndarray:
    """``(D, G)`` IoU of ``[x, y, w, h]`` boxes (pycocotools', as TIDE); crowd: intersection over the detection."""
    if not len(dets) or not len(gts):
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou(dets, gts, [int(crowd)] * len(gts)), dtype=np.float64).reshape(len(dets), len(gts))


class _Image:
    """One image's detections after matching and error assignment (TIDE's ``TIDEExample`` + ``_eval_image``).

    Per detection ``(D,)`` in score order: ``tp``, ``ignored`` (over a crowd region), ``error`` (a code of
    :data:`ERROR_TYPES`, -1 for a true positive), ``fix_class`` and ``fix_tp`` (what fixing its error makes of
    it: a true positive of ``fix_class``, else it is dropped); ``missed`` ``(M,)``: classes of the missed
    ground truths; ``gt_classes`` ``(G,)``: classes of the scored (not crowd) ground truths.
    """

    def __init__(self, dets: list[dict], gts: list[dict], crowds: list[dict], pos: float, bg: float, max_dets: int):
        dets = sorted(dets, key=lambda d: -d["score"])[:max_dets]
        self.cls = np.array([d["category_id"] for d in dets], dtype=np.int64)
        self.scores = np.array([d["score"] for d in dets], dtype=np.float64)
        gt_cls = np.array([g["category_id"] for g in gts], dtype=np.int64)
        boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        iou = _iou(boxes, np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4), crowd=False)
        same = self.cls[:, None] == gt_cls[None, :]
        cls_iou = iou * same
        num = len(dets)
        self.tp = np.zeros(num, dtype=bool)
        gt_used = np.zeros(len(gts), dtype=bool)
        if len(gts):
            buffer = cls_iou.copy()
            for d in np.flatnonzero(cls_iou.max(1) >= pos):  # greedy in score order; the others cannot match
                g = int(np.argmax(buffer[d]))  # its best free ground truth
                if buffer[d, g] >= pos:
                    self.tp[d] = gt_used[g] = True
                    buffer[:, g] = 0
        self.ignored = np.zeros(num, dtype=bool)
        for crowd in crowds:
            over = _iou(boxes, np.array([crowd["bbox"]], dtype=np.float64), crowd=True)[:, 0] > pos
            self.ignored |= ~self.tp & over & (self.cls == crowd["category_id"])
        self.error = np.where(self.tp, -1, self._classify(iou, cls_iou, same, gt_used, pos, bg))
        self.fix_class = self.cls.copy()
        self.fix_tp = np.zeros(num, dtype=bool)
        usable = np.zeros(len(gts), dtype=bool)  # a localisation/classification error can fix it: not missed
        fixes = (self.error == _CODE["localisation"]) | (self.error == _CODE["classification"])
        if len(gts) and fixes.any():
            target = np.where(self.error == _CODE["localisation"], cls_iou.argmax(1), (iou * ~same).argmax(1))
            self.fix_class[fixes] = gt_cls[target[fixes]]
            free = np.flatnonzero(fixes & ~gt_used[target])
            # only the first (highest-scored) error of a free ground truth becomes its true positive
            _, first = np.unique(target[free], return_index=True)
            self.fix_tp[free[first]] = True
            usable[target[free]] = True
        self.missed = gt_cls[~gt_used & ~usable]
        self.gt_classes = gt_cls

    @staticmethod
    def _classify(iou: np.ndarray, cls_iou: np.ndarray, same: np.ndarray, gt_used: np.ndarray, pos: float,
                  bg: float) -> np.ndarray:
        """``(D,)`` error code of each detection as if unmatched: the first type that fits, in TIDE's order."""
        if not iou.shape[1]:
            return np.full(len(iou), _CODE["background"])
        own, other = cls_iou.max(1), (iou * ~same).max(1)
        taken, best = (cls_iou * gt_used).max(1), iou.max(1)
        return np.select([(bg <= own) & (own <= pos), other >= pos, taken >= pos, best <= bg],
                         [_CODE["localisation"], _CODE["classification"], _CODE["duplicate"], _CODE["background"]],
                         _CODE["both"])


def _split_ground_truth(ground_truth: Mapping) -> tuple[list, dict[int, list[dict]], dict[int, list[dict]]]:
    """Image ids in the file's order and each image's scored and crowd annotations."""
    try:
        image_ids = [int(im["id"]) for im in ground_truth["images"]]
        annotations = list(ground_truth["annotations"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"the ground truth must be a COCO dataset with images[].id and annotations ({e!r})") from e
    scored: dict[int, list[dict]] = {i: [] for i in image_ids}
    crowds: dict[int, list[dict]] = {i: [] for i in image_ids}
    for a in annotations:
        if not all(k in a for k in ("image_id", "category_id", "bbox")) or len(a["bbox"]) != 4:
            raise ValueError(f"a ground-truth annotation needs image_id, category_id and bbox [x, y, w, h]: {a}")
        i = int(a["image_id"])
        if i not in scored:  # an annotation of an unlisted image: TIDE adds the image
            scored[i], crowds[i] = [], []
            image_ids.append(i)
        (crowds if a.get("iscrowd", 0) else scored)[i].append(a)
    return image_ids, scored, crowds


def tide_errors(ground_truth: Mapping, detections: Sequence[Mapping], pos_threshold: float = 0.5,
                background_threshold: float = 0.1, max_dets: int = 100) -> TideBreakdown:
    """TIDE's main errors of ``detections`` against ``ground_truth`` (see the module docstring).

    Args:
        ground_truth: a COCO dataset dict (``images``, ``annotations`` with ``bbox`` [x, y, w, h] and
            optional ``iscrowd``, optional ``categories`` with names): evaluate.py's ``coco_ground_truth.json``.
        detections: COCO results ``[{image_id, category_id, bbox, score}]``: its ``coco_results.json``.
            Detections of images that the ground truth does not list are left out, as TIDE does.
        pos_threshold: IoU of a true positive (TIDE's foreground threshold); background_threshold: IoU at or
            below which a detection is background; max_dets: detections kept per image (best scores).

    Returns:
        the :class:`TideBreakdown`.

    Raises:
        ValueError: a file that is not COCO-format.
    """
    image_ids, scored, crowds = _split_ground_truth(ground_truth)
    per_image: dict[int, list[dict]] = {i: [] for i in image_ids}
    for d in detections:
        if not isinstance(d, Mapping) or not all(k in d for k in ("image_id", "category_id", "bbox", "score")) \
                or len(d["bbox"]) != 4:
            raise ValueError(f"a detection needs image_id, category_id, bbox [x, y, w, h] and score: {d}")
        if int(d["image_id"]) in per_image:
            per_image[int(d["image_id"])].append(d)
    images = [_Image(per_image[i], scored[i], crowds[i], pos_threshold, background_threshold, max_dets)
              for i in image_ids]

    def gather(key: str, dtype) -> np.ndarray:
        """One attribute of every image, concatenated in image order (TIDE's order)."""
        return np.concatenate([getattr(im, key) for im in images]).astype(dtype) if images else np.zeros(0, dtype)

    cls, scores, tp = gather("cls", np.int64), gather("scores", np.float64), gather("tp", bool)
    ignored, error, missed = gather("ignored", bool), gather("error", np.int64), gather("missed", np.int64)
    fix_class, fix_tp, gt_cls = gather("fix_class", np.int64), gather("fix_tp", bool), gather("gt_classes", np.int64)
    gt_count = {int(c): int(n) for c, n in zip(*np.unique(gt_cls, return_counts=True))}

    categories = list(ground_truth.get("categories") or [])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    class_ids = list(names) + sorted({int(c) for c in np.concatenate([cls, gt_cls]).tolist()} - set(names))
    scored_classes = sorted(set(gt_count) | set(cls[~ignored].tolist()))  # TIDE's classes: a GT or a detection

    # as it is: the detections that are not ignored, in TIDE's order
    base = _class_aps(cls[~ignored], scores[~ignored], tp[~ignored], gt_count, scored_classes)
    fixed: dict[str, dict[int, float]] = {}
    for code, name in enumerate(ERROR_TYPES):
        hit = error == code  # no detection has a missed error: fixing those changes the ground-truth counts
        counts_after = dict(gt_count)
        if name == "missed":
            for c in missed.tolist():
                counts_after[c] -= 1
        # TIDE lists the (fixed) errors first and the true positives after them: equal scores keep that order
        first = (~tp & ~hit & ~ignored) | (hit & fix_tp)
        order = np.concatenate([np.flatnonzero(first), np.flatnonzero(tp)])
        new_cls = np.where(hit, fix_class, cls)[order]
        fixed[name] = _class_aps(new_cls, scores[order], (tp | hit)[order], counts_after, scored_classes)

    ap = _mean(base)
    out = TideBreakdown(ap=ap, dap={n: max(_mean(fixed[n]) - ap, 0.0) for n in ERROR_TYPES},
                        counts=_count_errors(error, missed), class_ids=class_ids,
                        class_names=[names.get(c, str(c)) for c in class_ids])
    for c in class_ids:
        out.class_gt.append(gt_count.get(c, 0))
        out.class_ap.append(base.get(c, math.nan))
        out.class_dap.append({n: max(fixed[n].get(c, 0.0) - base[c], 0.0) if c in base else 0.0 for n in ERROR_TYPES})
        out.class_counts.append(_count_errors(error[cls == c], missed[missed == c]))
    return out


def _count_errors(error: np.ndarray, missed: np.ndarray) -> dict[str, int]:
    """Errors of each type: detection errors from their codes ``(D,)`` (-1: none), missed ground truths ``(M,)``."""
    counts = {name: int((error == code).sum()) for code, name in enumerate(ERROR_TYPES)}
    counts["missed"] = len(missed)
    return counts
