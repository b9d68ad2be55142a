"""COCO loading: BCCD converted to COCO against its VOC xml, ids round-tripped through pycocotools, bad input."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.data.dataset import DetectionDataset, collate_detection
from detectors.data.formats.coco import COCOSource
from detectors.data.formats.voc import parse_voc_xml
from detectors.data.records import BadSampleError
from detectors.data.transforms import build_transform
from detectors.evaluation.results import category_ids_of, coco_detections


@pytest.fixture
def bccd_coco(bccd_as):
    """BCCD converted to COCO once per session (images linked, not copied)."""
    return bccd_as("coco")


def remap_ids(src: Path, dst: Path, cat_map: dict[int, int], image_id=lambda i: i * 10 + 5) -> None:
    """Copy a converted COCO folder's val split with non-contiguous category ids and other image ids."""
    data = json.loads((src / "annotations" / "instances_val.json").read_text())
    for c in data["categories"]:
        c["id"] = cat_map[c["id"]]
    for img in data["images"]:
        img["id"] = image_id(img["id"])
    for a in data["annotations"]:
        a["category_id"], a["image_id"] = cat_map[a["category_id"]], image_id(a["image_id"])
    (dst / "annotations").mkdir(parents=True)
    (dst / "annotations" / "instances_val.json").write_text(json.dumps(data))
    (dst / "val").symlink_to(src / "val")


def test_bccd_as_coco_has_the_boxes_of_the_voc_xml(bccd_coco, bccd_root):
    source = COCOSource(bccd_coco)
    assert source.classes == ["Platelets", "RBC", "WBC"] and source.category_ids == [1, 2, 3]
    records = source.records("val")
    gt = json.loads((bccd_coco / "annotations" / "instances_val.json").read_text())
    assert [r.image_id for r in records] == sorted(img["id"] for img in gt["images"])  # the COCO image ids
    assert len(records) == 87
    for record in records:
        # the reference: the original xml, read without our loader's cleaning
        ann = parse_voc_xml(bccd_root / "Annotations" / (Path(record.file).stem + ".xml"))
        expected = [(box, ["Platelets", "RBC", "WBC"].index(n)) for n, box, _ in ann["objects"]
                    if box[2] > box[0] and box[3] > box[1]]  # degenerate ones (none in BCCD since the 1-based reading) left out
        assert (record.width, record.height) == (ann["width"], ann["height"])
        np.testing.assert_array_equal(record.boxes, np.array([b for b, _ in expected], np.float32).reshape(-1, 4))
        assert record.labels.tolist() == [label for _, label in expected]


def test_category_and_image_ids_round_trip_through_results_json(bccd_coco, tmp_path):
    remap_ids(bccd_coco, tmp_path, {1: 12, 2: 3, 3: 7})
    source = COCOSource(tmp_path, splits={"val": "val"})
    # labels follow category id order; results must carry the file's own ids again
    assert source.classes == ["RBC", "WBC", "Platelets"] and source.category_ids == [3, 7, 12]
    records = source.records("val")
    gt = COCO(str(tmp_path / "annotations" / "instances_val.json"))
    assert {r.image_id for r in records} == set(gt.getImgIds())
    for r in records[:5]:  # label -> name agrees with the file's category of each annotation
        names = sorted(gt.cats[a["category_id"]]["name"] for a in gt.imgToAnns[r.image_id])
        assert sorted(source.classes[i] for i in r.labels) == names

    preds = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels),
              "scores": torch.linspace(1, 0.5, len(r.labels))} for r in records]
    image_ids = [r.image_id for r in records]
    results = coco_detections(preds, image_ids, category_ids_of(source, len(source.classes)))
    assert {d["category_id"] for d in results} == {3, 7, 12}
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)
    # the check has teeth: labels mapped back with label + 1 (the contiguous guess) score far lower
    ev = COCOeval(gt, gt.loadRes(coco_detections(preds, image_ids, [1, 2, 3])), "bbox")
    ev.evaluate(), ev.accumulate()
    ev.summarize()
    assert ev.stats[1] < 0.5


