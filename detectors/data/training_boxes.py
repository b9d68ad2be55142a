"""The training split's boxes as the network receives them: in pixels of the input, placed as the training resize
(stretch or letterbox) places them, without the ones training leaves out. What anchor k-means
(``python -m detectors.anchors``) and the dataset check's anchor fit (``python -m detectors.data.check``) read."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from detectors.data.records import Record, Source
from detectors.data.transforms import build_transform, letterbox_frame

#: the augment presets whose training resize letterboxes
LETTERBOX_PRESETS = ("yolo", "letterbox")


def training_records(source: Source, split: str = "train") -> tuple[list[Record], bool]:
    """The split's records with their boxes, and whether the images had to be loaded for them: a
    generated source (the shapes) makes its boxes with the image, its records carry none."""
    records = source.records(split)
    if records and not any(len(r.boxes) for r in records):
        return [source.load(r)[1] for r in records], True
    return records, False


def boxes_at_input(records: Sequence[Record], input_size: Sequence[int], letterbox: bool,
                   min_box_size: float) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
    """The records' trainable boxes in pixels of the input (H, W), placed as the training resize places them.

    Returns ((N, 4) xyxy float64, (N,) their labels, (N,) the index of each box's record, counts of the
    boxes left out by reason).
    """
    height, width = int(input_size[0]), int(input_size[1])
    counts = [len(r.boxes) for r in records]
    boxes = np.concatenate([r.boxes for r in records]).astype(np.float64) if sum(counts) else np.zeros((0, 4))
    labels = np.concatenate([r.labels for r in records]).astype(np.int64) if sum(counts) else np.zeros(0, np.int64)
    ignored = np.concatenate([r.difficult | r.iscrowd for r in records]) if sum(counts) else np.zeros(0, bool)
    if letterbox:
        frames: dict[tuple[int, int], tuple[float, float, float, float]] = {}
        per_image = [frames.setdefault((r.height, r.width), letterbox_frame((r.height, r.width), (height, width)))
                     for r in records]
    else:
        per_image = [(width / r.width, height / r.height, 0.0, 0.0) for r in records]
    frame = np.repeat(np.asarray(per_image, dtype=np.float64).reshape(-1, 4), counts, axis=0)  # (N, 4) per box
    boxes = boxes * np.tile(frame[:, :2], 2) + np.tile(frame[:, 2:], 2)
    wh = boxes[:, 2:] - boxes[:, :2]
    tiny = ~ignored & (wh < min_box_size).any(axis=1)
    left_out = {"difficult or crowd": int(ignored.sum()),
                f"under min_box_size={min_box_size:g} px at the input": int(tiny.sum())}
    keep = ~ignored & ~tiny
    image = np.repeat(np.arange(len(records)), counts)
    return (torch.from_numpy(boxes[keep]), torch.from_numpy(labels[keep]), torch.from_numpy(image[keep]),
            left_out)


def box_sizes_at_input(records: Sequence[Record], input_size: Sequence[int], letterbox: bool,
                       min_box_size: float) -> tuple[Tensor, dict[str, int]]:
    """Widths and heights of the records' trainable boxes in pixels of the input (H, W)
    (``boxes_at_input``).

    Returns ((N, 2) float64, counts of the boxes left out by reason).
    """
    boxes, _, _, left_out = boxes_at_input(records, input_size, letterbox, min_box_size)
    return boxes[:, 2:] - boxes[:, :2], left_out


def training_resize(datamodule) -> tuple[str, bool, float]:
    """How the training transform maps a box to the input: (the augment preset, whether it letterboxes,
    its ``min_box_size`` in px, below which it drops a box)."""
    augment = datamodule.augment
    preset = augment.get("preset", "none")
    # the training transform's own default where the augment config does not set it
    default_min_box_size = inspect.signature(build_transform).parameters["min_box_size"].default
    return preset, preset in LETTERBOX_PRESETS, float(augment.get("min_box_size", default_min_box_size))
