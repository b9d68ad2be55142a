"""One record per image: what every dataset format is read into.

A *source* (VOC folder, COCO json, the built-in shapes) turns files into records and loads
their images; everything downstream (transforms, collate, the module, evaluation) sees only
records, so every head works with every format.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class GroundTruth:
    """The annotations of one image as evaluation scores them: every box of the file, as written.

    Training cleans a record's boxes (clips them to the image, drops degenerate, tiny and outside
    ones; see ``formats.common.AnnotationChecks``). pycocotools and the VOC devkit score every
    annotation of the file instead, so a metric that saw the cleaned boxes would give other numbers.
    This is what the file says, kept before the cleaning; evaluation reads it.

    boxes: (K, 4) float64 xyxy in the original image's pixels, unclipped (a zero-width box stays).
    labels: (K,) int64; difficult, iscrowd: (K,) bool.
    area: (K,) float64: COCO's ``area`` field (the mask area, which sets small/medium/large), else
        the box area.
    """

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray

    @classmethod
    def of(cls, record: Record) -> GroundTruth:
        """The record's own boxes as ground truth (sources whose boxes need no cleaning: shapes)."""
        if record.ground_truth is not None:
            return record.ground_truth
        boxes = record.boxes.astype(np.float64)
        area = record.area if record.area is not None else box_area(boxes)
        return cls(boxes, record.labels.copy(), record.difficult.copy(), record.iscrowd.copy(),
                   np.asarray(area, dtype=np.float64))


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(K,) area of (K, 4) xyxy boxes; 0 for degenerate ones."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


@dataclass
class Record:
    """Annotations of one image.

    boxes: (N, 4) float32 xyxy in absolute pixels of the original image.
    labels: (N,) int64 in 0..C-1.
    difficult: (N,) bool; kept for evaluation (VOC ignores them), never trained on as negatives.
    iscrowd: (N,) bool; COCO crowd regions (also marked difficult, so no head trains on them);
        the COCO metric scores them with crowd semantics.
    area: (N,) float64 COCO ``area`` of each box (mask area), or None (the box area).
    ground_truth: the file's annotations before training's cleaning (set by the sources'
        ``AnnotationChecks.finish``), or None: then the boxes above are the ground truth.
    """

    image_id: int
    file: str  # path of the image, or a name for generated images
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = field(default=None)  # type: ignore[assignment]
    iscrowd: np.ndarray = field(default=None)  # type: ignore[assignment]
    area: np.ndarray | None = None
    ground_truth: GroundTruth | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if self.iscrowd is None:
            self.iscrowd = np.zeros(len(self.labels), dtype=bool)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        if self.area is not None:
            self.area = np.asarray(self.area, dtype=np.float64).reshape(-1)


class Source(Protocol):
    """What a dataset format provides to the data module."""

    classes: list[str]

    def records(self, split: str) -> list[Record]: ...

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        """The image, (H, W, 3) uint8 RGB, and its record (a generated source fills in the boxes here)."""
        ...


class BadSampleError(ValueError):
    """A sample that cannot be used (unreadable image, malformed annotation)."""


class SkipCounter:
    """Counts skipped samples and boxes by reason, and logs each one once on one line."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        """Count one skip under ``reason`` (a kind, so the summary reads "3 truncated image")."""
        self.counts[reason] += 1
        log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "nothing skipped"
