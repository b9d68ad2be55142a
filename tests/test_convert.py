"""VOC <-> COCO <-> YOLO conversion: box-exact round trips, hand-computed numbers, the CLI, several VOC roots."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BCCD
from detectors.data.convert import FORMATS, ImagePlacer, convert, main, open_source
from detectors.data.formats.voc import VOCSource, write_voc
from detectors.data.records import Record

CLASSES = ["bird", "cat", "dog"]  # sorted: the order VOC reads them back in


def random_records(rng: np.random.Generator, n: int, image_dir: Path, prefix: str) -> list[Record]:
    """Images of varied sizes with non-integer float32 boxes, borders and tiny coordinates included."""
    records = []
    for i in range(n):
        w, h = int(rng.integers(40, 90)), int(rng.integers(30, 80))
        path = image_dir / f"{prefix}{i:03d}.jpg"
        Image.fromarray(np.full((h, w, 3), 60 + i, np.uint8)).save(path)
        k = 0 if i == 0 else int(rng.integers(1, 8))  # the first image has no objects
        x1 = rng.uniform(0, w - 3, k)
        y1 = rng.uniform(0, h - 3, k)
        x2 = np.minimum(x1 + rng.uniform(1.5, w, k), w)
        y2 = np.minimum(y1 + rng.uniform(1.5, h, k), h)
        boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
        if k:
            boxes[0, :2] = [0.3, 0.0078125]  # tiny coordinates: where float32 rounding bites
            boxes[-1, 2:] = [w, h]  # on the border
        records.append(Record(i, str(path), w, h, boxes, rng.integers(0, 3, k), rng.random(k) < 0.3))
    return records


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same synthetic dataset as VOC, COCO and YOLO folders."""
    base = tmp_path_factory.mktemp("synthetic")
    (base / "src").mkdir()
    rng = np.random.default_rng(0)
    splits = {"train": random_records(rng, 12, base / "src", "a"), "val": random_records(rng, 5, base / "src", "b")}
    write_voc(base / "voc", splits, CLASSES, ImagePlacer("copy"))
    convert([base / "voc"], base / "coco", "voc", "coco")
    convert([base / "voc"], base / "yolo", "voc", "yolo")
    return {"voc": base / "voc", "coco": base / "coco", "yolo": base / "yolo"}


def by_name(fmt: str, root: Path) -> dict[str, dict[str, Record]]:
    source = open_source(fmt, [root], {"train": "train", "val": "val"})
    assert source.classes == CLASSES
    return {s: {Path(r.file).name: r for r in source.records(s)} for s in ("train", "val")}


def assert_same(a: dict, b: dict, difficult: bool = True) -> None:
    for split in a:
        assert sorted(a[split]) == sorted(b[split])
        for name, r in a[split].items():
            o = b[split][name]
            assert (r.width, r.height) == (o.width, o.height), name
            np.testing.assert_array_equal(r.boxes, o.boxes, err_msg=name)  # exact, float32
            assert r.labels.tolist() == o.labels.tolist(), name
            if difficult:
                assert r.difficult.tolist() == o.difficult.tolist(), name


@pytest.mark.parametrize("start,via", [(a, b) for a in FORMATS for b in FORMATS if a != b])
def test_round_trip_is_box_exact(roots, tmp_path, start, via):
    convert([roots[start]], tmp_path / "mid", start, via, images="symlink")
    convert([tmp_path / "mid"], tmp_path / "back", via, start, images="symlink")
    original = by_name(start, roots[start])
    assert sum(len(r.labels) for s in original.values() for r in s.values()) > 40
    # YOLO has no difficult flag: through it, difficult objects come back as ordinary ones
    assert_same(original, by_name(via, tmp_path / "mid"), difficult=via != "yolo" and start != "yolo")
    assert_same(original, by_name(start, tmp_path / "back"), difficult=via != "yolo")


def test_the_three_formats_carry_the_same_numbers(tmp_path):
    """A hand-computed box in each format's own units: VOC xyxy, COCO xywh, YOLO normalised centre/size."""
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "img" / "x.jpg")
    record = Record(0, str(tmp_path / "img" / "x.jpg"), 64, 48, [[10.5, 20.25, 30.75, 40]], [1], [True])
    write_voc(tmp_path / "voc", {"train": [record]}, ["a", "b"], ImagePlacer())
    xml = (tmp_path / "voc" / "Annotations" / "x.xml").read_text()
    for tag, value in [("xmin", "10.5"), ("ymin", "20.25"), ("xmax", "30.75"), ("ymax", "40"), ("difficult", "1")]:
        assert f"<{tag}>{value}</{tag}>" in xml
    convert([tmp_path / "voc"], tmp_path / "coco", "voc", "coco", classes=["a", "b"])  # 'a' has no objects
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    (a,) = data["annotations"]
    assert a["bbox"] == [10.5, 20.25, 20.25, 19.75] and a["category_id"] == 2 and a["difficult"] == 1
    assert data["categories"] == [{"id": 1, "name": "a", "supercategory": ""}, {"id": 2, "name": "b", "supercategory": ""}]
    assert (tmp_path / "coco" / "train" / "x.jpg").is_file()
    summary = convert([tmp_path / "voc"], tmp_path / "yolo", "voc", "yolo", classes=["a", "b"])
    assert summary["difficult_as_boxes"] == 1
    cls, cx, cy, w, h = (tmp_path / "yolo" / "labels" / "train" / "x.txt").read_text().split()
    assert cls == "1"
    assert [float(v) for v in (cx, cy, w, h)] == pytest.approx([20.625 / 64, 30.125 / 48, 20.25 / 64, 19.75 / 48],
                                                               rel=1e-15)
    assert convert([tmp_path / "voc"], tmp_path / "yolo2", "voc", "yolo", drop_difficult=True)["dropped_difficult"] == 1
    assert (tmp_path / "yolo2" / "labels" / "train" / "x.txt").read_text() == ""


