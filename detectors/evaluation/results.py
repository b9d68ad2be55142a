"""COCO-format result files: detections as ``[{image_id, category_id, bbox [x, y, w, h], score}]``.

This is the format pycocotools' ``COCO.loadRes``, faster-coco-eval and the COCO evaluation server
read. Boxes are in the original image's pixel frame (``DetectionModule.validation_step`` returns
them so), ``[x, y, w, h]`` with (x, y) the top-left corner.

Ids:

* ``image_id`` is the record's ``image_id``: the COCO image id for a COCO source, the image's index
  in its split for VOC folders and the built-in shapes (``images`` of the ground-truth file written
  next to it maps each id to its file name).
* ``category_id``: when the data source has a ``category_ids`` attribute (a COCO source gives the
  original, non-contiguous ids of its labels 0..C-1 in label order), label ``l`` is written as
  ``category_ids[l]``; otherwise (VOC, shapes) as ``l + 1``, COCO's convention that ids start at 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["category_ids_of", "coco_detections", "coco_ground_truth", "write_json"]


def category_ids_of(source: Any, num_classes: int) -> list[int]:
    """Category id of each label 0..C-1: ``source.category_ids`` when the source has them, else label + 1.

    Raises:
        ValueError: the source's list does not have one id per class, or repeats an id.
    """
    ids = getattr(source, "category_ids", None)
    if ids is None:
        return list(range(1, num_classes + 1))
    ids = [int(i) for i in ids]
    if len(ids) != num_classes or len(set(ids)) != len(ids):
        raise ValueError(f"the data source's category_ids {ids} must be {num_classes} distinct ids, one per class")
    return ids


def _flatten(items: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int] | Tensor, keys: Sequence[str]) -> dict:
    """Concatenate per-image dicts into flat CPU tensors: ``boxes`` ``(N, 4)``, the other keys ``(N,)``,
    and ``image_id`` ``(N,)``, the id of each row's image."""
    if len(items) != len(image_ids):
        raise ValueError(f"{len(items)} images of boxes for {len(image_ids)} image ids")
    counts = torch.tensor([int(p["boxes"].shape[0]) for p in items], dtype=torch.long)
    out = {}
    for k in keys:
        shape = (-1, 4) if k == "boxes" else (-1,)
        parts = [p[k].detach().cpu().reshape(shape) for p in items]
        out[k] = torch.cat(parts) if parts else torch.zeros((0, 4) if k == "boxes" else (0,))
    out["image_id"] = torch.repeat_interleave(torch.as_tensor(image_ids, dtype=torch.long).cpu(), counts)
    return out


def _xywh(boxes: Tensor) -> list[list[float]]:
    """(N, 4) xyxy -> [[x, y, w, h], ...] in float64, so x + w gives back x2 exactly."""
    b = boxes.to(torch.float64)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()


def coco_detections(
    preds: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int] | Tensor, category_ids: Sequence[int]
) -> list[dict]:
    """COCO result entries of a batch of predictions.

    Args:
        preds: one dict per image: ``boxes`` ``(N, 4)`` xyxy in the original frame, ``scores`` ``(N,)``,
            ``labels`` ``(N,)`` 0..C-1.
        image_ids: ``(B,)`` id of each image (see the module docstring).
        category_ids: category id of each label (:func:`category_ids_of`).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, image by image in the order given.
    """
    flat = _flatten(preds, image_ids, ("boxes", "scores", "labels"))
    cats = torch.as_tensor(list(category_ids), dtype=torch.long)
    labels = flat["labels"].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(cats)):
        raise ValueError(f"labels must lie in [0, {len(cats)}), got {labels.unique().tolist()}")
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(flat["image_id"].tolist(), cats[labels].tolist(), _xywh(flat["boxes"]),
                              flat["scores"].to(torch.float64).tolist())
    ]


def coco_ground_truth(
    targets: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int] | Tensor,
    orig_sizes: Tensor,
    category_ids: Sequence[int],
    class_names: Sequence[str],
    file_names: Mapping[int, str] | None = None,
) -> dict:
    """A COCO ground-truth dataset of what the metric saw, to check a results file with any COCO tool.

    Args:
        targets: one dict per image: ``boxes`` ``(M, 4)`` xyxy in the original frame, ``labels`` ``(M,)``,
            optional ``area`` and ``iscrowd`` ``(M,)``.
        image_ids: ``(B,)``; orig_sizes: ``(B, 2)`` (H0, W0).
        category_ids, class_names: id and name of each label.
        file_names: image id -> file, written as ``file_name`` when given.

    Returns:
        ``{"images", "annotations", "categories"}``; ``area`` and ``iscrowd`` are the targets' own (an
        evaluation loader's ground truth carries the file's), else the box area and 0, which is how
        ``COCOMeanAP`` scores targets without them (VOC's ``difficult`` flag has no COCO counterpart and
        is left out, as the COCO metric ignores it too). For a COCO dataset the file itself is the
        reference: pycocotools on it and the results file gives evaluate.py's stats.
    """
    keys = ("boxes", "labels", *(k for k in ("area", "iscrowd") if targets and all(k in t for t in targets)))
    flat = _flatten(targets, image_ids, keys)
    cats = torch.as_tensor(list(category_ids), dtype=torch.long)
    boxes = _xywh(flat["boxes"])
    areas = flat["area"].to(torch.float64).tolist() if "area" in flat else [b[2] * b[3] for b in boxes]
    crowd = flat["iscrowd"].int().tolist() if "iscrowd" in flat else [0] * len(boxes)
    annotations = [
        {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
        for n, (i, c, b, a, z) in enumerate(zip(flat["image_id"].tolist(), cats[flat["labels"].long()].tolist(),
                                                boxes, areas, crowd))
    ]
    images = []
    for i, (h, w) in zip(torch.as_tensor(image_ids).tolist(), torch.as_tensor(orig_sizes).tolist()):
        entry = {"id": int(i), "height": int(h), "width": int(w)}
        if file_names is not None and int(i) in file_names:
            entry["file_name"] = str(file_names[int(i)])
        images.append(entry)
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as JSON (the folder is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path
