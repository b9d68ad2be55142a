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
class Record:
    """Annotations of one image.

    boxes: (N, 4) float32 xyxy in absolute pixels of the original image.
    labels: (N,) int64 in 0..C-1.
    difficult: (N,) bool; kept for evaluation (VOC ignores them), never trained on as negatives.
    iscrowd: (N,) bool; COCO crowd regions (also marked difficult, so no head trains on them);
        the COCO metric scores them with crowd semantics.
    """

    image_id: int
    file: str  # path of the image, or a name for generated images
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray = field(default=None)  # type: ignore[assignment]
    iscrowd: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if self.iscrowd is None:
            self.iscrowd = np.zeros(len(self.labels), dtype=bool)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)


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
