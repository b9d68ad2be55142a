"""Pascal VOC layout: Annotations/*.xml, JPEGImages/*, ImageSets/Main/{split}.txt; one folder or several.

Pixel convention: the devkit's boxes are 1-based and inclusive (xmin=1, xmax=10 covers the first
10 pixel columns; its IoU adds 1 to every width), ours are continuous xyxy, 0-based, pixel i
spanning [i, i+1). Reading maps one to the other: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax,
y2 = ymax, so a box is xmax - xmin + 1 pixels wide (the width the common VOC -> COCO converters
write) and xmin == xmax is a valid one-pixel box; ``write_voc`` writes xmin = x1 + 1,
ymin = y1 + 1, xmax = x2, ymax = y2. COCO's [x, y, w, h] and YOLO's normalised centres carry the
continuous numbers as they are. Each written coordinate is the shortest decimal that reads back
to the same float32 (integer boxes stay integers), so VOC -> X -> VOC reproduces every box exactly.
"""

from __future__ import annotations

import decimal
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from detectors.data.formats.common import (
    MALFORMED,
    MISSING_ANNOTATION,
    UNKNOWN_CLASS,
    AnnotationChecks,
    ImageError,
    image_size,
    read_image,
)
from detectors.data.records import BadSampleError, Record

log = logging.getLogger(__name__)