def test_a_class_list_picks_and_orders_categories(bccd_coco, caplog):
    with caplog.at_level(logging.WARNING):
        source = COCOSource(bccd_coco, classes=["WBC", "RBC"])
        records = source.records("test")
    assert source.category_ids == [3, 2]
    gt = COCO(str(bccd_coco / "annotations" / "instances_test.json"))
    n_platelets = len(gt.getAnnIds(catIds=[1]))
    assert sum((r.labels == 0).sum() for r in records) == len(gt.getAnnIds(catIds=[3]))
    assert source.skips.counts["class not in the class list"] == n_platelets
    # one line per dropped category, not one per annotation
    lines = [r.getMessage() for r in caplog.records if "class not in the class list" in r.getMessage()]
    assert len(lines) == 1 and "'Platelets'" in lines[0] and "instances_test.json" in lines[0]
    with pytest.raises(ValueError, match="Neutrophil"):
        COCOSource(bccd_coco, classes=["WBC", "Neutrophil"])


def write_coco(root: Path, images: list[dict], annotations: list, categories=None, split="train") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for img in images:
        if "file_name" in img and "width" in img:
            Image.fromarray(np.full((img["height"], img["width"], 3), 90, np.uint8)).save(root / split / img["file_name"])
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path


def img(i, w=64, h=48):
    return {"id": i, "file_name": f"{i}.jpg", "width": w, "height": h}


def ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def test_crowd_and_empty_images(tmp_path):
    write_coco(tmp_path, [img(1), img(2), img(3)], [
        ann(1, 1, 5, [2, 3, 10, 20]),
        ann(2, 1, 9, [0, 0, 60, 40], iscrowd=1),
        ann(3, 2, 9, [5.5, 6.25, 7.75, 8.5], difficult=1),
    ])
    source = COCOSource(tmp_path, splits={"train": "train"})
    r1, r2, r3 = source.records("train")
    np.testing.assert_array_equal(r1.boxes, [[2, 3, 12, 23], [0, 0, 60, 40]])
    assert r1.labels.tolist() == [0, 1] and r1.difficult.tolist() == [False, True]  # crowd: never trained on
    np.testing.assert_array_equal(r2.boxes, [[5.5, 6.25, 13.25, 14.75]])
    assert r2.difficult.tolist() == [True]  # VOC's difficult flag as write_coco carries it
    assert len(r3.boxes) == 0 and r3.image_id == 3  # an image without annotations is kept
    # crowd reaches the batch (for COCO AP's crowd rule), difficult alone does not make a crowd
    assert r1.iscrowd.tolist() == [False, True] and r2.iscrowd.tolist() == [False]
    ds = DetectionDataset(source, [r1, r2, r3], build_transform("none", (32, 32)))
    batch = collate_detection([ds[i] for i in range(3)])
    assert batch["iscrowd"].tolist() == [[False, True], [False, False], [False, False]]


