"""VOC loading on BCCD (real data with real flaws) and on crafted bad input."""

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.data.dataset import DetectionDataset, EpochSampler, collate_detection
from detectors.data.formats.voc import VOCSource
from detectors.data.records import BadSampleError
from detectors.data.transforms import build_transform

XML = """<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = "<object><name>{cls}</name><difficult>{diff}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def make_voc(root: Path, images: dict[str, list[tuple]], split_ids: dict[str, list[str]]):
    import cv2

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, objects in images.items():
        objs = "".join(OBJ.format(cls=c, diff=d, x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for c, b, d in objects)
        (root / "Annotations" / f"{name}.xml").write_text(XML.format(name=name, objects=objs))
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.full((48, 64, 3), 128, np.uint8))
    for split, ids in split_ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_bccd_classes_counts_and_boxes_against_the_xml(bccd_root, caplog):
    with caplog.at_level(logging.WARNING):
        source = VOCSource(bccd_root)
        records = {s: source.records(s) for s in ("train", "val", "test")}
    assert source.classes == ["Platelets", "RBC", "WBC"]  # sorted, read from the annotations
    assert {s: len(r) for s, r in records.items()} == {"train": 205, "val": 87, "test": 72}
    # the reference, straight from the xml: 1-based inclusive integers, so a box is xmax - xmin + 1
    # pixels wide, degenerate only when xmax < xmin (or y); BCCD's xmin == xmax boxes are 1 px wide
    one_px, degenerate = [], []
    for recs in records.values():
        for record in recs:
            objects = ET.parse(bccd_root / "Annotations" / f"{Path(record.file).stem}.xml").getroot().iter("object")
            raw = [[int(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
            degenerate += [(record.file, b) for b in raw if b[2] < b[0] or b[3] < b[1]]
            one_px += [(record.file, b) for b in raw if b[2] == b[0] or b[3] == b[1]]
            expected = [[b[0] - 1, b[1] - 1, b[2], b[3]] for b in raw if b[2] >= b[0] and b[3] >= b[1]]
            assert record.boxes.tolist() == expected, record.file  # every BCCD box lies inside its image
    assert len(one_px) == 2 and {Path(f).stem for f, _ in one_px} == {"BloodImage_00338", "BloodImage_00343"}
    assert all(b[:2] == b[2:] for _, b in one_px)  # points: now 1 x 1 px boxes, kept
    warned = [r.getMessage() for r in caplog.records if "degenerate box" in r.getMessage()]
    assert len(warned) == len(degenerate)  # 0 in BCCD: its only candidates were the 1 px boxes
    assert sum(source.skips.counts.values()) == len(degenerate)


def test_one_based_inclusive_boxes_are_read_as_continuous_ones(tmp_path, caplog):
    """xmin=1..xmax=64 is the whole 64 px row; xmin == xmax one pixel; xmin = 0 starts a pixel outside."""
    make_voc(tmp_path / "v", {"a": [("cat", (1, 1, 64, 48), 0), ("cat", (5, 2, 5, 4), 0), ("cat", (0, 0, 10, 10), 0),
                                    ("cat", (6, 5, 5, 9), 0)]}, {"train": ["a"]})
    with caplog.at_level(logging.WARNING):
        source = VOCSource(tmp_path / "v", classes=["cat"])
        (record,) = source.records("train")
    assert record.boxes.tolist() == [[0, 0, 64, 48], [4, 1, 5, 4], [0, 0, 10, 10]]  # [-1, -1, 10, 10] clipped
    assert dict(source.skips.counts) == {"degenerate box (x2<=x1 or y2<=y1 after clipping)": 1}  # xmax < xmin
    assert source.checks.audit["box partly outside the image (clipped)"] == 1
    assert not [r for r in caplog.records if "clipped" in r.getMessage()]  # by 1 px: counted, not warned


def test_bccd_batches_through_the_ssd_augmentation(bccd_root):
    source = VOCSource(bccd_root)
    records = source.records("train")[:8]
    ds = DetectionDataset(source, records, build_transform("ssd", (300, 300), seed=0), seed=0)
    batch = collate_detection([ds[(i, 0)] for i in range(8)])
    assert batch["images"].shape == (8, 3, 300, 300) and batch["images"].dtype == torch.uint8
    boxes = batch["boxes"][batch["mask"]]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 300
    assert (batch["labels"][batch["mask"]] >= 0).all() and (batch["labels"][~batch["mask"]] == -1).all()
    # same (epoch, index) gives the same augmentation; another epoch another one
    again = ds[(3, 0)]
    assert torch.equal(again[0], ds[(3, 0)][0]) and not torch.equal(again[0], ds[(3, 1)][0])


def test_eval_transform_maps_back_to_the_original_boxes(bccd_root):
    source = VOCSource(bccd_root)
    record = source.records("test")[0]
    ds = DetectionDataset(source, [record], build_transform("none", (300, 300)))
    image, target = ds[0]
    assert target["orig_size"] == (480, 640)
    scaled = target["boxes"] * torch.tensor([640 / 300, 480 / 300, 640 / 300, 480 / 300])
    torch.testing.assert_close(scaled, torch.from_numpy(record.boxes), rtol=0, atol=1e-3)


def test_bad_input_is_skipped_counted_and_named(tmp_path, caplog):
    root = tmp_path / "voc"
    make_voc(root, {
        "good": [("cat", (5, 5, 30, 30), 0), ("dog", (10, 10, 60, 40), 1)],
        "degenerate": [("cat", (30, 5, 20, 30), 0), ("cat", (1, 1, 20, 20), 0)],
        "outside": [("cat", (-10, -5, 100, 60), 0)],
        "unknown": [("horse", (5, 5, 30, 30), 0), ("cat", (5, 5, 30, 30), 0)],
        "empty": [],
        "corrupt": [("cat", (5, 5, 30, 30), 0)],
        "missing": [("cat", (5, 5, 30, 30), 0)],
    }, {"train": ["good", "degenerate", "outside", "unknown", "empty", "corrupt", "missing", "malformed"]})
    (root / "Annotations" / "malformed.xml").write_text("<annotation><size><width>64</wid")
    (root / "JPEGImages" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "JPEGImages" / "missing.jpg").unlink()

    with caplog.at_level(logging.WARNING):
        source = VOCSource(root, classes=["cat", "dog"])
        records = source.records("train")
    by_file = {Path(r.file).stem: r for r in records}
    assert "malformed" not in by_file  # malformed XML: skipped at load
    assert len(by_file["degenerate"].boxes) == 1
    np.testing.assert_allclose(by_file["outside"].boxes, [[0, 0, 64, 48]])  # clipped to the image
    assert by_file["unknown"].labels.tolist() == [0]
    assert len(by_file["empty"].boxes) == 0
    assert by_file["good"].difficult.tolist() == [False, True]
    assert set(source.skips.counts) == {"degenerate box (x2<=x1 or y2<=y1 after clipping)",
                                        "class not in the class list"} | {k for k in source.skips.counts if "malformed" in k}
    assert any("malformed.xml" in r.getMessage() for r in caplog.records)

    ds = DetectionDataset(source, records, build_transform("none", (32, 32)))
    items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 2  # corrupt and missing images
    assert sum(ds.skips.counts.values()) == 2
    batch = collate_detection(items)
    assert batch["num_skipped"].item() == 2 and batch["images"].shape[0] == len(items) - 2

    strict = DetectionDataset(source, records, build_transform("none", (32, 32)), on_bad_sample="raise")
    with pytest.raises(BadSampleError, match="corrupt.jpg"):
        [strict[i] for i in range(len(strict))]
    with pytest.raises(BadSampleError, match="malformed"):
        VOCSource(root, classes=["cat", "dog"], on_bad_sample="raise").records("train")


def test_missing_root_and_empty_split_fail_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotations"):
        VOCSource(tmp_path / "nowhere", classes=["a"])
    make_voc(tmp_path / "v", {"a": [("cat", (1, 1, 9, 9), 0)]}, {"train": ["a"], "val": []})
    with pytest.raises(ValueError, match="empty"):
        VOCSource(tmp_path / "v", classes=["cat"]).records("val")
    with pytest.raises(FileNotFoundError, match="test"):
        VOCSource(tmp_path / "v", classes=["cat"]).records("test")


def test_epoch_sampler_is_a_permutation_seeded_by_epoch():
    epoch = [0]
    sampler = EpochSampler(10, seed=3, epoch_fn=lambda: epoch[0])
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    assert list(sampler) == first
    epoch[0] = 1
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}


def test_samplers_shard_across_processes_without_repeats():
    from detectors.data.dataset import ShardSampler

    shards = [list(EpochSampler(11, seed=3, epoch_fn=lambda: 2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)  # equal length: no rank waits for another
    flat = [i for s in shards for i, _ in s]
    assert len(set(flat)) == 9 and set(flat) <= set(range(11))
    assert [i for i, _ in EpochSampler(11, 3, lambda: 2)][:9:3] == [i for i, _ in shards[0]]  # one shared permutation
    evals = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in evals for i in s) == list(range(11))  # every image once, none repeated
