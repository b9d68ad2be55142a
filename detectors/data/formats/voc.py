"""Pascal VOC layout: Annotations/*.xml, JPEGImages/*, ImageSets/Main/{split}.txt."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from detectors.data.records import BadSampleError, Record, SkipCounter, clean_boxes

log = logging.getLogger(__name__)

# VOC pixel coordinates are 1-based (the devkit subtracts 1 when loading); we keep the xml
# values as continuous coordinates, as torchvision's and MMDetection's VOC loaders do.


def parse_voc_xml(path: Path) -> dict:
    """Read one VOC annotation: {'filename', 'width', 'height', 'objects': [(name, [x1,y1,x2,y2], difficult)]}.

    Raises BadSampleError with the reason for a malformed file.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise BadSampleError(f"malformed XML ({e})") from None
    try:
        size = root.find("size")
        width = int(float(size.findtext("width")))  # type: ignore[union-attr, arg-type]
        height = int(float(size.findtext("height")))  # type: ignore[union-attr, arg-type]
        objects = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr, arg-type]
            objects.append((obj.findtext("name", "").strip(), box, obj.findtext("difficult", "0").strip() == "1"))
    except (AttributeError, TypeError, ValueError) as e:
        raise BadSampleError(f"malformed annotation ({type(e).__name__}: {e})") from None
    return {"filename": root.findtext("filename", ""), "width": width, "height": height, "objects": objects}


class VOCSource:
    """A VOC-layout folder.

    Args:
        root: folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
        classes: class names in label order; None reads them from the annotations of all splits
            (sorted, logged at start).
        splits: our split name -> image-set file name, e.g. {'train': 'trainval', 'test': 'test'}.
        on_bad_sample: 'skip' (warn, count, go on) or 'raise'.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        splits: Mapping[str, str] | None = None,
        on_bad_sample: str = "skip",
        min_box_size: float = 1.0,
    ):
        self.root = Path(root).expanduser()
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.min_box_size = min_box_size
        self.skips = SkipCounter()
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"VOC root {self.root} has no {sub}/ folder: expected Annotations/, JPEGImages/ and "
                    "ImageSets/Main/{train,val,test}.txt (set data.root=...)"
                )
        self._parsed: dict[str, dict | None] = {}
        self.classes = list(classes) if classes else self._discover_classes()

    def _ids(self, split: str) -> list[str]:
        name = self.splits.get(split)
        if name is None:
            raise KeyError(f"no image set configured for split {split!r} (have {sorted(self.splits)})")
        path = self.root / "ImageSets" / "Main" / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"image set {path} not found for split {split!r}")
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"image set {path} for split {split!r} is empty")
        return ids

    def _parse(self, image_id: str) -> dict | None:
        if image_id not in self._parsed:
            path = self.root / "Annotations" / f"{image_id}.xml"
            try:
                self._parsed[image_id] = parse_voc_xml(path)
            except BadSampleError as e:
                if self.on_bad_sample == "raise":
                    raise BadSampleError(f"{path}: {e}") from None
                self.skips.skip(str(path), str(e))
                self._parsed[image_id] = None
        return self._parsed[image_id]

    def _discover_classes(self) -> list[str]:
        names: set[str] = set()
        for split in self.splits:
            for image_id in self._ids(split):
                ann = self._parse(image_id)
                if ann:
                    names.update(name for name, _, _ in ann["objects"])
        classes = sorted(names)
        log.info("classes read from the annotations of %s: %s", self.root, classes)
        return classes

    def records(self, split: str) -> list[Record]:
        index = {name: i for i, name in enumerate(self.classes)}
        records = []
        for image_id in self._ids(split):
            ann = self._parse(image_id)
            if ann is None:
                continue
            filename = ann["filename"] or f"{image_id}.jpg"
            path = self.root / "JPEGImages" / filename
            if not path.is_file():
                path = self.root / "JPEGImages" / f"{image_id}.jpg"
            boxes, labels, difficult = [], [], []
            for name, box, diff in ann["objects"]:
                if name not in index:
                    self.skips.skip(f"object {name!r} in {image_id}.xml", "class not in the class list")
                    continue
                boxes.append(box)
                labels.append(index[name])
                difficult.append(diff)
            record = Record(
                image_id=len(records),
                file=str(path),
                width=ann["width"],
                height=ann["height"],
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
                difficult=np.array(difficult, dtype=bool),
            )
            records.append(clean_boxes(record, self.skips, self.min_box_size))
        if not records:
            raise ValueError(f"split {split!r} of {self.root} has no usable images")
        return records

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        image = cv2.imread(record.file, cv2.IMREAD_COLOR)
        if image is None:
            raise BadSampleError(f"unreadable or missing image {record.file}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), record
