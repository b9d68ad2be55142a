"""COCO mAP (pycocotools' 12 stats) as a torchmetrics ``Metric`` that runs on the GPU.

``COCOMeanAP`` keeps the raw detections and ground truth as flat tensors on the
metric's device and evaluates them in :mod:`detectors.evaluation.coco_match`,
which reproduces ``COCOeval`` (iouType="bbox") without a Python loop over
images. Command line, against a COCO ground-truth file and a results file::

    python -m detectors.evaluation.coco instances_val.json detections.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detectors.evaluation.coco_match import AREA_NAMES, IOU_THRESHOLDS, coco_evaluate
from detectors.evaluation.detection_state import DetectionStateMetric

__all__ = ["COCOMeanAP", "format_coco_stats"]


class COCOMeanAP(DetectionStateMetric):
    """COCO box mAP/mAR exactly as pycocotools ``COCOeval`` (iouType="bbox", useCats=1).

    ``update(preds, targets)`` takes one dict per image:

    * preds: ``boxes`` ``(N, 4)`` xyxy absolute pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` int64.
    * targets: ``boxes`` ``(M, 4)``, ``labels`` ``(M,)``, optional ``iscrowd`` ``(M,)`` bool
      and ``area`` ``(M,)`` (default: box area; COCO files give the mask area).

    ``compute()`` returns ``map, map_50, map_75, map_small, map_medium, map_large,
    mar_1, mar_10, mar_100, mar_small, mar_medium, mar_large`` (named after
    ``max_dets``), ``map_per_class`` ``(C,)``, ``map_50_per_class`` ``(C,)`` and ``mar_100_per_class`` ``(C,)``,
    plus ``map_per_class/<name>`` scalars when ``class_names`` is given. An empty
    bucket (no non-ignored GT) gives -1 exactly as ``summarize()`` does. With a
    custom ``max_dets`` whose last entry is not 100, ``map`` is taken at
    ``max_dets[-1]`` (pycocotools' ``summarize()`` hard-codes 100 there and gives -1).

    Images are ordered as they were passed to ``update`` (after a DDP sync: rank
    0's images, then rank 1's, ...); that order plays the part of pycocotools'
    sorted image ids, which only matters for detections with equal scores.
    Boxes, scores and areas are kept in float64 so IoUs equal pycocotools' ones.
    """

    # Per-GT states besides the shared ones; crowd is uint8 because gloo cannot
    # all_gather bool tensors.
    _GT_STATES = {
        "gt_crowd": ((), torch.uint8),
        "gt_area": ((), torch.float64),
    }

    def __init__(
        self,
        num_classes: int,
        max_dets: Sequence[int] = (1, 10, 100),
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if list(max_dets) != sorted(max_dets) or len(max_dets) != 3:
            raise ValueError(f"max_dets must be 3 ascending limits like (1, 10, 100), got {max_dets}")
        super().__init__(num_classes, class_names, **kwargs)
        self.max_dets = tuple(int(m) for m in max_dets)

    def _gt_fields(self, targets: Sequence[dict[str, Tensor]], gt_boxes: Tensor) -> dict[str, Tensor]:
        """``gt_crowd`` (``iscrowd``, default False) and ``gt_area`` (``area``, default the box area)."""
        dev, f64 = self.device, torch.float64
        crowd = [t.get("iscrowd", torch.zeros(t["boxes"].shape[0], dtype=torch.bool)).reshape(-1) for t in targets]
        box_area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        if all("area" in t for t in targets):
            area = torch.cat([t["area"].reshape(-1) for t in targets]).to(dev, f64)
        else:  # per image: the given area where there is one, else the box area
            parts, start = [], 0
            for t in targets:
                n = t["boxes"].shape[0]
                parts.append(t["area"].reshape(-1).to(dev, f64) if "area" in t else box_area[start : start + n])
                start += n
            area = torch.cat(parts)
        return {"gt_crowd": torch.cat([c.to(dev, torch.uint8) for c in crowd]), "gt_area": area}

    def compute(self) -> dict[str, Tensor]:
        """The 12 COCO stats (float32 scalars) and per-class AP/AR; see the class docstring."""
        stats = coco_evaluate(**self._concatenated(), num_classes=self.num_classes, max_dets=self.max_dets)
        out = {k: v.float() for k, v in stats.items()}
        if self.class_names is not None:
            for name, ap in zip(self.class_names, out["map_per_class"]):
                out[f"map_per_class/{name}"] = ap
        return out


def format_coco_stats(stats: dict[str, Tensor], max_dets: Sequence[int] = (1, 10, 100)) -> list[str]:
    """The 12 lines of pycocotools' ``summarize()`` for a :class:`COCOMeanAP` result."""
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    all_iou = f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}"
    ap, ar = ("Average Precision", "(AP)"), ("Average Recall", "(AR)")
    last = max_dets[-1]
    rows = [(ap, all_iou, "all", last, "map"), (ap, "0.50", "all", last, "map_50"), (ap, "0.75", "all", last, "map_75")]
    rows += [(ap, all_iou, a, last, f"map_{a}") for a in AREA_NAMES[1:]]
    rows += [(ar, all_iou, "all", m, f"mar_{m}") for m in max_dets]
    rows += [(ar, all_iou, a, last, f"mar_{a}") for a in AREA_NAMES[1:]]
    return [line.format(*kind, iou, area, m, float(stats[key])) for kind, iou, area, m, key in rows]


def _load_coco(gt_path: str, dt_path: str) -> tuple[list[dict], list[dict], list[str]]:
    """Read a COCO GT file and a results file into per-image metric inputs (sorted image ids)."""
    with open(gt_path) as f:
        gt = json.load(f)
    with open(dt_path) as f:
        dt = json.load(f)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    image_ids = sorted(img["id"] for img in gt["images"])
    image_index = {img_id: i for i, img_id in enumerate(image_ids)}
    if any(d["image_id"] not in image_index for d in dt):
        raise ValueError("Results do not correspond to current coco set (unknown image_id)")

    def per_image(anns: list[dict], columns: dict[str, np.ndarray]) -> list[dict[str, Tensor]]:
        # Group rows by image with one stable sort, keeping file order inside an image.
        img = np.array([image_index[a["image_id"]] for a in anns], dtype=np.int64)
        order = np.argsort(img, kind="stable")
        splits = np.searchsorted(img[order], np.arange(1, len(image_ids)))
        parts = {k: np.split(v[order], splits) for k, v in columns.items()}
        return [{k: torch.from_numpy(parts[k][i]) for k in columns} for i in range(len(image_ids))]

    def xyxy(anns: list[dict]) -> np.ndarray:
        b = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)

    gt_anns = gt["annotations"]
    gt_box = xyxy(gt_anns)
    targets = per_image(
        gt_anns,
        {
            "boxes": gt_box,
            "labels": np.array([cat_index[a["category_id"]] for a in gt_anns], dtype=np.int64),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in gt_anns], dtype=bool),
            "area": np.array(
                [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in gt_anns], dtype=np.float64
            ),
        },
    )
    preds = per_image(
        dt,
        {
            "boxes": xyxy(dt),
            "scores": np.array([d["score"] for d in dt], dtype=np.float64),
            "labels": np.array([cat_index[d["category_id"]] for d in dt], dtype=np.int64),
        },
    )
    return preds, targets, [str(c.get("name", c["id"])) for c in cats]


def main(argv: Sequence[str] | None = None) -> dict[str, Tensor]:
    """CLI: print pycocotools-style summary lines for a GT json and a results json."""
    parser = argparse.ArgumentParser(description="COCO box mAP (pycocotools-exact) on the GPU when available.")
    parser.add_argument("gt", help="COCO ground-truth json (images, annotations, categories)")
    parser.add_argument("dt", help="results json: list of {image_id, category_id, bbox [x,y,w,h], score}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    preds, targets, names = _load_coco(args.gt, args.dt)
    metric = COCOMeanAP(num_classes=len(names)).to(args.device)
    metric.update(preds, targets)
    stats = metric.compute()
    print("\n".join(format_coco_stats(stats, metric.max_dets)))
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
