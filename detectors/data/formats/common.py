"""What the file-backed formats share: reading images, and one policy for bad annotations.

Every problem a source meets has a *kind* (the constants below) and a fixed treatment:

=================================  ===========================  ==============================
kind                               on_bad_sample=skip           on_bad_sample=raise
=================================  ===========================  ==============================
box partly outside the image       clipped to the image         clipped to the image
box outside the image              dropped, warned, counted     BadSampleError at start
degenerate box (x2<=x1, y2<=y1)    dropped, warned, counted     BadSampleError at start
tiny box (< min_box_size px)       dropped, warned, counted     BadSampleError at start
class not in the class list        dropped, warned, counted     BadSampleError at start
annotation of an unknown image     dropped, warned, counted     BadSampleError at start
malformed annotation (file/entry)  image skipped, counted       BadSampleError at start
unreadable/truncated/missing image image skipped every epoch    BadSampleError mid-epoch
image with no objects              kept (a background image)    kept
=================================  ===========================  ==============================

"At start" is when the data module reads the split's records, before the first step; images
are only decoded by the loader, so an unreadable one is found (and skipped) when it is loaded.
``python -m detectors.data.check`` finds all of them before training.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from detectors.data.records import (
    BadSampleError,
    GroundTruth,
    Record,
    SkipCounter,
    box_area,
)

log = logging.getLogger(__name__)

DEGENERATE = "degenerate box (x2<=x1 or y2<=y1 after clipping)"
OUTSIDE = "box outside the image"
TINY = "tiny box (under min_box_size px after clipping)"
CLIPPED = "box partly outside the image (clipped)"  # counted for the audit, never dropped
UNKNOWN_CLASS = "class not in the class list"
UNKNOWN_IMAGE = "annotation of an unknown image"
MALFORMED = "malformed annotation"
MISSING_ANNOTATION = "missing annotation file"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
TRUNCATED_IMAGE = "truncated image"
SIZE_MISMATCH = "image size differs from its annotation"

# Boxes that poke out of the image by less than this (annotation tools' rounding) are clipped
# without a warning line; they are still counted in the audit.
CLIP_WARN_PX = 1.0

# Formats the image readers accept (what OpenCV decodes; Ultralytics' list minus video/dng).
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")

_EXIF_ORIENTATION = 0x0112


class ImageError(BadSampleError):
    """An image that cannot be used; ``kind`` is one of the image kinds above."""

    def __init__(self, kind: str, path: str | Path, detail: str = "") -> None:
        self.kind = kind
        super().__init__(f"{kind} {path}" + (f" ({detail})" if detail else ""))


def _truncated_jpeg(path: str | Path) -> bool:
    """True for a JPEG whose data stops early (OpenCV decodes those as half-grey without an error).

    The end-of-image marker is checked first (cheap); when it is absent (truncation, or bytes
    appended after a complete image by some cameras) Pillow decodes the file and decides.
    """
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(-2, 2)
        if f.read(2) == b"\xff\xd9":
            return False
    try:
        with Image.open(path) as im:
            im.load()
    except OSError:
        return True
    return False


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, EXIF orientation applied (as OpenCV does).

    expected_size: (W, H) the annotation gives; a different decoded size raises, since the boxes
        would then not be in the image's pixels (and could reach past its border).
    Raises ImageError (a BadSampleError) for a missing, unreadable or truncated file.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(MISSING_IMAGE if not Path(path).is_file() else UNREADABLE_IMAGE, path)
    if _truncated_jpeg(path):
        raise ImageError(TRUNCATED_IMAGE, path)
    if expected_size is not None and (image.shape[1], image.shape[0]) != tuple(expected_size):
        w, h = expected_size
        raise ImageError(SIZE_MISMATCH, path, f"{image.shape[1]}x{image.shape[0]} pixels, annotation says {w}x{h}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image from its header alone (no decoding), after EXIF orientation.

    Raises ImageError for a missing file or one whose header cannot be read.
    """
    if not Path(path).is_file():
        raise ImageError(MISSING_IMAGE, path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            # 5..8 are the transposed orientations: OpenCV's decoder returns them rotated by 90 degrees
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(UNREADABLE_IMAGE, path, str(e)) from None
    return w, h


class AnnotationChecks:
    """Applies ``on_bad_sample`` to annotation problems and counts every kind met.

    Args:
        on_bad_sample: 'skip' (warn on one line, count, go on) or 'raise' (BadSampleError).
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.
        max_warnings: warning lines per kind before the rest are only counted (a dataset whose
            boxes all poke out of the image would otherwise print one line per box); None: all.

    Attributes:
        skips: what was dropped, by kind (the source's ``skips``; train.py prints its summary).
        audit: every kind met, including the ones that are only clipped (read by data.check).
    """

    def __init__(self, on_bad_sample: str = "skip", min_box_size: float = 1.0, max_warnings: int | None = 100) -> None:
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.min_box_size = float(min_box_size)
        self.skips = SkipCounter()
        self.audit: Counter[str] = Counter()
        self.max_warnings = max_warnings
        self._warned: Counter[str] = Counter()

    def bad(self, kind: str, where: str, detail: str = "", count: int = 1) -> None:
        """Report ``count`` dropped things of ``kind`` at ``where`` (a file, or a box in a file)."""
        if self.on_bad_sample == "raise":
            raise BadSampleError(f"{where}: {kind}" + (f" ({detail})" if detail else ""))
        self.audit[kind] += count
        self.skips.counts[kind] += count
        self._warn(kind, "skipped %s%s: %s%s", f"{count} x " if count > 1 else "", where, kind,
                   f" ({detail})" if detail else "")

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """One warning line, up to ``max_warnings`` per kind; the counts keep counting after that."""
        self._warned[kind] += 1
        if self.max_warnings is None or self._warned[kind] <= self.max_warnings:
            log.warning(message, *args)
        elif self._warned[kind] == self.max_warnings + 1:
            log.warning("more of '%s' not shown one by one (all are counted; python -m detectors.data.check "
                        "lists every one)", kind)

    def finish(self, records: list[Record]) -> list[Record]:
        """Clip the records' boxes to their images and drop the ones that cannot be trained on.

        A box with x2 <= x1 or y2 <= y1 (or a non-finite coordinate) encodes to log(0) in every
        head's regression target; one wholly outside the image has nothing to look at. Both are
        dropped (or raise), as are boxes under ``min_box_size`` pixels after clipping. All boxes of
        the split are checked in one pass (per-record numpy calls cost seconds on COCO).

        Each record keeps the boxes as the file gave them in ``ground_truth``, which evaluation
        scores (pycocotools and the VOC devkit count degenerate, tiny and outside boxes too).
        """
        counts = [len(r.boxes) for r in records]
        if not sum(counts):
            return records
        starts = np.cumsum([0, *counts])
        raw = np.concatenate([r.boxes for r in records]).astype(np.float64)
        finite = np.isfinite(raw).all(axis=1)
        area = box_area(raw)  # the source's own area (COCO's mask area) replaces it where there is one
        for k, r in enumerate(records):  # what evaluation scores: the file's boxes (a NaN cannot be scored)
            sl = slice(starts[k], starts[k + 1])
            if r.area is not None:
                area[sl] = r.area
            ok = finite[sl]
            r.ground_truth = GroundTruth(raw[sl][ok], r.labels[ok], r.difficult[ok], r.iscrowd[ok], area[sl][ok])
        size = np.repeat(np.array([[r.width, r.height] for r in records], dtype=np.float64), counts, axis=0)
        b = np.where(finite[:, None], raw, 0.0)
        degenerate = ~finite | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        c = np.clip(b, 0, np.tile(size, 2))
        cw, ch = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
        outside = ~degenerate & ((cw <= 0) | (ch <= 0))
        tiny = ~degenerate & ~outside & ((cw < self.min_box_size) | (ch < self.min_box_size))
        moved = np.abs(c - b).max(axis=1)
        clipped = ~degenerate & ~outside & (moved > 0)
        owner = np.repeat(np.arange(len(records)), counts)
        for i in np.flatnonzero(degenerate | outside | tiny):
            r = records[owner[i]]
            kind = DEGENERATE if degenerate[i] else OUTSIDE if outside[i] else TINY
            self.bad(kind, f"box {r.boxes[i - starts[owner[i]]].tolist()} in {r.file}", f"image {r.width}x{r.height}")
        self.audit[CLIPPED] += int(clipped.sum())
        for i in np.flatnonzero(clipped & (moved > CLIP_WARN_PX)):
            r = records[owner[i]]
            self._warn(CLIPPED, "clipped box %s in %s to the %dx%d image",
                       r.boxes[i - starts[owner[i]]].tolist(), r.file, r.width, r.height)
        keep = ~(degenerate | outside | tiny)
        c = c.astype(np.float32)
        for k, r in enumerate(records):
            if counts[k]:
                sl = slice(starts[k], starts[k + 1])
                kept = keep[sl]
                r.boxes, r.labels, r.difficult = c[sl][kept], r.labels[kept], r.difficult[kept]
                r.iscrowd = r.iscrowd[kept]
                if r.area is not None:
                    r.area = r.area[kept]
        return records
