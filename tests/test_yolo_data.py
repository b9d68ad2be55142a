"""YOLO txt loading: BCCD converted to YOLO against its VOC xml, class files, header-only sizes, bad input."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import BCCD
from detectors.data.dataset import DetectionDataset, collate_detection
from detectors.data.formats.voc import VOCSource
from detectors.data.formats.yolo import YOLOSource, parse_yolo_line
from detectors.data.records import BadSampleError
from detectors.data.transforms import build_transform



@pytest.fixture
def bccd_yolo(bccd_as):
    """BCCD converted to YOLO once per session (images linked, not copied)."""
    return bccd_as("yolo")


def test_bccd_as_yolo_has_the_boxes_of_the_voc_xml(bccd_yolo, monkeypatch):
    # sizes come from the image headers: nothing may be decoded while the records are read
    monkeypatch.setattr(cv2, "imread", lambda *a, **k: pytest.fail("an image was decoded to get its size"))
    source = YOLOSource(bccd_yolo)
    assert source.classes == ["Platelets", "RBC", "WBC"]  # from classes.txt
    records = source.records("val")
    monkeypatch.undo()
    reference = {Path(r.file).name: r for r in VOCSource(BCCD).records("val")}
    assert sorted(Path(r.file).name for r in records) == sorted(reference)
    for r in records:
        ref = reference[Path(r.file).name]
        assert (r.width, r.height) == (ref.width, ref.height)
        np.testing.assert_array_equal(r.boxes, ref.boxes)  # exact in float32, not merely close
        assert r.labels.tolist() == ref.labels.tolist()
    # and the label files themselves say what YOLO says: class cx cy w h, normalised
    r = records[0]
    line = (bccd_yolo / "labels" / "val" / Path(r.file).with_suffix(".txt").name).read_text().splitlines()[0]
    cls, cx, cy, w, h = map(float, line.split())
    x1, y1, x2, y2 = reference[Path(r.file).name].boxes[0]
    assert cls == r.labels[0]
    assert (cx, cy, w, h) == pytest.approx(((x1 + x2) / 2 / 640, (y1 + y2) / 2 / 480, (x2 - x1) / 640, (y2 - y1) / 480))


def test_class_names_from_data_yaml_or_config(tmp_path):
    make_yolo(tmp_path, {"a": ["0 0.5 0.5 0.2 0.2"]}, classes=None)
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        YOLOSource(tmp_path)
    assert YOLOSource(tmp_path, classes=["x"]).classes == ["x"]
    (tmp_path / "data.yaml").write_text("names: {0: person, 1: car}\n")
    assert YOLOSource(tmp_path).classes == ["person", "car"]
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    assert YOLOSource(tmp_path).classes == ["cat", "dog"]
    (tmp_path / "classes.txt").write_text("bus\ntruck\n\n")
    assert YOLOSource(tmp_path).classes == ["bus", "truck"]  # classes.txt first


def test_parse_line_box_and_polygon():
    assert parse_yolo_line("1 0.5 0.5 0.2 0.4") == (1, pytest.approx([0.4, 0.3, 0.6, 0.7]))
    assert parse_yolo_line("2 0.1 0.2 0.5 0.1 0.3 0.9") == (2, [0.1, 0.1, 0.5, 0.9])
    wrong_count, not_numbers = r"expected 'class cx cy w h' \(or a polygon\), got {} values", "not numbers"
    bad_values = r"class index must be a non-negative integer, values finite"
    for bad, why in [("1 0.5 0.5 0.2", wrong_count.format(4)), ("x 0.5 0.5 0.2 0.2", not_numbers),
                     ("1.5 0.5 0.5 0.2 0.2", bad_values), ("-1 0.5 0.5 0.2 0.2", bad_values),
                     ("0 nan 0.5 0.2 0.2", bad_values), ("0 0.1 0.2 0.3 0.4 0.5", wrong_count.format(6))]:
        with pytest.raises(BadSampleError, match=f"^{why}: '{bad}'$"):
            parse_yolo_line(bad)


def make_yolo(root: Path, labels: dict[str, list[str] | None], classes=("cat", "dog"), split="train", size=(64, 48)):
    """images/<split>/<name>.jpg of ``size`` (W, H) and labels/<split>/<name>.txt (None: no label file)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for name, lines in labels.items():
        Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(root / "images" / split / f"{name}.jpg")
        if lines is not None:
            (root / "labels" / split / f"{name}.txt").write_text("".join(f"{x}\n" for x in lines))
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_bad_input_is_skipped_counted_and_named(tmp_path, caplog):
    make_yolo(tmp_path, {
        "good": ["0 0.5 0.5 0.5 0.5", "1 0.25 0.25 0.25 0.5"],
        "degenerate": ["0 0.5 0.5 0 0.2", "0 0.5 0.5 0.25 0.25"],
        "outside": ["0 0.5 0.5 1.5 1.5", "1 1.5 1.5 0.2 0.2"],
        "unknown": ["7 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.25 0.25"],
        "malformed": ["0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2"],
        "empty": [],
        "nolabel": None,
        "corrupt": ["0 0.5 0.5 0.2 0.2"],
        "truncated": ["0 0.5 0.5 0.2 0.2"],
    })
    (tmp_path / "images" / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    jpg = tmp_path / "images" / "train" / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-200])  # header intact, data cut short
    (tmp_path / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")

    with caplog.at_level(logging.WARNING):
        source = YOLOSource(tmp_path)
        records = source.records("train")
    by_name = {Path(r.file).stem: r for r in records}
    assert sorted(by_name) == ["degenerate", "empty", "good", "nolabel", "outside", "truncated", "unknown"]
    np.testing.assert_array_equal(by_name["good"].boxes, [[16, 12, 48, 36], [8, 0, 24, 24]])
    assert by_name["good"].labels.tolist() == [0, 1]
    np.testing.assert_array_equal(by_name["degenerate"].boxes, [[24, 18, 40, 30]])
    np.testing.assert_array_equal(by_name["outside"].boxes, [[0, 0, 64, 48]])  # clipped; the other is gone
    assert by_name["unknown"].labels.tolist() == [1]
    assert len(by_name["empty"].boxes) == len(by_name["nolabel"].boxes) == 0  # background images, kept
    assert dict(source.skips.counts) == {
        "degenerate box (x2<=x1 or y2<=y1 after clipping)": 1, "box outside the image": 1,
        "class not in the class list": 1, "malformed annotation": 1, "unreadable image": 1,
    }
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for needle in ["malformed.txt", "line 2", "corrupt.jpg", "line 1 of", "class index 7", "orphan.txt"]:
        assert needle in messages

    ds = DetectionDataset(source, records, build_transform("none", (32, 32)))
    items = [ds[i] for i in range(len(ds))]
    names = [Path(r.file).stem for r in records]
    assert [n for n, item in zip(names, items) if item is None] == ["truncated"]  # found when decoded
    assert "truncated image" in next(iter(ds.skips.counts))
    batch = collate_detection(items)
    assert batch["num_skipped"].item() == 1

    with pytest.raises(BadSampleError, match="corrupt.jpg"):
        YOLOSource(tmp_path, on_bad_sample="raise").records("train")


def test_exif_rotated_image_size_matches_the_decoded_image(tmp_path):
    make_yolo(tmp_path, {"rot": ["0 0.5 0.25 0.5 0.5"]}, size=(64, 48))
    image = Image.open(tmp_path / "images" / "train" / "rot.jpg")
    exif = image.getexif()
    exif[0x0112] = 6  # stored 64x48, shown rotated by 90 degrees: 48x64
    image.save(tmp_path / "images" / "train" / "rot.jpg", exif=exif)
    source = YOLOSource(tmp_path)
    (record,) = source.records("train")
    assert (record.width, record.height) == (48, 64)
    np.testing.assert_array_equal(record.boxes, [[12, 0, 36, 32]])
    pixels, _ = source.load(record)  # no size-mismatch error: the decoder rotates too
    assert pixels.shape == (64, 48, 3)


def test_split_folders_missing_root_and_empty_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        YOLOSource(tmp_path / "nowhere", classes=["a"])
    # Roboflow's layout: <split>/images and <split>/labels
    for split in ("train", "valid"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "train" / "images" / "a.png")
    (tmp_path / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    source = YOLOSource(tmp_path, classes=["a"], splits={"train": "train/images", "val": "valid/images"})
    np.testing.assert_array_equal(source.records("train")[0].boxes, [[7.5, 5, 22.5, 15]])
    with pytest.raises(ValueError, match="no images"):
        source.records("val")
    with pytest.raises(FileNotFoundError, match=r"images/test"):
        YOLOSource(tmp_path, classes=["a"]).records("test")
