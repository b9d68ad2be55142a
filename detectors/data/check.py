"""Audit a dataset before training, with the data config train.py would use.

    python -m detectors.data.check data=voc data.root=PATH [data.splits=...] [--no-decode] [--workers N]
    python -m detectors.data.check experiment=ssd300_bccd

The overrides are composed with ``configs/train.yaml`` exactly as train.py composes them, and the
data module is built the same way, so the audit reads what training would read. It prints, per
split: images, empty images, boxes per class, difficult and small boxes, every annotation
problem the loader meets (degenerate, out-of-image and tiny boxes, unknown classes, malformed
files, annotations of unknown images) and every image that cannot be decoded, is missing or
has another size than its annotation says; and next to each, what training will do about it
(keep, clip, drop, skip, or error with ``data.on_bad_sample=raise``). Each problem is also named
on its own warning line. Boxes are judged as the loader reads them, continuous and 0-based
(``formats.voc``: a VOC box with xmin == xmax is one pixel wide, degenerate only when
xmax < xmin; xmin = 0 starts a pixel outside the image and is clipped). Exit status 1 when
training with this config would stop (a missing split, or a problem under
``on_bad_sample=raise``), 0 otherwise.

Beside the report (``report.txt``), in ``--out`` (default ``logs/data_check/<time>``), it draws the
training split's boxes as training maps them to the model's input (stretched, or letterboxed under
the 'yolo' augment preset; ``detectors.data.views``): ``class_counts.png``, ``box_shapes.png`` (widths,
heights, aspect ratios, the YOLO anchors on the (w, h) density), ``box_centres.png``,
``boxes_per_image.png``; and measures how the model's anchors fit them (``detectors.anchors.fit``: the
share of boxes whose best anchor IoU is >= 0.5 and the mean best IoU, overall and per class, also in
``anchor_fit.csv``), with the k-means command to run when the share is low. ``--no-views`` skips both.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from torch import Tensor

from detectors.data.formats import common as C
from detectors.data.formats.yolo import NO_LABEL_FILE
from detectors.data.records import BadSampleError, Record, Source

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# kind -> (what happens with on_bad_sample=skip, with raise); rows of the report, in this order
BOX_POLICY = {
    C.DEGENERATE: ("drop", "error"),
    C.OUTSIDE: ("drop", "error"),
    C.CLIPPED: ("clip", "clip"),
    C.TINY: ("drop", "error"),
    C.UNKNOWN_CLASS: ("drop", "error"),
    C.UNKNOWN_IMAGE: ("drop", "error"),
}
IMAGE_POLICY = {
    C.MALFORMED: ("skip image", "error"),
    C.MISSING_ANNOTATION: ("skip image", "error"),
    NO_LABEL_FILE: ("keep (background)", "keep (background)"),
    C.MISSING_IMAGE: ("skip image", "error"),
    C.UNREADABLE_IMAGE: ("skip image", "error"),
    C.TRUNCATED_IMAGE: ("skip image", "error"),
    C.SIZE_MISMATCH: ("skip image", "error"),
}


@dataclass
class SplitAudit:
    """What one split holds and what is wrong with it."""

    images: int = 0
    empty: int = 0
    boxes_per_class: list[int] = field(default_factory=list)
    difficult: int = 0
    small: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # kind -> count
    error: str | None = None  # the split cannot be read at all


def check_image(source: Source, record: Record, decode: bool) -> str | None:
    """The problem kind of ``record``'s image, or None; logs one warning line naming the file."""
    try:
        if decode or not Path(record.file).exists():
            source.load(record)
        else:  # the header alone: finds missing and unreadable files and wrong sizes, not truncation
            size = C.image_size(record.file)
            if size != (record.width, record.height):
                raise C.ImageError(C.SIZE_MISMATCH, record.file,
                                   f"{size[0]}x{size[1]} pixels, annotation says {record.width}x{record.height}")
    except BadSampleError as e:
        log.warning("%s", e)
        return getattr(e, "kind", C.UNREADABLE_IMAGE)
    return None


