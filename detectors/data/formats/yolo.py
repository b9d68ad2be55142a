"""YOLO txt layout (Darknet/Ultralytics): one ``class cx cy w h`` line per box, normalised to 0..1.

Default layout under ``root`` (what ``python -m detectors.data.convert --to yolo`` writes)::

    images/<split>/**/<name>.jpg     labels/<split>/**/<name>.txt     classes.txt | data.yaml

A split may also name an image folder by its path under ``root`` (Roboflow's ``train/images``);
its labels are then found as Ultralytics finds them, by replacing the last ``images`` folder
of the path with ``labels`` (next to the images when the path has none).

Pixel convention: x1 = (cx - w / 2) * W and x2 = (cx + w / 2) * W with (W, H) the image size
(read from the file header, EXIF orientation applied, as the decoder does), in float64 and then
float32; ``write_yolo`` writes float64 values in full (``repr``), so YOLO -> X -> YOLO and
X -> YOLO -> X give the same float32 boxes. A polygon line (``class x1 y1 x2 y2 ...``, from
segmentation labels) becomes the box around its points. An image without a label file, or
with an empty one, is a background image. A malformed line skips its whole image: dropping the
line alone would teach the model that the object it labels is background.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from detectors.data.formats.common import (
    IMAGE_SUFFIXES,
    MALFORMED,
    UNKNOWN_CLASS,
    AnnotationChecks,
    ImageError,
    image_size,
    read_image,
)
from detectors.data.records import BadSampleError, Record

log = logging.getLogger(__name__)

NO_LABEL_FILE = "image without a label file (kept as background)"  # audit only


def read_class_names(root: Path) -> list[str] | None:
    """Class names from ``classes.txt`` (one a line) or Ultralytics' ``data.yaml`` ``names``; None if neither."""
    if (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            names = (yaml.safe_load((root / name).read_text()) or {}).get("names")
            if isinstance(names, dict):  # {0: person, 1: bicycle}
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None


def parse_yolo_line(line: str) -> tuple[int, list[float]]:
    """(class index, normalised [x1, y1, x2, y2]) of one label line.

    Raises BadSampleError for a line that is neither ``c cx cy w h`` nor ``c x1 y1 ... xn yn`` (n >= 3).
    The class index may be out of range (the caller drops that box); the box is not checked.
    """
    parts = line.split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise BadSampleError(f"not numbers: {line.strip()!r}") from None
    if not values or not all(math.isfinite(v) for v in values) or values[0] != int(values[0]) or values[0] < 0:
        raise BadSampleError(f"class index must be a non-negative integer, values finite: {line.strip()!r}")
    cls, coords = int(values[0]), values[1:]
    if len(coords) == 4:
        cx, cy, w, h = coords
        return cls, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    if len(coords) >= 6 and len(coords) % 2 == 0:
        xs, ys = coords[0::2], coords[1::2]
        return cls, [min(xs), min(ys), max(xs), max(ys)]
    raise BadSampleError(f"expected 'class cx cy w h' (or a polygon), got {len(parts)} values: {line.strip()!r}")


class YOLOSource:
    """A YOLO txt dataset.

    Args:
        root: the dataset folder.
        classes: class names in label order (index i of a label line is classes[i]); None reads
            ``classes.txt`` or ``data.yaml`` under root.
        splits: our split name -> image folder: a name N (images/N) or a path under root.
        on_bad_sample: 'skip' or 'raise'; see ``formats.common``.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.

    Record.image_id numbers the images of a split 0..N-1 in sorted path order.
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
        if not self.root.is_dir():
            raise FileNotFoundError(f"YOLO root {self.root} not found (set data.root=...); expected "
                                    "images/<split>/, labels/<split>/ and classes.txt or data.yaml")
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        self.checks = AnnotationChecks(on_bad_sample, min_box_size)
        self.skips = self.checks.skips
        names = list(classes) if classes else read_class_names(self.root)
        if not names:
            raise FileNotFoundError(f"YOLO labels hold class indices only: give the names with data.classes=[...] "
                                    f"or in {self.root / 'classes.txt'} (one a line) or {self.root / 'data.yaml'} (names:)")
        self.classes = names

    def folders(self, split: str) -> tuple[Path, Path]:
        """(image folder, label folder) of ``split``."""
        if split not in self.splits:
            raise KeyError(f"no image folder configured for split {split!r} (have {sorted(self.splits)})")
        spec = str(self.splits[split])
        images = self.root / spec if "/" in spec else self.root / "images" / spec  # an absolute spec stays absolute
        parts = list(images.parts)
        if "images" in parts:
            i = len(parts) - 1 - parts[::-1].index("images")
            parts[i] = "labels"
        return images, Path(*parts)

    def records(self, split: str) -> list[Record]:
        image_dir, label_dir = self.folders(split)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no image folder {image_dir} for split {split!r} (YOLO layout: "
                                    f"images/<split>/ and labels/<split>/ under {self.root})")
        files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"split {split!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        labels_of = {f: label_dir / f.relative_to(image_dir).with_suffix(".txt") for f in files}
        self._report_orphans(label_dir, set(labels_of.values()))
        records = []
        for path in files:
            label_path = labels_of[path]
            try:
                width, height = image_size(path)
            except ImageError as e:
                self.checks.bad(e.kind, str(path))
                continue
            try:
                boxes, labels = self._read_labels(label_path, width, height)
            except BadSampleError as e:
                self.checks.bad(MALFORMED, str(label_path), str(e))
                continue
            record = Record(image_id=len(records), file=str(path), width=width, height=height, boxes=boxes, labels=labels)
            records.append(record)
        records = self.checks.finish(records)
        if not records:
            raise ValueError(f"split {split!r} of {image_dir} has no usable images")
        return records

    def _read_labels(self, label_path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) xyxy pixels and labels (N,) of one label file; out-of-range classes dropped."""
        if not label_path.is_file():
            self.checks.audit[NO_LABEL_FILE] += 1
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        try:
            lines = [line for line in label_path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise BadSampleError(f"unreadable label file ({e})") from None
        boxes, labels = [], []
        for n, line in enumerate(lines, 1):
            try:
                cls, box = parse_yolo_line(line)
            except BadSampleError as e:
                raise BadSampleError(f"line {n}: {e}") from None
            if cls >= len(self.classes):
                self.checks.bad(UNKNOWN_CLASS, f"line {n} of {label_path}", f"class index {cls}, {len(self.classes)} classes")
                continue
            boxes.append(box)
            labels.append(cls)
        scale = np.array([width, height, width, height], dtype=np.float64)
        return (np.array(boxes, dtype=np.float64).reshape(-1, 4) * scale).astype(np.float32), np.array(labels, np.int64)

    def _report_orphans(self, label_dir: Path, used: set[Path]) -> None:
        """One line for label files that no image uses (a typo'd name or a deleted image)."""
        if label_dir.is_dir():
            orphans = [p for p in label_dir.rglob("*.txt") if p not in used]
            if orphans:
                log.warning("%d label files in %s have no image (e.g. %s); they are not used",
                            len(orphans), label_dir, orphans[0].name)

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        return read_image(record.file, (record.width, record.height)), record


def _number(value: float) -> str:
    return repr(float(value))


def write_yolo(
    dst: Path,
    splits: Mapping[str, list[Record]],
    classes: Sequence[str],
    place_image: Callable[[Record, Path], str],
    drop_difficult: bool = False,
) -> int:
    """Write records as YOLO txt: images/<split>/, labels/<split>/<stem>.txt, classes.txt, data.yaml.

    YOLO has no difficult flag: difficult objects are written as ordinary boxes, or left out
    with ``drop_difficult`` (what Ultralytics' VOC script does). Returns how many were left out.
    """
    (dst / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    spec = {"path": str(dst.resolve()), **{s: f"images/{s}" for s in splits}, "names": dict(enumerate(classes))}
    (dst / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    dropped = 0
    for split, records in splits.items():
        (dst / "labels" / split).mkdir(parents=True, exist_ok=True)
        for record in records:
            name = place_image(record, dst / "images" / split)
            size = np.array([record.width, record.height], dtype=np.float64)
            lines = []
            for box, label, diff in zip(record.boxes.astype(np.float64), record.labels, record.difficult):
                if diff and drop_difficult:
                    dropped += 1
                    continue
                centre, extent = (box[:2] + box[2:]) / 2 / size, (box[2:] - box[:2]) / size
                lines.append(" ".join([str(int(label)), *map(_number, (*centre, *extent))]))
            (dst / "labels" / split / Path(name).with_suffix(".txt")).write_text("".join(f"{x}\n" for x in lines))
    return dropped