@pytest.mark.parametrize("via", ["coco", "yolo"])
def test_bccd_round_trip_is_box_exact(tmp_path, via):
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {BCCD}")
    summary = convert([BCCD], tmp_path / via, "voc", via, images="symlink")
    # BCCD's two degenerate boxes are left out, and said so
    assert summary["skipped"] == {"degenerate box (x2<=x1 or y2<=y1 after clipping)": 2}
    assert summary["splits"] == {"train": {"images": 205, "boxes": 2804}, "val": {"images": 87, "boxes": 1137},
                                 "test": {"images": 72, "boxes": 945}}
    convert([tmp_path / via], tmp_path / "back", via, "voc", images="symlink")
    original, back = VOCSource(BCCD), VOCSource(tmp_path / "back")
    for split in ("train", "val", "test"):
        assert_same({split: {Path(r.file).name: r for r in original.records(split)}},
                    {split: {Path(r.file).name: r for r in back.records(split)}})


def make_voc_root(root: Path, names: dict[str, list[tuple[str, tuple]]], sets: dict[str, list[str]], shade: int) -> None:
    recs = {}
    (root / "img").mkdir(parents=True)
    for i, (name, objects) in enumerate(names.items()):
        Image.fromarray(np.full((30, 40, 3), shade + 10 * i, np.uint8)).save(root / "img" / f"{name}.jpg")
        recs[name] = Record(i, str(root / "img" / f"{name}.jpg"), 40, 30, [b for _, b in objects],
                            [["cat", "dog"].index(c) for c, _ in objects])
    write_voc(root, {s: [recs[n] for n in ids] for s, ids in sets.items()}, ["cat", "dog"], ImagePlacer())


def test_several_voc_roots_are_concatenated(tmp_path, caplog):
    """VOC07+12: train on both trainvals, test on 07's test (VOC2012 has no test.txt)."""
    make_voc_root(tmp_path / "VOC2007", {"000001": [("cat", (1, 1, 10, 10))], "000002": [("dog", (2, 2, 20, 20))]},
                  {"trainval": ["000001"], "test": ["000002"]}, shade=0)
    make_voc_root(tmp_path / "VOC2012", {"000001": [("dog", (3, 3, 30, 25))], "000003": []},
                  {"trainval": ["000001", "000003"]}, shade=100)
    roots = [tmp_path / "VOC2007", tmp_path / "VOC2012"]
    source = VOCSource(roots, splits={"train": "trainval", "test": "test"})
    train, test = source.records("train"), source.records("test")
    assert [r.image_id for r in train] == [0, 1, 2]  # unique across the roots
    assert [Path(r.file).relative_to(tmp_path).as_posix() for r in train] == [
        "VOC2007/JPEGImages/000001.jpg", "VOC2012/JPEGImages/000001.jpg", "VOC2012/JPEGImages/000003.jpg"]
    assert [r.boxes.tolist() for r in train] == [[[1, 1, 10, 10]], [[3, 3, 30, 25]], []]
    assert [r.labels.tolist() for r in train] == [[0], [1], []]
    assert [Path(r.file).parent.parent.name for r in test] == ["VOC2007"]
    with pytest.raises(FileNotFoundError, match="VOC2007.*val.txt.*VOC2012.*val.txt"):
        VOCSource(roots, splits={"val": "val"}, classes=["cat"]).records("val")
    with pytest.raises(FileNotFoundError, match="Annotations"):
        VOCSource([roots[0], tmp_path / "nowhere"])

    # converted together: the two 000001.jpg become two images
    code = main(["--from", "voc", "--to", "coco", *map(str, roots), str(tmp_path / "coco"),
                 "--split", "train=trainval", "--split", "test"])
    assert code == 0
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    assert sorted(i["file_name"] for i in data["images"]) == ["000001.jpg", "000001_1.jpg", "000003.jpg"]
    assert sorted(a["bbox"] for a in data["annotations"]) == [[1.0, 1.0, 9.0, 9.0], [3.0, 3.0, 27.0, 22.0]]
    pixels = {i["file_name"]: np.asarray(Image.open(tmp_path / "coco" / "train" / i["file_name"]))[0, 0, 0]
              for i in data["images"]}
    assert abs(int(pixels["000001.jpg"]) - int(pixels["000001_1.jpg"])) > 50  # 2007's and 2012's image


def test_cli_refuses_a_non_empty_destination_and_missing_splits(tmp_path, roots, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["--from", "voc", "--to", "yolo", str(roots["voc"]), str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["--from", "voc", "--to", "yolo", str(roots["voc"]), str(tmp_path / "o2"), "--split", "test"]) == 1
    assert "test.txt" in capsys.readouterr().err
    assert main(["--from", "coco", "--to", "voc", str(roots["coco"]), str(tmp_path / "o3"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "val: 5 images" in out and sorted(p.name for p in (tmp_path / "o3" / "ImageSets" / "Main").iterdir()) == ["val.txt"]