def parse_voc_xml(path: Path) -> dict:
    """Read one VOC annotation: {'filename', 'width', 'height', 'objects': [(name, [x1,y1,x2,y2], difficult)]}.

    The boxes are continuous (x1, y1 = xmin - 1, ymin - 1; x2, y2 = xmax, ymax; see the module doc).
    A missing or non-positive <size> gives width = height = 0 (the caller reads the image header).
    Raises BadSampleError with the reason for a malformed file.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise BadSampleError(f"malformed XML ({e})") from None
    try:
        size = root.find("size")
        width = int(float(size.findtext("width", "0"))) if size is not None else 0
        height = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            corners = ("xmin", "ymin", "xmax", "ymax")
            xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in corners)  # type: ignore[union-attr, arg-type]
            box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # 1-based, inclusive -> continuous, 0-based
            objects.append((obj.findtext("name", "").strip(), box, obj.findtext("difficult", "0").strip() == "1"))
    except (AttributeError, TypeError, ValueError) as e:
        raise BadSampleError(f"malformed annotation ({type(e).__name__}: {e})") from None
    return {"filename": (root.findtext("filename") or "").strip(), "width": max(width, 0),
            "height": max(height, 0), "objects": objects}


class VOCSource:
    """One VOC-layout folder, or several concatenated (VOC07+12: ``root=[VOC2007, VOC2012]``).

    Args:
        root: folder holding Annotations/, JPEGImages/ and ImageSets/Main/, or a list of them.
            A split reads its image set from every root that has it (VOC2012 has no test.txt,
            so ``test: test`` reads VOC2007's alone); it is an error when none has it.
        classes: class names in label order; None reads them from the annotations of all splits
            (sorted, logged at start).
        splits: our split name -> image-set file name, e.g. {'train': 'trainval', 'test': 'test'}.
        on_bad_sample: 'skip' (warn, count, go on) or 'raise'; see ``formats.common``.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.

    Record.image_id numbers the images of a split 0..N-1 across all roots, so ids are unique.
    """

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        classes: Sequence[str] | None = None,
        splits: Mapping[str, str] | None = None,
        on_bad_sample: str = "skip",
        min_box_size: float = 1.0,
    ):
        roots = [root] if isinstance(root, (str, Path)) else list(root)
        if not roots:
            raise ValueError("data.root is an empty list: give one VOC folder or several")
        self.roots = [Path(r).expanduser() for r in roots]
        self.root = self.roots[0]
        self.splits = dict(splits or {"train": "train", "val": "val", "test": "test"})
        self.checks = AnnotationChecks(on_bad_sample, min_box_size)
        self.on_bad_sample = on_bad_sample
        self.min_box_size = min_box_size
        self.skips = self.checks.skips
        for r in self.roots:
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                if not (r / sub).is_dir():
                    raise FileNotFoundError(
                        f"VOC root {r} has no {sub}/ folder: expected Annotations/, JPEGImages/ and "
                        "ImageSets/Main/{train,val,test}.txt (set data.root=...)"
                    )
        self._parsed: dict[Path, dict | BadSampleError] = {}
        self.classes = list(classes) if classes else self._discover_classes()

    def _ids(self, split: str) -> list[tuple[Path, str]]:
        """(root, image id) of every image of ``split``, in image-set order, roots in order."""
        name = self.splits.get(split)
        if name is None:
            raise KeyError(f"no image set configured for split {split!r} (have {sorted(self.splits)})")
        paths = [r / "ImageSets" / "Main" / f"{name}.txt" for r in self.roots]
        found = [p for p in paths if p.is_file()]
        if not found:
            raise FileNotFoundError(f"image set {name}.txt for split {split!r} not found; looked for: "
                                    + ", ".join(str(p) for p in paths))
        if len(found) < len(paths):
            log.info("split %r reads %s (the other roots have no %s.txt)", split, [str(p) for p in found], name)
        ids = []
        for path in found:
            root = path.parents[2]
            ids += [(root, line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"image set {name}.txt for split {split!r} is empty: " + ", ".join(map(str, found)))
        return ids

    def _parse(self, xml: Path) -> dict | BadSampleError:
        """The parsed annotation, or the error that describes why it cannot be used (cached)."""
        if xml not in self._parsed:
            if not xml.is_file():
                self._parsed[xml] = BadSampleError(MISSING_ANNOTATION)
            else:
                try:
                    self._parsed[xml] = parse_voc_xml(xml)
                except BadSampleError as e:
                    self._parsed[xml] = e
        return self._parsed[xml]

    def _discover_classes(self) -> list[str]:
        names: set[str] = set()
        for split in self.splits:
            try:
                ids = self._ids(split)
            except (FileNotFoundError, ValueError):
                continue  # a missing split fails when it is used, with the same message
            for root, image_id in ids:
                ann = self._parse(root / "Annotations" / f"{image_id}.xml")
                if isinstance(ann, dict):
                    names.update(name for name, _, _ in ann["objects"])
        classes = sorted(names)
        log.info("classes read from the annotations of %s: %s", ", ".join(map(str, self.roots)), classes)
        return classes

    def records(self, split: str) -> list[Record]:
        index = {name: i for i, name in enumerate(self.classes)}
        entries = [(root, i, root / "Annotations" / f"{i}.xml") for root, i in self._ids(split)]
        # unusable files first: with on_bad_sample=raise the first error then names a file, not a box
        usable = []
        for root, image_id, xml in entries:
            ann = self._parse(xml)
            if isinstance(ann, BadSampleError):
                kind = MISSING_ANNOTATION if str(ann) == MISSING_ANNOTATION else MALFORMED
                self.checks.bad(kind, str(xml), "" if kind == MISSING_ANNOTATION else str(ann))
            else:
                usable.append((root, image_id, xml, ann))
        records = []
        for root, image_id, xml, ann in usable:
            path = root / "JPEGImages" / (ann["filename"] or f"{image_id}.jpg")
            if not path.is_file():
                path = root / "JPEGImages" / f"{image_id}.jpg"
            width, height = ann["width"], ann["height"]
            if width <= 0 or height <= 0:  # no <size>: the image header has it
                try:
                    width, height = image_size(path)
                except ImageError as e:
                    self.checks.bad(MALFORMED, str(xml), f"no image size, and {e}")
                    continue
            boxes, labels, difficult = [], [], []
            for name, box, diff in ann["objects"]:
                if name not in index:
                    self.checks.bad(UNKNOWN_CLASS, f"object {name!r} in {xml}")
                    continue
                boxes.append(box)
                labels.append(index[name])
                difficult.append(diff)
            record = Record(
                image_id=len(records),
                file=str(path),
                width=width,
                height=height,
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
                difficult=np.array(difficult, dtype=bool),
            )
            records.append(record)
        records = self.checks.finish(records)
        if not records:
            raise ValueError(f"split {split!r} of {', '.join(map(str, self.roots))} has no usable images")
        return records

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        return read_image(record.file, (record.width, record.height)), record


def _number(value: float) -> str:
    """The shortest decimal that reads back to the same float32 ('260', '10.3')."""
    return np.format_float_positional(np.float32(value), trim="-")


def _fraction_digits(text: str) -> int:
    return len(text.partition(".")[2])


def _number_plus_one(value: float) -> str:
    """The shortest decimal d with float32(float(d) - 1) == float32(value): the xmin of x1 = value.

    Adding 1 to the float32 would lose the low bits of small coordinates, so 1 is added in
    decimal to the value's own shortest decimal ('0.3' -> '1.3'), and that is shortened while
    the rounded exact value + 1 with one fraction digit fewer still reads back (the decimals
    that read back form an interval around the exact value, so floor and ceiling at each length
    are the only candidates). Only a coordinate under 2**-29 px (~2e-9), which float64(d) - 1
    cannot resolve, comes back as the nearest decimal it can.
    """
    v = np.float32(value)
    if not np.isfinite(v):
        return _number(v)
    if float(v).is_integer():
        return str(int(v) + 1)

    def reads_back(text: str) -> bool:  # what parse_voc_xml makes of it
        return bool(np.float32(float(text) - 1.0) == v)

    with decimal.localcontext() as ctx:
        ctx.prec = 200  # a float32's decimal expansion has at most ~150 digits: the sums are exact
        exact = decimal.Decimal(float(v)) + 1

        def at(digits: int) -> str | None:
            step = decimal.Decimal(1).scaleb(-digits)
            rounded = (exact.quantize(step, rounding=r) for r in (decimal.ROUND_FLOOR, decimal.ROUND_CEILING))
            candidates = sorted(rounded, key=lambda d: abs(d - exact))
            for d in candidates:
                text = format(d, "f")
                text = text.rstrip("0").rstrip(".") if "." in text else text
                if reads_back(text):
                    return text
            return None

        text = format(decimal.Decimal(_number(v)) + 1, "f")
        if not reads_back(text):
            text = next((t for t in map(at, range(1, 60)) if t is not None), format(exact, "f"))
        while _fraction_digits(text) > 0 and (shorter := at(_fraction_digits(text) - 1)) is not None:
            text = shorter
        return text


def write_voc(
    dst: Path,
    splits: Mapping[str, list[Record]],
    classes: Sequence[str],
    place_image: Callable[[Record, Path], str],
) -> None:
    """Write records as a VOC folder: Annotations/<id>.xml, JPEGImages/, ImageSets/Main/<split>.txt.

    place_image(record, folder) puts the record's image into ``folder`` and returns its file
    name there (unique within the folder); the image id is that name without its suffix.
    Boxes are written 1-based: xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2 (module doc).
    """
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        ids = []
        for record in records:
            name = place_image(record, dst / "JPEGImages")
            image_id = Path(name).stem
            ids.append(image_id)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "folder").text = "JPEGImages"
            ET.SubElement(ann, "filename").text = name
            size = ET.SubElement(ann, "size")
            for key, value in (("width", record.width), ("height", record.height), ("depth", 3)):
                ET.SubElement(size, key).text = str(int(value))
            ET.SubElement(ann, "segmented").text = "0"
            for box, label, diff in zip(record.boxes, record.labels, record.difficult):
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = classes[int(label)]
                ET.SubElement(obj, "pose").text = "Unspecified"
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = str(int(diff))
                bb = ET.SubElement(obj, "bndbox")
                x1, y1, x2, y2 = box
                for key, text in zip(("xmin", "ymin", "xmax", "ymax"),
                                     (_number_plus_one(x1), _number_plus_one(y1), _number(x2), _number(y2))):
                    ET.SubElement(bb, key).text = text
            ET.indent(ann)
            ET.ElementTree(ann).write(dst / "Annotations" / f"{image_id}.xml", encoding="unicode")
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
