"""TIDE's error breakdown (detectors.evaluation.tide): a hand-built image per error type with its dAP
computed by hand, the ``tidecv`` package's numbers on the same seeded COCO files, and the files that
evaluate.py's writer puts beside its others."""

from __future__ import annotations

import csv
import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detectors.callbacks import EvaluationWriter
from detectors.evaluation.tide import ERROR_TYPES, tide_errors
from detectors.evaluation.tide_report import main as tide_main
from detectors.evaluation.tide_report import summary_lines

# the writer's other analyses (confusion matrix, F1 curves, image ranking) have their own tests: off here
NO_OTHER_FILES = {"analyses": False} if "analyses" in inspect.signature(EvaluationWriter).parameters else {}
GT_BOX = [0.0, 0.0, 100.0, 100.0]  # [x, y, w, h]
FAR_BOX = [300.0, 300.0, 100.0, 100.0]


def _ap_of(points: list[tuple[float, float]]) -> float:
    """COCO's 101-point AP (percent) of a monotone envelope given as (recall up to, precision) steps."""
    grid = np.arange(101) / 100
    return float(np.mean([next((p for r, p in points if x <= r), 0.0) for x in grid]) * 100)


def _dataset(gts: list[tuple[int, list[float]]], dets: list[tuple[int, list[float], float]]):
    """One image: ground truths (category, box) and detections (category, box, score) as COCO dicts."""
    gt = {"images": [{"id": 7, "width": 500, "height": 500}],
          "annotations": [{"id": i + 1, "image_id": 7, "category_id": c, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": 0} for i, (c, b) in enumerate(gts)],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    return gt, [{"image_id": 7, "category_id": c, "bbox": b, "score": s} for c, b, s in dets]


# (ground truths, detections, the error type, its count, its dAP by hand); every other type: no error, dAP 0
HAND_CASES = {
    # IoU 50 * 100 / (150 * 100) = 1/3 with a cat: no true positive (AP 0); fixed, the only GT is found (100)
    "localisation": ([(1, GT_BOX)], [(1, [50.0, 0.0, 100.0, 100.0], 0.9)], 1, 100.0),
    # a dog on the cat: cat AP 0 (its GT missed), dog AP 0 (a detection, no GT); fixed: cat 100, dog unscored
    "classification": ([(1, GT_BOX)], [(2, GT_BOX, 0.9)], 1, 100.0),
    # a dog at IoU 1/3 of the cat (neither class's box nor location): dog AP 50 (FP then TP), cat 100
    "both": ([(1, GT_BOX), (2, FAR_BOX)], [(2, [50.0, 0.0, 100.0, 100.0], 0.9), (2, FAR_BOX, 0.5),
                                            (1, GT_BOX, 0.5)], 1, 100.0 - (100.0 + 50.0) / 2),
    # a second box on the first cat ranked above the other cat: precision 1 to recall 0.5, then 2/3
    "duplicate": ([(1, GT_BOX), (1, FAR_BOX)], [(1, GT_BOX, 0.9), (1, [1.0, 1.0, 100.0, 100.0], 0.8),
                                                (1, FAR_BOX, 0.7)], 1, 100.0 - _ap_of([(0.5, 1.0), (1.0, 2 / 3)])),
    # a cat far from every GT (IoU 0) above the true one: precision 1/2 at recall 1
    "background": ([(1, GT_BOX)], [(1, FAR_BOX, 0.9), (1, GT_BOX, 0.5)], 1, 100.0 - 50.0),
    # one of two cats never detected: recall stops at 0.5; fixed (not counted), AP 100
    "missed": ([(1, GT_BOX), (1, FAR_BOX)], [(1, GT_BOX, 0.9)], 1, 100.0 - _ap_of([(0.5, 1.0)])),
}


@pytest.mark.parametrize("kind", list(HAND_CASES))
def test_each_error_type_is_found_and_fixing_it_adds_the_hand_computed_ap(kind):
    gts, dets, count, dap = HAND_CASES[kind]
    result = tide_errors(*_dataset(gts, dets))
    assert result.counts == {t: (count if t == kind else 0) for t in ERROR_TYPES}
    assert result.dap[kind] == pytest.approx(dap, abs=1e-9) and dap > 0
    assert all(result.dap[t] == 0 for t in ERROR_TYPES if t != kind)


def test_a_detection_on_a_crowd_region_is_ignored_not_an_error_of_the_ap():
    gt, dets = _dataset([(1, GT_BOX)], [(1, GT_BOX, 0.5), (1, [300.0, 300.0, 20.0, 20.0], 0.9)])
    gt["annotations"].append({"id": 9, "image_id": 7, "category_id": 1, "bbox": [290.0, 290.0, 100.0, 100.0],
                              "area": 1e4, "iscrowd": 1})
    result = tide_errors(gt, dets)
    assert result.ap == pytest.approx(100.0) and result.dap["background"] == 0  # without the crowd: AP 50


def _random_coco(seed: int, ties: bool) -> tuple[dict, list[dict]]:
    """Seeded COCO files: 40 images, 4 classes, jittered/relabelled/duplicated detections of each GT, some
    background boxes and crowd regions; ``ties``: scores rounded to 0.1, so equal scores are common."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"class{c}"} for c in (1, 2, 3, 5)]}
    dets = []
    for i in range(40):
        gt["images"].append({"id": 100 + i, "width": 320, "height": 320, "file_name": f"{i}.jpg"})
        for _ in range(rng.integers(0, 7)):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(8, 80, 2)
            c = int(rng.choice([1, 2, 3, 5]))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 100 + i, "category_id": c,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            for _ in range(rng.integers(0, 4)):
                s = rng.normal(0, rng.choice([2, 8, 25]), 4)
                label = c if rng.random() < 0.7 else int(rng.choice([1, 2, 3, 5]))
                dets.append({"image_id": 100 + i, "category_id": label, "score": float(rng.random()),
                             "bbox": [x + s[0], y + s[1], max(1.0, w + s[2]), max(1.0, h + s[3])]})
        for _ in range(rng.integers(0, 3)):
            dets.append({"image_id": 100 + i, "category_id": int(rng.choice([1, 2, 3, 5])),
                         "bbox": [*rng.uniform(0, 280, 2).tolist(), 20.0, 20.0], "score": float(rng.random())})
    if ties:
        for d in dets:
            d["score"] = round(d["score"], 1)
    return gt, dets


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-scores", "tied-scores"])
def test_matches_tidecv_on_the_same_coco_files(tmp_path, ties):
    tidecv = pytest.importorskip("tidecv", reason="tidecv (TIDE's reference code) is not installed")
    from tidecv.errors.main_errors import (
        BackgroundError, BoxError, ClassError, DuplicateError, MissedError, OtherError)

    gt, dets = _random_coco(seed=3, ties=ties)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    gt, dets = json.loads((tmp_path / "gt.json").read_text()), json.loads((tmp_path / "dt.json").read_text())
    assert len(gt["annotations"]) > 100 and len(dets) > 200
    ours = tide_errors(gt, dets)

    # tidecv.datasets.COCO needs a segmentation per annotation (evaluate.py writes boxes only): the same
    # files go in through its Data API, crowd annotations as ignore regions as its COCO loader does
    truth, preds = tidecv.Data("gt"), tidecv.Data("dt")
    for im in gt["images"]:
        truth.add_image(im["id"], im["file_name"])
    for a in gt["annotations"]:
        add = truth.add_ignore_region if a["iscrowd"] else truth.add_ground_truth
        add(a["image_id"], a["category_id"], a["bbox"])
    for d in dets:
        preds.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    tide = tidecv.TIDE()
    run = tide.evaluate(truth, preds, mode=tidecv.TIDE.BOX)
    theirs = tide.get_main_errors()["dt"]
    types = {"classification": ClassError, "localisation": BoxError, "both": OtherError,
             "duplicate": DuplicateError, "background": BackgroundError, "missed": MissedError}

    assert ours.ap == pytest.approx(run.ap, abs=1e-9)
    assert ours.counts == {t: len(run.error_dict[e]) for t, e in types.items()}
    assert {t: ours.dap[t] for t in ERROR_TYPES} == pytest.approx({t: theirs[e.short_name] for t, e in types.items()},
                                                                  abs=1e-9)
    assert all(ours.counts[t] > 0 for t in ERROR_TYPES) and sum(v > 0.1 for v in ours.dap.values()) >= 4
    # per class: the class's AP after tidecv fixes the same errors, minus its AP now
    base = {c: o.get_ap() for c, o in run.ap_data.objs.items() if not o.is_empty()}
    assert {c: a for c, a in zip(ours.class_ids, ours.class_ap)} == pytest.approx(base, abs=1e-9)
    for t, e in types.items():
        fixed = run.fix_errors(lambda err, e=e: isinstance(err, e)).objs
        expected = {c: max(fixed[c].get_ap() - base[c], 0.0) for c in base}
        assert {c: d[t] for c, d in zip(ours.class_ids, ours.class_dap)} == pytest.approx(expected, abs=1e-9)


def test_the_evaluation_writer_writes_the_breakdown_of_its_own_coco_files(tmp_path):
    """The writer's hooks with a stand-in module: the CSV's numbers are those of the COCO files beside it."""
    writer = EvaluationWriter(tmp_path, num_sample_images=0, pr_curves=False, category_ids=[1, 2], **NO_OTHER_FILES)
    module = SimpleNamespace(detector=SimpleNamespace(head=SimpleNamespace(num_classes=2)), class_names=["cat", "dog"])
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True)
    xyxy = torch.tensor([[0.0, 0.0, 100.0, 100.0], [300.0, 300.0, 400.0, 400.0]])
    outputs = {"preds": [{"boxes": torch.cat([xyxy[:1], xyxy[:1] + 200, xyxy[:1] + 50]),
                          "scores": torch.tensor([0.9, 0.3, 0.8]),
                          "labels": torch.tensor([0, 1, 0])}],
               "targets": [{"boxes": xyxy, "labels": torch.tensor([0, 0])}]}
    batch = {"image_ids": torch.tensor([4]), "orig_sizes": torch.tensor([[480, 640]])}
    writer.on_test_epoch_start(trainer, module)
    writer.on_test_batch_end(trainer, module, outputs, batch, 0)
    writer.on_test_epoch_end(trainer, module)

    expected = tide_errors(json.loads(writer.written["ground_truth"].read_text()),
                           json.loads(writer.written["results"].read_text()))
    # a TP cat (0.9), a cat at IoU 1/7 of it (0.8: localisation), a dog touching no box (background), a cat missed
    assert expected.counts == {"classification": 0, "localisation": 1, "both": 0, "duplicate": 0,
                               "background": 1, "missed": 1}
    rows = list(csv.reader(writer.written["error_breakdown"].open()))
    assert rows[0][:4] == ["class", "category_id", "gt", "ap50"] and [r[0] for r in rows[1:]] == ["all", "cat", "dog"]
    header, total = rows[0], dict(zip(rows[0], rows[1]))
    assert float(total["ap50"]) == pytest.approx(expected.ap, abs=1e-6)
    assert [float(total[f"dap_{t}"]) for t in ERROR_TYPES] == pytest.approx([expected.dap[t] for t in ERROR_TYPES],
                                                                            abs=1e-6)
    assert [int(total[f"count_{t}"]) for t in ERROR_TYPES] == [expected.counts[t] for t in ERROR_TYPES]
    assert len(header) == 4 + 2 * len(ERROR_TYPES)
    assert writer.written["error_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert writer.tide.dap == expected.dap

    off = EvaluationWriter(tmp_path / "off", num_sample_images=0, pr_curves=False, error_breakdown=False,
                           **NO_OTHER_FILES)
    off.on_test_epoch_start(trainer, module)
    off.on_test_batch_end(trainer, module, outputs, batch, 0)
    off.on_test_epoch_end(trainer, module)
    assert "error_breakdown" not in off.written and not (tmp_path / "off" / "error_breakdown.csv").exists()


def test_command_line_prints_the_summary_and_rejects_a_file_that_is_not_coco(tmp_path, capsys):
    gt, dets = _dataset(*HAND_CASES["background"][:2])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    assert tide_main([str(tmp_path / "gt.json"), str(tmp_path / "dt.json"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "mAP 50.00" in printed and "background 50.00 (1)" in printed and "cat background +50.00" in printed
    assert summary_lines(tide_errors(gt, dets))[1] in printed
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    assert tide_main([str(tmp_path / "bad.json"), str(tmp_path / "dt.json")]) == 1
    assert "COCO dataset" in capsys.readouterr().out
