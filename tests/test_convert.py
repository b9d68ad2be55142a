"""VOC <-> COCO <-> YOLO conversion: box-exact round trips, hand-computed numbers, the CLI, several VOC roots."""

import json
import xml.etree.ElementTree as ET
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
    # VOC is 1-based: xmin = x1 + 1, xmax = x2
    for tag, value in [("xmin", "11.5"), ("ymin", "21.25"), ("xmax", "30.75"), ("ymax", "40"), ("difficult", "1")]:
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


def test_voc_writes_one_based_shortest_decimals(tmp_path):
    """xmin = x1 + 1 added in decimal: small coordinates keep their low bits and read back exactly."""
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "img" / "x.jpg")
    x1 = [0.3, 1e-5, 12.34, 0.0078125, 0, 7]
    boxes = np.array([[v, v, 40, 40.5] for v in x1], np.float32)
    write_voc(tmp_path / "voc", {"train": [Record(0, str(tmp_path / "img" / "x.jpg"), 64, 48, boxes, [0] * 6)]},
              ["a"], ImagePlacer())
    xml = (tmp_path / "voc" / "Annotations" / "x.xml").read_text()
    for v in ["1.3", "1.00001", "13.34", "1.0078125", "1", "8"]:
        assert f"<xmin>{v}</xmin>" in xml and f"<ymin>{v}</ymin>" in xml
    assert xml.count("<xmax>40</xmax>") == xml.count("<ymax>40.5</ymax>") == 6
    (record,) = VOCSource(tmp_path / "voc").records("train")
    np.testing.assert_array_equal(record.boxes, boxes)  # exact in float32


# A hand-written VOC file of a 10 x 8 image: a box over the whole image (1-based, inclusive) and a
# one pixel wide one (xmin == xmax), as the devkit's annotations write them.
HAND_XML = """<annotation><folder>JPEGImages</folder><filename>h.jpg</filename>
<size><width>10</width><height>8</height><depth>3</depth></size>
<object><name>cell</name><difficult>0</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>8</ymax></bndbox></object>
<object><name>cell</name><difficult>0</difficult>
<bndbox><xmin>5</xmin><ymin>2</ymin><xmax>5</xmax><ymax>4</ymax></bndbox></object>
</annotation>"""


def test_hand_written_voc_through_coco_and_yolo_comes_back_with_the_same_integers(tmp_path, capsys):
    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "Annotations" / "h.xml").write_text(HAND_XML)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(voc / "JPEGImages" / "h.jpg")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("h\n")

    (record,) = VOCSource(voc).records("train")
    # by hand: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax; the one-pixel box is kept
    assert record.boxes.tolist() == [[0, 0, 10, 8], [4, 1, 5, 4]]

    cli = ["--from", "voc", "--to", "coco", str(voc), str(tmp_path / "coco"), "--split", "train"]
    assert main(cli) == 0 and "train: 1 images, 2 boxes" in capsys.readouterr().out
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    # COCO width = xmax - xmin + 1, as the common VOC -> COCO converters give
    assert [a["bbox"] for a in data["annotations"]] == [[0, 0, 10, 8], [4, 1, 1, 3]]
    assert data["images"][0]["width"] == 10 and data["images"][0]["height"] == 8

    assert main(["--from", "coco", "--to", "yolo", str(tmp_path / "coco"), str(tmp_path / "yolo"),
                 "--split", "train"]) == 0
    lines = (tmp_path / "yolo" / "labels" / "train" / "h.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "0"]
    assert [float(v) for line in lines for v in line.split()[1:]] == pytest.approx(
        [0.5, 0.5, 1, 1, 4.5 / 10, 2.5 / 8, 1 / 10, 3 / 8], rel=1e-15)  # centre and size of the whole image

    assert main(["--from", "yolo", "--to", "voc", str(tmp_path / "yolo"), str(tmp_path / "back"),
                 "--split", "train", "--classes", "cell"]) == 0
    back = ET.parse(tmp_path / "back" / "Annotations" / "h.xml").getroot()
    assert [[bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")] for bb in back.iter("bndbox")] == [
        ["1", "1", "10", "8"], ["5", "2", "5", "4"]]  # the hand-written integers, as integers


def bccd_xml_boxes(split: str) -> list[tuple[str, list[int]]]:
    """(image id, [xmin, ymin, xmax, ymax]) of every object of a BCCD split, read straight from the xml."""
    ids = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    return [(i, [int(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            for i in ids for obj in ET.parse(BCCD / "Annotations" / f"{i}.xml").getroot().iter("object")]


@pytest.mark.parametrize("via", ["coco", "yolo"])
def test_bccd_round_trip_is_box_exact(tmp_path, via):
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {BCCD}")
    summary = convert([BCCD], tmp_path / via, "voc", via, images="symlink")
    # the reference, from the xml: 1-based inclusive boxes are degenerate only when xmax < xmin (or y);
    # xmin == xmax is one pixel wide and kept
    xml = {s: bccd_xml_boxes(s) for s in ("train", "val", "test")}
    degenerate = {s: sum(b[2] < b[0] or b[3] < b[1] for _, b in boxes) for s, boxes in xml.items()}
    one_px = {s: sum(b[2] == b[0] or b[3] == b[1] for _, b in boxes) for s, boxes in xml.items()}
    assert sum(one_px.values()) == 2  # BCCD's two point-like boxes (BloodImage_00338, _00343)
    n_degenerate = sum(degenerate.values())
    assert summary["skipped"] == ({"degenerate box (x2<=x1 or y2<=y1 after clipping)": n_degenerate}
                                  if n_degenerate else {})
    assert summary["splits"] == {s: {"images": n, "boxes": len(xml[s]) - degenerate[s]}
                                 for s, n in (("train", 205), ("val", 87), ("test", 72))}
    if via == "coco":  # the one-pixel boxes are there, one pixel wide and high
        widths = [a["bbox"][2:] for s in xml
                  for a in json.loads((tmp_path / via / "annotations" / f"instances_{s}.json").read_text())["annotations"]]
        assert widths.count([1, 1]) == sum(one_px.values())
    convert([tmp_path / via], tmp_path / "back", via, "voc", images="symlink")
    original, back = VOCSource(BCCD), VOCSource(tmp_path / "back")
    for split in ("train", "val", "test"):
        assert_same({split: {Path(r.file).name: r for r in original.records(split)}},
                    {split: {Path(r.file).name: r for r in back.records(split)}})
        # and the written xml holds the original integers, written as integers
        written: dict[str, list[list[str]]] = {}
        for xml_path in (tmp_path / "back" / "Annotations").glob("*.xml"):
            written[xml_path.stem] = [[bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
                                      for bb in ET.parse(xml_path).getroot().iter("bndbox")]
        expected: dict[str, list[list[str]]] = {}
        for image_id, b in xml[split]:
            expected.setdefault(image_id, [])
            if not (b[2] < b[0] or b[3] < b[1]):
                expected[image_id].append([str(v) for v in b])
        assert {i: sorted(written[i]) for i in expected} == {i: sorted(v) for i, v in expected.items()}


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
