"""The built-in procedural dataset as a source: no files, every image generated on demand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detectors.data.records import Record
from detectors.data.shapes import ShapesGenerator


class ShapesSource:
    """Generated splits of ``ShapesGenerator``; each split has its own seed, so they never overlap.

    Args:
        sizes: images per split, e.g. {'train': 2000, 'val': 200, 'test': 200}.
        image_size: (H, W) of the generated images.
        seed: base seed; split k uses seed + 1000 * k.
        generator: further ShapesGenerator arguments (objects per image, sizes, overlap).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        image_size: Sequence[int] = (300, 300),
        seed: int = 0,
        generator: Mapping | None = None,
    ):
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.generators = {
            split: ShapesGenerator(int(n), self.image_size, seed=seed + 1000 * k, **dict(generator or {}))
            for k, (split, n) in enumerate(sorted(sizes.items()))
        }
        self.classes = list(next(iter(self.generators.values())).classes)

    def records(self, split: str) -> list[Record]:
        if split not in self.generators:
            raise KeyError(f"shapes data has no split {split!r} (have {sorted(self.generators)})")
        h, w = self.image_size
        # boxes are filled in by load(): generating every image up front would cost seconds at start
        return [
            Record(image_id=i, file=f"shapes/{split}/{i}", width=w, height=h, boxes=np.zeros((0, 4)), labels=[])
            for i in range(len(self.generators[split]))
        ]

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        split = record.file.split("/")[1]
        image, boxes, labels = self.generators[split].sample(record.image_id)
        full = Record(record.image_id, record.file, record.width, record.height, boxes, labels)
        return image, full