def audit_split(
    source: Source, split: str, input_size: Sequence[int], decode: bool = True, workers: int = 1, small_px: float = 8.0
) -> SplitAudit:
    """Read ``split`` through the source and open every image (``decode``: fully, else the header)."""
    out = SplitAudit(boxes_per_class=[0] * len(source.classes))
    checks = getattr(source, "checks", None)
    before = Counter(checks.audit) if checks is not None else Counter()
    try:
        records = source.records(split)
    except (FileNotFoundError, KeyError, ValueError) as e:
        out.error = str(e).strip("'\"")
        return out
    if checks is not None:
        out.problems = Counter(checks.audit) - before
    out.images = len(records)
    out.empty = sum(len(r.labels) == 0 for r in records)
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.int64)
    out.boxes_per_class = np.bincount(labels, minlength=len(source.classes)).tolist()
    out.difficult = int(sum(r.difficult.sum() for r in records))
    # a box's sides once the image is resized to the network input (what the head has to find)
    in_h, in_w = float(input_size[0]), float(input_size[1])
    for r in records:
        sides = (r.boxes[:, 2:] - r.boxes[:, :2]) * np.array([in_w / r.width, in_h / r.height], dtype=np.float32)
        out.small += int((sides.min(axis=1, initial=np.inf) < small_px).sum()) if len(sides) else 0
    with ThreadPoolExecutor(max(1, workers)) as pool:  # OpenCV and file reads release the GIL
        kinds = list(pool.map(lambda r: check_image(source, r, decode), records))
    out.problems.update(k for k in kinds if k is not None)
    return out


def would_stop(audits: dict[str, SplitAudit], on_bad_sample: str, required: Sequence[str]) -> list[str]:
    """Why training with this config would stop, one reason a line (empty: it would not)."""
    reasons = [f"split {s!r}: {a.error}" for s, a in audits.items() if a.error and s in required]
    if on_bad_sample == "raise":
        policies = {**BOX_POLICY, **IMAGE_POLICY}
        total = sum((a.problems for a in audits.values()), Counter())
        reasons += [f"{n} x {k} with on_bad_sample=raise" for k, n in total.items()
                    if n and policies.get(k, ("", "error"))[1] == "error"]
    return reasons


def format_report(
    audits: dict[str, SplitAudit], classes: Sequence[str], on_bad_sample: str, header: str, small_px: float,
    input_size: Sequence[int],
) -> str:
    """A table: one column per split, one row per count, and the policy that applies to each."""
    splits = list(audits)
    col = max(8, *(len(s) + 1 for s in splits))
    name_w = max(len(k) for k in (*BOX_POLICY, *IMAGE_POLICY, *classes)) + 4
    policy_of = {k: v[on_bad_sample == "raise"] for k, v in {**BOX_POLICY, **IMAGE_POLICY}.items()}
    lines = [header, f"classes ({len(classes)}): {', '.join(classes)}", f"on_bad_sample={on_bad_sample}", ""]

    def row(name: str, values: Sequence[object], policy: str = "") -> None:
        cells = "".join(f"{v!s:>{col}}" for v in values)
        lines.append(f"{name[:name_w]:<{name_w}}{cells}   {policy}".rstrip())

    row("", splits, "policy")
    ok = [s for s in splits if audits[s].error is None]
    get = lambda fn: [fn(audits[s]) if audits[s].error is None else "-" for s in splits]  # noqa: E731
    row("images", get(lambda a: a.images))
    row("  empty (no objects)", get(lambda a: a.empty), "keep (background)")
    for kind in IMAGE_POLICY:
        if kind != NO_LABEL_FILE or any(audits[s].problems[kind] for s in ok):
            row(f"  {kind}", get(lambda a: a.problems[kind]), policy_of[kind])
    row("boxes", get(lambda a: sum(a.boxes_per_class)))
    for i, name in enumerate(classes):
        row(f"  {name}", get(lambda a: a.boxes_per_class[i]))
    row("  difficult / crowd", get(lambda a: a.difficult), "keep: evaluation only")
    row(f"  small at input {input_size[1]}x{input_size[0]} (side < {small_px:g} px)", get(lambda a: a.small), "keep")
    row("boxes left out or changed while reading", [""] * len(splits))
    for kind in BOX_POLICY:
        row(f"  {kind}", get(lambda a: a.problems[kind]), policy_of[kind])
    others = sorted({k for s in ok for k in audits[s].problems} - set(policy_of))
    for kind in others:
        row(f"  {kind}", get(lambda a: a.problems[kind]), "skip" if on_bad_sample == "skip" else "error")
    for s in splits:
        if audits[s].error:
            lines.append(f"split {s!r} cannot be read: {audits[s].error}")
    return "\n".join(lines)