def test_bad_input_is_skipped_counted_and_named(tmp_path, caplog):
    path = write_coco(tmp_path, [img(1), img(2), img(3), img(4), {"id": 5}, img(1)], [
        ann(1, 1, 5, [2, 3, 10, 20]),
        ann(2, 1, 5, [30, 5, 0, 10]),  # w = 0: degenerate
        ann(3, 1, 9, [-10, -5, 30, 20]),  # partly outside: clipped
        ann(4, 1, 9, [100, 100, 10, 10]),  # wholly outside the 64x48 image
        ann(5, 77, 5, [1, 1, 5, 5]),  # names an image that is not in 'images'
        ann(6, 2, 5, [1, 2, 3]),  # bbox of 3 numbers
        ann(7, 2, 42, [1, 1, 5, 5]),  # category id not in 'categories'
        {"image_id": 2, "category_id": 9, "bbox": [4, 4, 10, 10]},  # no annotation id: numbered
        ann(9, 3, 5, [1, 1, 5, 5]),
        ann(10, 4, 5, [1, 1, 5, 5]),
    ])
    (tmp_path / "train" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "train" / "4.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        source = COCOSource(tmp_path, splits={"train": "train"})
        records = source.records("train")
    by_id = {r.image_id: r for r in records}
    assert sorted(by_id) == [1, 2, 3, 4]  # the image entry without file_name and the duplicate id 1 are skipped
    np.testing.assert_array_equal(by_id[1].boxes, [[2, 3, 12, 23], [0, 0, 20, 15]])
    np.testing.assert_array_equal(by_id[2].boxes, [[4, 4, 14, 14]])
    assert dict(source.skips.counts) == {
        "degenerate box (x2<=x1 or y2<=y1 after clipping)": 1, "box outside the image": 1,
        "annotation of an unknown image": 1, "malformed annotation": 4,
    }
    assert source.checks.audit["box partly outside the image (clipped)"] == 1
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for needle in ["annotations[4] in", "image_id 77", "annotations[5]", "category_id 42", "images[4]",
                   "duplicate image id 1", str(path)]:
        assert needle in messages

    ds = DetectionDataset(source, records, build_transform("none", (32, 32)))
    items = [ds[i] for i in range(len(ds))]
    assert [item is None for item in items] == [False, False, True, True]  # unreadable 3.jpg, missing 4.jpg
    batch = collate_detection(items)
    assert batch["num_skipped"].item() == 2 and batch["image_ids"].tolist() == [1, 2]
    # counted by kind; each warning line names its file
    assert sum(ds.skips.counts.values()) == 2 and ds.skips.counts["missing image file"] == 1
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "3.jpg" in messages and "4.jpg" in messages

    with pytest.raises(BadSampleError, match=r"images\[4\]"):
        COCOSource(tmp_path, splits={"train": "train"}, on_bad_sample="raise").records("train")


def test_broken_files_fail_at_start_saying_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        COCOSource(tmp_path / "nowhere")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        COCOSource(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text('{"images": [')
    with pytest.raises(BadSampleError, match="malformed JSON"):
        COCOSource(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text('[1, 2]')
    with pytest.raises(BadSampleError, match="not a COCO annotation file"):
        COCOSource(tmp_path)
    write_coco(tmp_path, [], [])
    with pytest.raises(ValueError, match="lists no images"):
        COCOSource(tmp_path).records("train")
    write_coco(tmp_path, [img(1)], [], split="val")
    with pytest.raises(FileNotFoundError, match="instances_test.json"):
        COCOSource(tmp_path).records("test")
    write_coco(tmp_path, [img(1)], [], categories=[{"id": 5, "name": "dog"}, {"id": 9, "name": "cat"}], split="test")
    with pytest.raises(ValueError, match="share one category list"):
        COCOSource(tmp_path).records("test")


def test_bccd_coco_batches_through_the_ssd_augmentation(bccd_coco):
    source = COCOSource(bccd_coco)
    records = source.records("train")[:4]
    ds = DetectionDataset(source, records, build_transform("ssd", (300, 300), seed=0), seed=0)
    batch = collate_detection([ds[(i, 0)] for i in range(4)])
    assert batch["images"].shape == (4, 3, 300, 300)
    assert batch["image_ids"].tolist() == [r.image_id for r in records]
    boxes = batch["boxes"][batch["mask"]]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_evaluation_ground_truth_is_the_file_as_written(tmp_path):
    """Training drops a zero-width box and clips one past the border; the ground truth evaluation
    scores keeps both as the file has them, with the file's mask areas and crowd flags."""
    write_coco(tmp_path, [img(1), img(2)], [
        ann(1, 1, 5, [2, 3, 10, 20], area=150.5),
        ann(2, 1, 9, [30, 4, 0, 10], area=0.0),  # zero width
        ann(3, 1, 9, [50, 40, 30, 20], area=321.0),  # past the 64x48 image
        ann(4, 1, 5, [0, 0, 60, 40], iscrowd=1, area=2000.0),
    ])
    source = COCOSource(tmp_path, splits={"train": "train"})
    r1, r2 = source.records("train")
    np.testing.assert_array_equal(r1.boxes, [[2, 3, 12, 23], [50, 40, 64, 48], [0, 0, 60, 40]])  # cleaned
    gt = r1.ground_truth
    np.testing.assert_array_equal(gt.boxes, [[2, 3, 12, 23], [30, 4, 30, 14], [50, 40, 80, 60], [0, 0, 60, 40]])
    assert gt.area.tolist() == [150.5, 0.0, 321.0, 2000.0] and gt.iscrowd.tolist() == [False, False, False, True]
    assert gt.labels.tolist() == [0, 1, 1, 0] and r1.area.tolist() == [150.5, 321.0, 2000.0]
    # an evaluation dataset hands it to the batch; a training one does not
    ds = DetectionDataset(source, [r1, r2], build_transform("none", (32, 32)), ground_truth=True)
    batch = collate_detection([ds[0], ds[1]])
    assert batch["gt_counts"].tolist() == [4, 0] and batch["gt_boxes"].dtype == torch.float64
    np.testing.assert_array_equal(batch["gt_boxes"][0].numpy(), gt.boxes)
    assert batch["gt_area"][0].tolist() == [150.5, 0.0, 321.0, 2000.0]
    assert batch["gt_iscrowd"][0].tolist() == [False, False, False, True]
    train = DetectionDataset(source, [r1, r2], build_transform("none", (32, 32)))
    assert "gt_boxes" not in collate_detection([train[0], train[1]])
