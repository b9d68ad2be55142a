"""python -m detectors.data.check: counts against independent ones, every bad-input kind, the policy column."""

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from detectors.data import check
from detectors.data.convert import ImagePlacer
from detectors.data.formats.common import OUTSIDE, AnnotationChecks
from detectors.data.formats.voc import write_voc
from detectors.data.records import Record


def main(argv: list[str]) -> int:
    """The audit alone: its pictures and anchor fit are tests/test_data_views.py's (and would land in logs/)."""
    return check.main([*argv, "--no-views"])


def table(out: str) -> dict[str, list[str]]:
    """Report rows by name: the cells after the name (counts per split, then the policy)."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_bccd_counts_match_the_xml(bccd_root, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = main(["data=voc", f"data.root={bccd_root}", "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table(out)
    assert rows["images"] == ["205", "87", "72"]
    # the reference: object names counted straight from the xml of each image set. VOC boxes are
    # 1-based and inclusive (x1 = xmin - 1, x2 = xmax): degenerate only when xmax < xmin (or y), and
    # BCCD's xmin == xmax boxes are 1 px wide and kept
    degenerate_files, one_px = set(), 0
    for split_index, split in enumerate(("train", "val", "test")):
        ids = (bccd_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        counts: Counter[str] = Counter()
        degenerate = 0
        for i in ids:
            for obj in ET.parse(bccd_root / "Annotations" / f"{i}.xml").getroot().iter("object"):
                b = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                x1, y1, x2, y2 = b[0] - 1, b[1] - 1, b[2], b[3]
                one_px += (x2 - x1 == 1) or (y2 - y1 == 1)
                if x2 > x1 and y2 > y1:
                    counts[obj.findtext("name")] += 1
                else:
                    degenerate += 1
                    degenerate_files.add(f"{i}.jpg")
        for name in ("Platelets", "RBC", "WBC"):
            assert rows[name][split_index] == str(counts[name])
        assert rows["degenerate box (x2<=x1 or y2<=y1 after clipping)"][split_index] == str(degenerate)
        assert rows["tiny box (under min_box_size px after clipping)"][split_index] == "0"  # 1 px is not under 1
    assert one_px == 2 and not degenerate_files  # BCCD's two point boxes, BloodImage_00338 and _00343
    assert rows["degenerate box (x2<=x1 or y2<=y1 after clipping)"][3] == "drop"
    assert rows["unreadable image"] == ["0", "0", "0", "skip image"]
    warnings = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert {re.search(r"BloodImage_\d+\.jpg", w).group() for w in warnings} == degenerate_files
    assert "training with this config would run" in out


@pytest.fixture
def bad_voc(tmp_path):
    """A VOC folder with one image of every problem kind the audit names."""
    (tmp_path / "src").mkdir()

    def rec(name, boxes, labels=None, size=(64, 48)):
        path = tmp_path / "src" / f"{name}.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        return Record(0, str(path), size[0], size[1], boxes, labels or [0] * len(boxes))

    records = [
        rec("good", [(5, 5, 30, 30), (10, 10, 60, 40)], [0, 1]),
        rec("degenerate", [(30, 5, 20, 30), (1, 1, 20, 20)]),
        rec("outside", [(70, 5, 90, 30), (-10, -5, 100, 60)]),  # one wholly outside, one clipped
        rec("tiny", [(5, 5, 5.5, 30)]),
        rec("unknown", [(5, 5, 30, 30), (6, 6, 20, 20)], [2, 0]),
        rec("empty", []),
        rec("corrupt", [(5, 5, 30, 30)]),
        rec("truncated", [(5, 5, 30, 30)]),
        rec("missing", [(5, 5, 30, 30)]),
        rec("wrongsize", [(5, 5, 30, 30)], size=(80, 60)),
        rec("malformed", [(5, 5, 30, 30)]),
    ]
    root = tmp_path / "voc"
    write_voc(root, {"train": records, "val": records[:1]}, ["cat", "dog", "horse"], ImagePlacer())
    with open(root / "ImageSets" / "Main" / "train.txt", "a") as f:
        f.write("noxml\n")
    (root / "Annotations" / "malformed.xml").write_text("<annotation><size><width>64</wid")
    (root / "JPEGImages" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    jpg = root / "JPEGImages" / "truncated.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-300])
    (root / "JPEGImages" / "missing.jpg").unlink()
    return root


EXPECTED = {  # row: (train count, policy with skip, policy with raise)
    "images": ("10", None, None),  # 12 listed: malformed and noxml skipped
    "empty (no objects)": ("2", "keep (background)", "keep (background)"),  # "tiny" lost its only box
    "malformed annotation": ("1", "skip image", "error"),
    "missing annotation file": ("1", "skip image", "error"),
    "missing image file": ("1", "skip image", "error"),
    "unreadable image": ("1", "skip image", "error"),
    "truncated image": ("1", "skip image", "error"),
    "image size differs from its annotation": ("1", "skip image", "error"),
    "cat": ("8", None, None),
    "dog": ("1", None, None),
    "degenerate box (x2<=x1 or y2<=y1 after clipping)": ("1", "drop", "error"),
    "box outside the image": ("1", "drop", "error"),
    "box partly outside the image (clipped)": ("1", "clip", "clip"),
    "tiny box (under min_box_size px after clipping)": ("1", "drop", "error"),
    "class not in the class list": ("1", "drop", "error"),
}


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_every_bad_input_kind_is_counted_with_its_policy(bad_voc, policy, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = main(["data=voc", f"data.root={bad_voc}", "data.classes=[cat,dog]", f"data.on_bad_sample={policy}",
                     "--workers", "1"])
    out = capsys.readouterr().out
    rows = table(out)
    for name, (count, on_skip, on_raise) in EXPECTED.items():
        assert rows[name][0] == count, (name, out)
        if on_skip:
            assert rows[name][-1] == (on_skip if policy == "skip" else on_raise), name
    assert rows["images"][1] == "1"  # val
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for name in ["malformed.xml", "noxml.xml", "missing.jpg", "corrupt.jpg", "truncated.jpg", "wrongsize.jpg",
                 "'horse'", "tiny.jpg", "outside.jpg", "degenerate.jpg"]:
        assert name in messages
    if policy == "skip":
        assert code == 0 and "would run; it leaves out" in out
    else:
        assert code == 1 and "would stop" in out and "1 x truncated image with on_bad_sample=raise" in out


def test_header_only_mode_misses_truncation_but_not_sizes(bad_voc, capsys):
    main(["data=voc", f"data.root={bad_voc}", "data.classes=[cat,dog]", "--no-decode", "--splits", "train"])
    rows = table(capsys.readouterr().out)
    assert rows["truncated image"][0] == "0"
    assert rows["image size differs from its annotation"][0] == "1" and rows["unreadable image"][0] == "1"


def test_missing_root_and_split_stop_with_what_was_looked_for(tmp_path, bad_voc, capsys):
    assert main(["data=voc", f"data.root={tmp_path / 'nowhere'}"]) == 1
    assert "nowhere has no Annotations/" in capsys.readouterr().out
    base = ["data=voc", f"data.root={bad_voc}", "data.classes=[cat,dog]", "--no-decode"]
    # no test.txt: reported, but training (test=false) does not need it
    assert main(base) == 0
    assert "split 'test' cannot be read: image set test.txt" in capsys.readouterr().out
    assert main([*base, "test=true"]) == 1
    assert "test.txt" in capsys.readouterr().out.split("would stop")[1]
    assert main([*base, "data.splits.val=nothere"]) == 1
    assert "nothere.txt" in capsys.readouterr().out.split("would stop")[1]


def test_coco_and_yolo_configs(tmp_path, capsys):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "train").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "coco" / "train" / "a.png")
    (tmp_path / "coco" / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "a.png", "width": 50, "height": 40}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 4, "bbox": [1, 2, 10, 10]},
                        {"id": 2, "image_id": 8, "category_id": 4, "bbox": [1, 2, 10, 10]}],
        "categories": [{"id": 4, "name": "cell"}]}))
    code = main(["data=coco", f"data.root={tmp_path / 'coco'}", "data.splits={train: train, val: train}",
                 "--splits", "train", "val"])
    rows = table(capsys.readouterr().out)
    assert code == 0 and rows["annotation of an unknown image"] == ["1", "1", "drop"] and rows["cell"] == ["1", "1"]

    (tmp_path / "yolo" / "images" / "train").mkdir(parents=True)
    (tmp_path / "yolo" / "labels" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "yolo" / "images" / "train" / "a.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "yolo" / "images" / "train" / "b.png")
    (tmp_path / "yolo" / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    code = main(["data=yolo", f"data.root={tmp_path / 'yolo'}", "data.classes=[cell]",
                 "data.splits={train: train, val: train}", "--splits", "train", "val"])
    rows = table(capsys.readouterr().out)
    assert code == 0 and rows["class not in the class list"][0] == "1" and rows["empty (no objects)"][0] == "1"
    assert rows["image without a label file (kept as background)"][0] == "1"


def test_warning_lines_are_capped_but_every_problem_is_counted(caplog):
    records = [Record(i, f"img{i}.jpg", 64, 48, [(70, 5, 90, 30), (1, 1, 9, 9)], [0, 0]) for i in range(7)]
    checks = AnnotationChecks(max_warnings=3)
    with caplog.at_level(logging.WARNING):
        kept = checks.finish(records)
    assert [len(r.boxes) for r in kept] == [1] * 7 and checks.skips.counts[OUTSIDE] == 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("img" in x for x in lines[:3]) and "not shown one by one" in lines[3]