# below this share of boxes with a best anchor IoU >= 0.5 the report suggests k-means (AutoAnchor's 0.98)
LOW_FIT_SHARE = 0.98


def view_training_boxes(cfg: DictConfig, datamodule, out_dir: Path, overrides: Sequence[str],
                        threshold: float = 0.5) -> list[str]:
    """The training split's pictures (``detectors.data.views``) and the fit of the model's anchors to its
    boxes (``anchor_fit.csv``) into ``out_dir``; returns the report's lines about them."""
    from detectors.anchors.fit import SHAPE, anchor_boxes, box_fit, shape_fit
    from detectors.data.views import write_views
    from detectors.data.training_boxes import boxes_at_input, training_records, training_resize

    records, _ = training_records(datamodule.source)
    input_size = list(datamodule.input_size)
    preset, letterbox, min_box_size = training_resize(datamodule)
    boxes, labels, image, _ = boxes_at_input(records, input_size, letterbox, min_box_size)
    classes = list(datamodule.classes)
    height, width = input_size
    lines = [f"training boxes at the {width}x{height} input ({'letterbox' if letterbox else 'stretch'}, augment "
             f"preset {preset!r}): {len(boxes)} boxes of {len(records)} images (difficult, crowd and boxes under "
             f"{min_box_size:g} px left out as training leaves them)"]
    with open_dict(cfg):
        cfg.data.classes = classes
        if "weights" in cfg.get("backbone", {}):
            cfg.backbone.weights = None  # the anchors do not depend on the weights: build without loading any
    detector = hydra.utils.instantiate(cfg.model.detector)
    made = anchor_boxes(detector, input_size)
    head = type(detector.head).__name__
    write_views(out_dir, boxes, labels, image, len(records), classes, input_size,
                made[1] if made is not None and made[0] == SHAPE else None)
    if made is None or not len(boxes):
        lines.append(f"anchor fit: {'no training boxes' if made else f'{head} has no anchors or priors'} "
                     "(no anchor_fit.csv)")
        return lines
    kind, anchors = made

    def fit(sel: slice | Tensor = slice(None)):
        return (shape_fit(boxes[sel][:, 2:] - boxes[sel][:, :2], anchors, threshold) if kind == SHAPE
                else box_fit(boxes[sel], anchors, threshold))

    overall = fit()
    per_class = [fit(labels == c) for c in range(len(classes))]
    noun = "priors" if hasattr(detector.head, "priors") else "anchors"
    what = (f"{len(anchors)} anchors by shape, centres aligned as YOLO assigns" if kind == SHAPE
            else f"{len(anchors)} {noun} where the grid places them at {width}x{height}")
    lines.append(f"anchor fit of {head} ({what}): {overall.share:.1%} of {overall.num_boxes} boxes have a best "
                 f"IoU >= {threshold:g}, mean best IoU {overall.mean_iou:.3f}")
    for name, f in zip(classes, per_class):
        if f.num_boxes:
            lines.append(f"  {name}: {f.share:.1%} of {f.num_boxes}, mean best IoU {f.mean_iou:.3f}")
    with open(out_dir / "anchor_fit.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["class", "boxes", f"share_best_iou_ge_{threshold:g}", "mean_best_iou", "head", "kind",
                         "anchors", "input_h", "input_w"])
        for name, f in [("all", overall), *zip(classes, per_class)]:
            writer.writerow([name, f.num_boxes, f"{f.share:.6f}", f"{f.mean_iou:.6f}", head, kind, len(anchors),
                             height, width])
    if getattr(detector.head, "auto_anchors", None) is not None:  # head.anchors=auto: the fit above is the defaults'
        lines.append(f"head.anchors=auto: training refits these default anchors by k-means when under "
                     f"{detector.head.auto_anchors['threshold']:.0%} of the boxes reach IoU "
                     f"{detector.head.auto_anchors['iou']:g}, and keeps the better fit (its log says which)")
    elif overall.num_boxes and overall.share < LOW_FIT_SHARE:
        data_args = " ".join(shlex.quote(o) for o in overrides if not o.startswith("head.anchors")) or "data=..."
        k = len(anchors) if kind == SHAPE else 9
        command = f"python -m detectors.anchors kmeans {data_args} k={k}"
        if kind == SHAPE:
            lines.append(f"the anchors fit under {LOW_FIT_SHARE:.0%} of the boxes: cluster new ones with\n  "
                         f"{command}\nand pass its head.anchors=... override to train.py")
        else:
            sizes = "head.priors' scales" if noun == "priors" else "head.anchor_sizes and head.aspect_ratios"
            lines.append(f"the {noun} fit under {LOW_FIT_SHARE:.0%} of the boxes: their sizes ({sizes}) miss some "
                         f"box shapes; the shapes' clusters to choose them from:\n  {command}")
    return lines


