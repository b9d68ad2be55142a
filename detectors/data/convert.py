"""Convert a dataset between VOC, COCO and YOLO txt, box-exactly.

    python -m detectors.data.convert --from voc --to coco SRC DST [--split train=trainval --split test]
    python -m detectors.data.convert --from voc --to yolo VOC2007 VOC2012 DST     (several VOC roots)
    python -m detectors.data.convert --from yolo --to voc SRC DST --classes cat dog

The source is read by the same loader training uses (``data.formats``), so the output holds
what training would see: degenerate boxes, boxes outside the image and objects of unknown
classes are dropped (each named on one line, counted in the summary), boxes partly outside are
clipped, images without objects are kept, images whose file is missing are left out.

Pixel conventions (see each format's module): records hold continuous xyxy pixel coordinates,
0-based, pixel i spanning [i, i+1). VOC's xml is 1-based and inclusive, so it reads as
[xmin - 1, ymin - 1, xmax, ymax] and is written back as xmin = x1 + 1, xmax = x2 (VOC's
xmin=1, xmax=10 is COCO's x=0, w=10: w = xmax - xmin + 1, as the common VOC -> COCO converters
give); COCO's bbox is [x1, y1, x2 - x1, y2 - y1]; YOLO's centres and sizes are divided by the
image size. Writers print numbers so that reading them back gives the same float32 boxes, so
any A -> B -> A round trip is exact. What a format cannot hold is lost: YOLO has no difficult
flag (``--drop-difficult`` leaves those objects out, as Ultralytics' VOC script does; by default
they become ordinary boxes), COCO crowd regions become difficult objects, and COCO
segmentation masks are not carried.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from detectors.data.formats.coco import COCOSource, write_coco
from detectors.data.formats.voc import VOCSource, write_voc
from detectors.data.formats.yolo import YOLOSource, write_yolo
from detectors.data.records import Record, Source

log = logging.getLogger(__name__)

FORMATS = ("voc", "coco", "yolo")
DEFAULT_SPLITS = ("train", "val", "test")


def open_source(
    fmt: str,
    roots: Sequence[str | Path],
    splits: dict[str, str],
    classes: Sequence[str] | None = None,
    on_bad_sample: str = "skip",
) -> Source:
    """The loader of ``fmt`` over ``roots`` (several only for VOC), with ``splits`` name -> source name."""
    if fmt == "voc":
        return VOCSource(roots, classes=classes, splits=splits, on_bad_sample=on_bad_sample)
    if len(roots) != 1:
        raise ValueError(f"only VOC reads several roots at once, got {len(roots)} for {fmt}")
    if fmt == "coco":
        return COCOSource(roots[0], splits=splits, classes=classes, on_bad_sample=on_bad_sample)
    if fmt == "yolo":
        return YOLOSource(roots[0], classes=classes, splits=splits, on_bad_sample=on_bad_sample)
    raise ValueError(f"unknown format {fmt!r} (have {', '.join(FORMATS)})")


class ImagePlacer:
    """Puts each source image into a destination folder once, under a name unique in that folder.

    mode: 'copy', 'symlink' (absolute links, nothing copied) or 'hardlink' (falls back to a copy
    across file systems). Two different images with one base name get ``name_1.jpg`` and so on; so do
    two whose names differ only in the suffix (``a.jpg``, ``a.png``): VOC's annotation and YOLO's label
    file are named by the stem, and would overwrite each other.
    """

    def __init__(self, mode: str = "copy") -> None:
        if mode not in ("copy", "symlink", "hardlink"):
            raise ValueError(f"images mode must be copy, symlink or hardlink, got {mode!r}")
        self.mode = mode
        self._placed: dict[tuple[Path, Path], str] = {}
        self._taken: dict[Path, set[str]] = {}

    def __call__(self, record: Record, folder: Path) -> str:
        src = Path(record.file).resolve()
        if (folder, src) in self._placed:
            return self._placed[(folder, src)]
        taken = self._taken.setdefault(folder, set())
        name, k = src.name, 0
        while Path(name).stem.lower() in taken:  # case-insensitive: the result may land on such a file system
            k += 1
            name = f"{src.stem}_{k}{src.suffix}"
        taken.add(Path(name).stem.lower())
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if self.mode == "symlink":
            target.symlink_to(src)
        elif self.mode == "hardlink":
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
        else:
            shutil.copy2(src, target)
        self._placed[(folder, src)] = name
        return name


def convert(
    src: Sequence[str | Path],
    dst: str | Path,
    src_format: str,
    dst_format: str,
    splits: dict[str, str] | None = None,
    classes: Sequence[str] | None = None,
    images: str = "copy",
    drop_difficult: bool = False,
    on_bad_sample: str = "skip",
    overwrite: bool = False,
) -> dict:
    """Read ``src`` as ``src_format`` and write it to ``dst`` as ``dst_format``.

    splits: output split name -> the source's name for it (image set, COCO split name, YOLO
        folder); None converts whichever of train/val/test the source has.
    Returns a summary: {'splits': {name: {'images', 'boxes'}}, 'skipped': {reason: n},
    'missing_images': n, 'dropped_difficult': n, 'difficult_as_boxes': n, 'classes': [...]}.
    """
    if dst_format not in FORMATS:
        raise ValueError(f"unknown format {dst_format!r} (have {', '.join(FORMATS)})")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to write into it)")
    roots = [Path(s) for s in src]
    if any(dst.resolve() == r.resolve() for r in roots):
        raise ValueError("the destination is the source folder")
    explicit = splits is not None
    splits = dict(splits) if explicit else {s: s for s in DEFAULT_SPLITS}
    source = open_source(src_format, roots, splits, classes, on_bad_sample)
    read: dict[str, list[Record]] = {}
    for split in splits:
        try:
            read[split] = source.records(split)
        except FileNotFoundError as e:
            if explicit:
                raise
            log.info("no %s split: %s", split, e)
    if not read:
        raise FileNotFoundError(f"none of the splits {list(splits)} found in {', '.join(map(str, roots))}")
    missing = 0
    for split, records in read.items():
        present = [r for r in records if Path(r.file).is_file()]
        for r in records:
            if not Path(r.file).is_file():
                log.warning("skipped %s: missing image file", r.file)
        missing += len(records) - len(present)
        read[split] = present

    place = ImagePlacer(images)
    dst.mkdir(parents=True, exist_ok=True)
    dropped = 0
    if dst_format == "voc":
        write_voc(dst, read, source.classes, place)
    elif dst_format == "coco":
        write_coco(dst, read, source.classes, place, getattr(source, "category_ids", None))
    else:
        dropped = write_yolo(dst, read, source.classes, place, drop_difficult=drop_difficult)
    return {
        "classes": list(source.classes),
        "splits": {s: {"images": len(r), "boxes": sum(len(x.labels) for x in r)} for s, r in read.items()},
        "skipped": dict(source.skips.counts),
        "missing_images": missing,
        "dropped_difficult": dropped,
        # YOLO has no difficult flag: without --drop-difficult they become ordinary boxes
        "difficult_as_boxes": 0 if dst_format != "yolo" or drop_difficult else
        sum(int(r.difficult.sum()) for rs in read.values() for r in rs),
    }


def parse_splits(values: Sequence[str] | None) -> dict[str, str] | None:
    """['train=trainval', 'test'] -> {'train': 'trainval', 'test': 'test'}."""
    if not values:
        return None
    return dict((v.split("=", 1) if "=" in v else (v, v)) for v in values)  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detectors.data.convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS)
    parser.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="SRC [SRC ...] DST: source root(s), then the output folder")
    parser.add_argument("--split", action="append", metavar="NAME[=SOURCE_NAME]",
                        help="a split to convert, e.g. train=trainval (repeat; default: train, val, test if present)")
    parser.add_argument("--classes", nargs="+", help="class names in label order (default: from the source)")
    parser.add_argument("--images", default="copy", choices=("copy", "symlink", "hardlink"))
    parser.add_argument("--drop-difficult", action="store_true", help="leave difficult objects out of YOLO output")
    parser.add_argument("--on-bad-sample", default="skip", choices=("skip", "raise"))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give at least one source root and the output folder")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = convert(
            args.paths[:-1], args.paths[-1], args.src_format, args.dst_format, parse_splits(args.split), args.classes,
            args.images, args.drop_difficult, args.on_bad_sample, args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:  # BadSampleError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.src_format} -> {args.dst_format}: {args.paths[-1]}, classes {summary['classes']}")
    for split, n in summary["splits"].items():
        print(f"  {split}: {n['images']} images, {n['boxes']} boxes")
    print("  skipped: " + (", ".join(f"{n} {k}" for k, n in sorted(summary["skipped"].items())) or "nothing"))
    if summary["missing_images"]:
        print(f"  left out: {summary['missing_images']} images whose file is missing")
    if summary["difficult_as_boxes"]:
        print(f"  note: {summary['difficult_as_boxes']} difficult objects written as ordinary boxes (YOLO has no "
              "difficult flag; --drop-difficult leaves them out)")
    if summary["dropped_difficult"]:
        print(f"  left out: {summary['dropped_difficult']} difficult objects (--drop-difficult)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
