"""COCO layout: one annotation JSON and one image folder per split, indexed by pycocotools.

Default layout under ``root`` (what ``python -m detectors.data.convert --to coco`` writes, and
COCO 2017's with ``splits={train: train2017, val: val2017}``)::

    annotations/instances_<name>.json   <name>/<file_name>

Pixel convention: ``bbox`` is [x, y, w, h] in continuous pixel coordinates; the record's box is
[x, y, x + w, y + h] and nothing else (no +-1). A VOC xml box becomes [xmin - 1, ymin - 1, xmax,
ymax] (see ``formats.voc``), so COCO's w = xmax - xmin + 1, as the common VOC -> COCO converters
write it. Category ids map to contiguous labels in ``category_ids`` order (sorted
by id when the class names come from the file) and back through that list: result files
(``detectors.evaluation.results``, which reads ``category_ids``) carry the dataset's own ids.

Evaluation scores every annotation of the file with its own ``area`` (the mask area, which
decides COCO's small/medium/large) and crowd flag, degenerate and tiny boxes included, as
pycocotools does against the same file (``Record.ground_truth``); training drops or clips those.

``iscrowd`` regions (and objects an extra ``"difficult": 1`` key marks, as ``write_coco``
writes VOC's difficult flag) are kept as ``difficult``: heads neither train on them as
positives nor mine them as negatives, and VOC AP ignores them. Crowd regions also keep
``iscrowd``, which reaches the COCO metric, so COCO AP scores them as pycocotools does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detectors.data.formats.common import (
    MALFORMED,
    UNKNOWN_CLASS,
    UNKNOWN_IMAGE,
    AnnotationChecks,
    ImageError,
    image_size,
    read_image,
)
from detectors.data.records import BadSampleError, Record

log = logging.getLogger(__name__)

SplitPaths = str | Mapping[str, str]


def _number(x: Any) -> bool:
    # type(), not isinstance(x, numbers.Real): the ABC check costs seconds over COCO's 3.4M coordinates
    return type(x) in (int, float) and math.isfinite(x)


def split_paths(root: Path, spec: SplitPaths) -> tuple[Path, Path]:
    """(annotation file, image folder) of a split given as ``spec`` (see ``COCOSource``'s ``splits``)."""
    if isinstance(spec, str):
        return root / "annotations" / f"instances_{spec}.json", root / spec
    return root / spec["annotations"], root / spec["images"]


class COCOSource:
    """A COCO-format dataset, one pycocotools ``COCO`` per split.

    Args:
        root: dataset folder; annotation and image paths are relative to it.
        splits: our split name -> either a name ``N`` (annotations/instances_N.json and images
            in N/) or ``{annotations: PATH.json, images: FOLDER}``.
        classes: class names in label order (a subset of the categories is fine; other
            categories' annotations are dropped and counted); None takes every category of the
            first split's file, ordered by category id.
        on_bad_sample: 'skip' or 'raise'; see ``formats.common``. A file that is not JSON, or
            not COCO's structure, fails at start whatever this says.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.

    Attributes:
        classes: names in label order.
        category_ids: the COCO category id of each label (what result files must carry).
        Record.image_id is the COCO image id.
    """

    def __init__(
        self,
        root: str | Path,
        splits: Mapping[str, SplitPaths] | None = None,
        classes: Sequence[str] | None = None,
        on_bad_sample: str = "skip",
        min_box_size: float = 1.0,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO root {self.root} not found (set data.root=...); expected "
                                    "annotations/instances_<split>.json and an image folder per split")
        self.splits = {k: (v if isinstance(v, str) else dict(v)) for k, v in (splits or
                       {"train": "train", "val": "val", "test": "test"}).items()}
        self.checks = AnnotationChecks(on_bad_sample, min_box_size)
        self.skips = self.checks.skips
        self._cocos: dict[str, COCO] = {}
        self._problems: dict[str, list[tuple[str, str, str]]] = {}
        # the first split whose file exists names the categories; the others must agree
        existing = [s for s in self.splits if self.paths(s)[0].is_file()]
        if not existing:
            looked = ", ".join(str(self.paths(s)[0]) for s in self.splits)
            raise FileNotFoundError(f"no COCO annotation file found under {self.root}; looked for: {looked}")
        cats = sorted(self.coco(existing[0]).dataset["categories"], key=lambda c: c["id"])
        by_name = {c["name"]: c["id"] for c in cats}
        if classes:
            missing = [n for n in classes if n not in by_name]
            if missing:
                raise ValueError(f"classes {missing} are not categories of {self.paths(existing[0])[0]} "
                                 f"(have {list(by_name)})")
            self.classes = list(classes)
        else:
            self.classes = [c["name"] for c in cats]
            log.info("classes read from the categories of %s: %s", self.paths(existing[0])[0], self.classes)
        self.category_ids = [int(by_name[n]) for n in self.classes]

    def paths(self, split: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of ``split``."""
        if split not in self.splits:
            raise KeyError(f"no COCO files configured for split {split!r} (have {sorted(self.splits)})")
        return split_paths(self.root, self.splits[split])

    def coco(self, split: str) -> COCO:
        """The split's pycocotools index, holding only the entries that passed validation.

        Entries it left out are reported (skip or raise) by ``records(split)``.
        """
        if split not in self._cocos:
            path = self.paths(split)[0]
            if not path.is_file():
                raise FileNotFoundError(f"COCO annotation file {path} not found for split {split!r}")
            try:
                data = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSampleError(f"{path}: malformed JSON ({e})") from None
            dataset, self._problems[split] = _validate(data, path)
            coco = COCO()
            coco.dataset = dataset
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
            self._cocos[split] = coco
        return self._cocos[split]

    def records(self, split: str) -> list[Record]:
        coco = self.coco(split)
        ann_path, image_dir = self.paths(split)
        for kind, where, detail in self._problems.pop(split, []):
            self.checks.bad(kind, where, detail)
        by_id = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        for name, cat_id in zip(self.classes, self.category_ids):
            if by_id.get(cat_id) != name:
                raise ValueError(f"{ann_path} gives category id {cat_id} the name {by_id.get(cat_id)!r}, "
                                 f"another split's file {name!r}: the splits must share one category list")
        if not coco.imgs:
            raise ValueError(f"split {split!r}: {ann_path} lists no images")
        # every annotation as one array row, grouped by image below (a Python loop per box costs
        # seconds on COCO's 860k boxes)
        anns = coco.dataset["annotations"]
        image_ids = sorted(coco.imgs)
        row_of = {image_id: k for k, image_id in enumerate(image_ids)}
        label_of = {c: i for i, c in enumerate(self.category_ids)}
        cats = np.array([a["category_id"] for a in anns], dtype=np.int64)
        labels = np.array([label_of.get(c, -1) for c in cats.tolist()], dtype=np.int64)
        owner = np.array([row_of[a["image_id"]] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # the mask area decides small/medium/large in COCOeval; files without one get the box area
        area = np.array([a["area"] if _number(a.get("area")) else w * h for a, (w, h) in zip(anns, xywh[:, 2:].tolist())],
                        dtype=np.float64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        hard = crowd | np.array([bool(a.get("difficult", 0)) for a in anns], dtype=bool)
        for cat_id, n in sorted(Counter(cats[labels < 0].tolist()).items()):  # one line per category
            self.checks.bad(UNKNOWN_CLASS, f"annotations of category {cat_id} ({by_id[cat_id]!r}) in {ann_path}",
                            count=n)
        known = np.flatnonzero(labels >= 0)
        idx = known[np.argsort(owner[known], kind="stable")]  # by image, file order inside an image
        bounds = np.searchsorted(owner[idx], np.arange(len(image_ids) + 1))
        records = []
        for k, image_id in enumerate(image_ids):
            img = coco.imgs[image_id]
            path = image_dir / img["file_name"]
            width, height = img.get("width"), img.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                try:  # some tools leave the size out; the header has it
                    width, height = image_size(path)
                except ImageError as e:
                    self.checks.bad(MALFORMED, f"image {image_id} in {ann_path}", f"no size, and {e}")
                    continue
            rows = idx[bounds[k]:bounds[k + 1]]
            records.append(Record(int(image_id), str(path), width, height, xyxy[rows], labels[rows], hard[rows],
                                  crowd[rows], area[rows]))
        records = self.checks.finish(records)
        if not records:
            raise ValueError(f"split {split!r} of {ann_path} has no usable images")
        return records

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        return read_image(record.file, (record.width, record.height)), record


def _validate(data: Any, path: Path) -> tuple[dict, list[tuple[str, str, str]]]:
    """Keep the entries pycocotools and the loader can use; list the others as (kind, where, detail).

    Raises BadSampleError when the file is not COCO-shaped at all (no images/categories lists,
    categories without an integer id and a name): nothing of it could be used.
    """
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise BadSampleError(f"{path}: not a COCO annotation file (needs 'images', 'annotations' and 'categories' lists)")
    cats = data["categories"]
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in cats):
        raise BadSampleError(f"{path}: malformed categories (each needs an integer 'id' and a 'name')")
    names = [c["name"] for c in cats]
    if len(set(names)) < len(names) or len({c["id"] for c in cats}) < len(cats):
        raise BadSampleError(f"{path}: duplicate category names or ids in {names}")
    problems: list[tuple[str, str, str]] = []
    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)):
            problems.append((MALFORMED, f"images[{k}] in {path}", "needs an integer 'id' and a 'file_name'"))
        elif img["id"] in images:
            problems.append((MALFORMED, f"images[{k}] in {path}", f"duplicate image id {img['id']}"))
        else:
            images[img["id"]] = img
    cat_ids = {c["id"] for c in cats}
    anns, used_ids = [], {a.get("id") for a in data.get("annotations", []) if isinstance(a, dict)}
    next_id = max([i for i in used_ids if isinstance(i, int)], default=0) + 1
    for k, ann in enumerate(data.get("annotations", [])):
        where = f"annotations[{k}] in {path}"
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            problems.append((MALFORMED, where, f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]"))
        elif ann.get("image_id") not in images:
            problems.append((UNKNOWN_IMAGE, where, f"image_id {ann.get('image_id')!r} is not in 'images'"))
        elif ann.get("category_id") not in cat_ids:
            problems.append((MALFORMED, where, f"category_id {ann.get('category_id')!r} is not in 'categories'"))
        else:
            if not isinstance(ann.get("id"), int):  # pycocotools indexes annotations by id
                ann = {**ann, "id": next_id}
                next_id += 1
            anns.append(ann)
    kept = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    return {**kept, "images": list(images.values()), "annotations": anns}, problems


def write_coco(
    dst: Path,
    splits: Mapping[str, list[Record]],
    classes: Sequence[str],
    place_image: Callable[[Record, Path], str],
    category_ids: Sequence[int] | None = None,
) -> None:
    """Write records as COCO: annotations/instances_<split>.json and the images in <split>/.

    Image ids are kept when they are unique positive integers (a COCO source's), otherwise the
    images are numbered 1..N. Category ids are ``category_ids`` or 1..C. ``bbox`` is
    [x1, y1, x2 - x1, y2 - y1] in float64, which gives back the float32 box exactly.
    """
    category_ids = list(category_ids or range(1, len(classes) + 1))
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        ids = [r.image_id for r in records]
        keep_ids = len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
        images, anns = [], []
        for k, record in enumerate(records):
            image_id = record.image_id if keep_ids else k + 1
            name = place_image(record, dst / split)
            images.append({"id": image_id, "file_name": name, "width": int(record.width), "height": int(record.height)})
            for box, label, diff in zip(record.boxes.astype(np.float64), record.labels, record.difficult):
                x1, y1, x2, y2 = box.tolist()
                anns.append({
                    "id": len(anns) + 1, "image_id": image_id, "category_id": category_ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    "difficult": int(diff),
                })
        data = {
            "info": {"description": "written by detectors.data.convert"},
            "images": images,
            "annotations": anns,
            "categories": [{"id": int(c), "name": n, "supercategory": ""} for c, n in zip(category_ids, classes)],
        }
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