def compose_config(overrides: Sequence[str], config_dir: Path = CONFIGS) -> DictConfig:
    """configs/train.yaml with train.py's overrides (data=..., data.root=..., experiment=...)."""
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3", job_name="check"):
        return compose("train", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detectors.data.check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py: data=voc data.root=PATH ...")
    parser.add_argument("--splits", nargs="+", help="splits to audit (default: the data config's, or train val test)")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="read image headers only (fast; misses truncated files)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads that open images")
    parser.add_argument("--small", type=float, default=8.0, help="report boxes under this many px at the input size")
    parser.add_argument("--config-dir", type=Path, default=CONFIGS)
    parser.add_argument("--out", type=Path, help="folder of the report and pictures (default logs/data_check/<time>)")
    parser.add_argument("--no-views", dest="views", action="store_false",
                        help="the text report only: no pictures, no anchor fit (no model is built)")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    cfg = compose_config(args.overrides, args.config_dir)
    on_bad_sample = str(cfg.data.get("on_bad_sample", "skip"))
    with open_dict(cfg):
        cfg.data.on_bad_sample = "skip"  # count every problem; the report says what 'raise' would do
    try:
        datamodule = hydra.utils.instantiate(cfg.data)
    except Exception as e:  # Hydra wraps the source's error; its message says what was looked for
        print(f"cannot open the dataset: {e}")
        return 1
    source = datamodule.source
    if getattr(source, "checks", None) is not None:
        source.checks.max_warnings = None  # the audit names every problem
    splits = args.splits or list(cfg.data.get("splits") or ("train", "val", "test"))
    input_size = list(cfg.data.get("input_size") or cfg.input_size)
    audits = {s: audit_split(source, s, input_size, args.decode, args.workers, args.small) for s in splits}
    root = cfg.data.get("root")
    header = f"dataset audit: {type(source).__name__}" + (f", data.root={root}" if root is not None else "")
    report = [format_report(audits, source.classes, on_bad_sample, header, args.small, input_size)]
    required = ["train", "val", *(["test"] if cfg.get("test") else [])]
    reasons = would_stop(audits, on_bad_sample, required)
    if reasons:
        report.append("training with this config would stop:\n  " + "\n  ".join(reasons))
    else:
        dropped = sum(sum(n for k, n in a.problems.items() if k != C.CLIPPED and k != NO_LABEL_FILE)
                      for a in audits.values())
        left_out = f"; it leaves out {dropped} boxes or images (above)" if dropped else ""
        report.append(f"training with this config would run{left_out}")
    print("\n".join(report))
    if args.views and "train" in audits and audits["train"].error is None:
        out = args.out or Path(cfg.paths.log_dir) / "data_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        try:
            lines = view_training_boxes(cfg, datamodule, out, args.overrides)
        except Exception as e:  # noqa: BLE001 (the audit above stands; say what the views could not do)
            lines = [f"no pictures or anchor fit: {type(e).__name__}: {e}"]
        lines.append(f"wrote the report and pictures to {out}")
        print("\n".join(lines))
        (out / "report.txt").write_text("\n".join(report + lines) + "\n")
    elif args.views:
        print("no pictures or anchor fit: they describe the train split, which was not read")
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
