"""COCOMeanAP against pycocotools' COCOeval (iouType="bbox"), built in memory.

pycocotools gets the same boxes (xywh from the float32 xyxy, in float64), the
same GT ``area`` and image ids 1..N in update order, so even score ties across
images resolve the same way and the stats agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.evaluation.coco import COCOMeanAP
from detectors.evaluation.voc import VOCMeanAP

STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
STAT_KEYS += ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def to_coco(preds, targets, num_classes):
    """In-memory COCO GT dataset dict and results list (image i -> id i + 1, label k -> category k + 1)."""
    anns, results = [], []
    for i, t in enumerate(targets):
        n = t["boxes"].shape[0]
        crowd = t.get("iscrowd", torch.zeros(n, dtype=torch.bool)).tolist()
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].double().tolist()):
            area = float(t["area"][j]) if "area" in t else (x2 - x1) * (y2 - y1)
            anns.append(
                {
                    "id": len(anns) + 1,  # ids from 1: pycocotools treats a match to id 0 as no match
                    "image_id": i + 1,
                    "category_id": int(t["labels"][j]) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": int(crowd[j]),
                }
            )
    for i, p in enumerate(preds):
        for (x1, y1, x2, y2), s, c in zip(p["boxes"].double().tolist(), p["scores"].double().tolist(), p["labels"].tolist()):
            results.append({"image_id": i + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    dataset = {
        "images": [{"id": i + 1} for i in range(len(targets))],
        "annotations": anns,
        "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(num_classes)],
    }
    return dataset, results


def pycoco_eval(preds, targets, num_classes, max_dets=(1, 10, 100)) -> COCOeval:
    dataset, results = to_coco(preds, targets, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def expected_stats(ev: COCOeval, max_dets) -> np.ndarray:
    """pycocotools' 12 stats; stats[0] re-read at max_dets[-1], since summarize()
    hard-codes maxDets=100 for it and prints -1 for any other last limit."""
    stats = ev.stats.copy()
    p = ev.eval["precision"][..., 0, -1]
    stats[0] = p[p > -1].mean() if (p > -1).any() else -1
    return stats


def run_metric(preds, targets, num_classes, max_dets=(1, 10, 100), batch=4, device="cpu"):
    metric = COCOMeanAP(num_classes, max_dets=max_dets).to(device)
    for s in range(0, len(preds), batch):
        to_dev = lambda ds: [{k: v.to(device) for k, v in d.items()} for d in ds]  # noqa: E731
        metric.update(to_dev(preds[s : s + batch]), to_dev(targets[s : s + batch]))
    return metric.compute()


def assert_matches(out, ev, num_classes, max_dets=(1, 10, 100)) -> None:
    keys = STAT_KEYS[:6] + [f"mar_{m}" for m in max_dets] + STAT_KEYS[9:]
    ours = np.array([out[k].item() for k in keys])
    np.testing.assert_allclose(ours, expected_stats(ev, max_dets), atol=1e-4)
    prec = ev.eval["precision"][:, :, :, 0, -1]
    rec = ev.eval["recall"][:, :, 0, -1]
    per_class = [prec[:, :, k].mean() if (prec[:, :, k] > -1).any() else -1 for k in range(num_classes)]
    per_class_ar = [rec[:, k].mean() if (rec[:, k] > -1).any() else -1 for k in range(num_classes)]
    np.testing.assert_allclose(out["map_per_class"].cpu().numpy(), per_class, atol=1e-4)
    np.testing.assert_allclose(out[f"mar_{max_dets[-1]}_per_class"].cpu().numpy(), per_class_ar, atol=1e-4)


def random_case(rng: np.random.Generator, n_images: int = 16, num_classes: int = 6, gt_classes: int = 5):
    """Random GT/detections covering the corner cases of COCOeval.

    Boxes span all three area ranges (side 2..300 px); ~10% crowd GT; 30% of GT
    areas below the box area (as COCO mask areas are); detections jitter GT
    boxes or are random; scores partly rounded (ties); some images with GT only,
    detections only, or over 100 detections; classes >= gt_classes have no GT.
    """
    preds, targets = [], []
    for i in range(n_images):
        kind = i % 8  # 0: GT only, 1: detections only, 2: >100 detections
        n_gt = 0 if kind == 1 else int(rng.integers(1 if kind == 0 else 0, 12))
        xy = rng.uniform(0, 500, (n_gt, 2))
        wh = np.exp(rng.uniform(np.log(2), np.log(300), (n_gt, 2)))
        gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        gl = rng.integers(0, gt_classes, n_gt)
        box_area = (gt[:, 2].astype(np.float64) - gt[:, 0]) * (gt[:, 3].astype(np.float64) - gt[:, 1])
        area = box_area * np.where(rng.random(n_gt) < 0.3, rng.uniform(0.4, 1.0, n_gt), 1.0)
        n_det = 0 if kind == 0 else int(rng.integers(101, 160)) if kind == 2 else int(rng.integers(0, 40))
        n_near = min(n_det, 3 * n_gt)
        src = rng.integers(0, max(n_gt, 1), n_near)
        near = gt[src] + rng.normal(0, 0.12, (n_near, 4)) * wh[src][:, [0, 1, 0, 1]] if n_gt else np.zeros((0, 4))
        near_labels = np.where(rng.random(n_near) < 0.9, gl[src], rng.integers(0, num_classes, n_near)) if n_gt else []
        xy = rng.uniform(0, 500, (n_det - n_near, 2))
        rand = np.concatenate([xy, xy + np.exp(rng.uniform(np.log(2), np.log(300), (n_det - n_near, 2)))], 1)
        det = np.concatenate([near, rand]).astype(np.float32)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        labels = np.concatenate([near_labels, rng.integers(0, num_classes, n_det - n_near)]).astype(np.int64)
        scores = rng.random(n_det)
        scores = np.where(rng.random(n_det) < 0.3, np.round(scores, 1), scores).astype(np.float32)
        preds.append({"boxes": torch.from_numpy(det), "scores": torch.from_numpy(scores), "labels": torch.from_numpy(labels)})
        targets.append(
            {
                "boxes": torch.from_numpy(gt),
                "labels": torch.from_numpy(gl),
                "iscrowd": torch.from_numpy(rng.random(n_gt) < 0.1),
                "area": torch.from_numpy(area),
            }
        )
    return preds, targets


def grid_case(rng: np.random.Generator, n_images: int = 12, num_classes: int = 3):
    """Boxes on integer grids of three scales: exact IoU ties, IoU exactly at a
    threshold, duplicate boxes, heavy score ties (5 distinct scores)."""
    preds, targets = [], []
    for _ in range(n_images):
        boxes = []
        for n in (int(rng.integers(0, 10)), int(rng.integers(0, 120))):
            s = rng.choice([4, 20, 60], size=(n, 1))
            xy = rng.integers(0, 5, (n, 2)) * s // 2
            boxes.append(np.concatenate([xy, xy + rng.integers(1, 5, (n, 2)) * s], 1).astype(np.float32))
        gt, det = boxes
        targets.append(
            {
                "boxes": torch.from_numpy(gt),
                "labels": torch.from_numpy(rng.integers(0, num_classes, len(gt))),
                "iscrowd": torch.from_numpy(rng.random(len(gt)) < 0.15),
            }
        )
        preds.append(
            {
                "boxes": torch.from_numpy(det),
                "scores": torch.from_numpy(rng.integers(0, 5, len(det)) / 4).float(),
                "labels": torch.from_numpy(rng.integers(0, num_classes, len(det))),
            }
        )
    return preds, targets


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    preds, targets = random_case(rng)
    out = run_metric(preds, targets, 6, batch=int(rng.integers(1, 6)))
    assert_matches(out, pycoco_eval(preds, targets, 6), 6)
    assert out["map_per_class"][5].item() == -1  # no GT of class 5: -1, as pycocotools


@pytest.mark.parametrize("seed,max_dets", [(0, (1, 10, 100)), (1, (1, 5, 20)), (2, (2, 3, 4)), (3, (1, 10, 100))])
def test_grid_ties_and_max_dets_match_pycocotools(seed: int, max_dets) -> None:
    preds, targets = grid_case(np.random.default_rng(100 + seed))
    out = run_metric(preds, targets, 3, max_dets=max_dets)
    assert_matches(out, pycoco_eval(preds, targets, 3, max_dets), 3, max_dets)


def test_matching_corner_cases() -> None:
    """Hand-made cases where only pycocotools' exact tie and preference rules give its numbers."""
    t = torch.tensor
    # Image 1: a regular GT (IoU 0.83) must win over a crowd GT with a higher IoU (1.0);
    # the second detection then finds the regular GT taken and lands on the crowd: ignored.
    # Image 2: D1 ties (IoU 0.8) with G1 and G2 and takes the later one, G2, so that
    # D2 (IoU 0.75 with G1, 0.4 with G2) still finds G1: two TPs instead of TP + FP.
    # Image 3: two detections inside one crowd region: both ignored, the crowd GT reused.
    preds = [
        {"boxes": t([[0.0, 0, 10, 12], [0, 0, 10, 10]]), "scores": t([0.9, 0.5]), "labels": t([0, 0])},
        {"boxes": t([[0.0, 0, 10, 10], [0, 0, 10, 6]]), "scores": t([0.8, 0.7]), "labels": t([0, 0])},
        {"boxes": t([[0.0, 0, 20, 20], [30, 30, 50, 50]]), "scores": t([0.95, 0.6]), "labels": t([0, 0])},
    ]
    targets = [
        {"boxes": t([[0.0, 0, 10, 10], [0, 0, 50, 50]]), "labels": t([0, 0]), "iscrowd": t([False, True])},
        {"boxes": t([[0.0, 0, 10, 8], [0, 2, 10, 10]]), "labels": t([0, 0])},
        {"boxes": t([[0.0, 0, 100, 100]]), "labels": t([0]), "iscrowd": t([True])},
    ]
    out = run_metric(preds, targets, 1)
    assert_matches(out, pycoco_eval(preds, targets, 1), 1)
    assert out["map_50"].item() == pytest.approx(1.0)  # every regular GT found, nothing else counted


def test_perfect_predictions() -> None:
    rng = np.random.default_rng(7)
    preds, targets = [], []
    for side in (10.0, 50.0, 200.0, 20.0):  # small, medium, large areas
        xy = torch.from_numpy(rng.uniform(0, 400, (3, 2))).float()
        boxes = torch.cat([xy, xy + side], 1)
        labels = torch.tensor([0, 1, 0])
        targets.append({"boxes": boxes, "labels": labels})
        preds.append({"boxes": boxes.clone(), "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": labels})
    out = run_metric(preds, targets, 3)
    for key in STAT_KEYS:
        if key == "mar_1":  # one detection per image and class cannot recall two GT of class 0
            continue
        assert out[key].item() == pytest.approx(1.0), key
    assert out["map_per_class"].tolist() == [1.0, 1.0, -1.0]
    assert_matches(out, pycoco_eval(preds, targets, 3), 3)


@pytest.mark.filterwarnings("ignore:.*before the ``update``:UserWarning")
def test_no_detections_and_empty_metric() -> None:
    metric = COCOMeanAP(2)
    out = metric.compute()
    assert all(out[k].item() == -1 for k in STAT_KEYS)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 100, 100]])
    metric.update(
        [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}],
        [{"boxes": boxes, "labels": torch.tensor([0, 0])}],
    )
    out = metric.compute()
    assert out["map"].item() == 0 and out["map_medium"].item() == -1 and out["map_per_class"].tolist() == [0, -1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    preds, targets = random_case(np.random.default_rng(11))
    cpu, cuda = run_metric(preds, targets, 6), run_metric(preds, targets, 6, device="cuda")
    for key, value in cpu.items():
        torch.testing.assert_close(cuda[key].cpu(), value, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_cli_matches_pycocotools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preds, targets = random_case(np.random.default_rng(3), n_images=6)
    dataset, results = to_coco(preds, targets, 6)
    # COCO files number images and categories freely: shift ids to check the mapping.
    for img in dataset["images"]:
        img["id"] += 100
    for ann in dataset["annotations"] + results:
        ann["image_id"] += 100
        ann["category_id"] *= 3
    for cat in dataset["categories"]:
        cat["id"] *= 3
    (tmp_path / "gt.json").write_text(json.dumps(dataset))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    # The `python -m` entry point, run in this interpreter (a new one spends seconds importing torch).
    argv = ["coco.py", str(tmp_path / "gt.json"), str(tmp_path / "dt.json"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with contextlib.redirect_stdout(io.StringIO()) as cli:
        runpy.run_module("detectors.evaluation.coco", run_name="__main__")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    reference = [line for line in printed.getvalue().splitlines() if line.startswith(" Average")]
    assert cli.getvalue().splitlines() == reference


def _ddp_worker(rank: int, world: int, init_file: str, preds, targets, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cut = 7  # uneven halves; contiguous so the image order (and score-tie order) is the single-process one
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        p, t = preds[part], targets[part]
        halves, voc = COCOMeanAP(6), VOCMeanAP(6)
        halves.update(p[:3], t[:3])  # several updates per rank: list states of several tensors
        halves.update(p[3:], t[3:])
        voc.update(p, t)
        rank0_only = COCOMeanAP(6)  # rank 1 never updates: its states are empty lists
        if rank == 0:
            rank0_only.update(preds, targets)
        results = {"halves": halves.compute(), "rank0_only": rank0_only.compute(), "voc": voc.compute()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*called before the ``update``:UserWarning")
def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    """Two gloo CPU processes, each with part of the images (or none): compute() on
    every rank equals the single-process result, for COCO and VOC. Spawning costs
    several seconds (each process imports torch and torchmetrics)."""
    preds, targets = random_case(np.random.default_rng(5), n_images=16)
    single = run_metric(preds, targets, 6)
    voc = VOCMeanAP(6)
    voc.update(preds, targets)
    expected = {"halves": single, "rank0_only": single, "voc": voc.compute()}
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), preds, targets, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, reference in expected.items():
            assert results[name].keys() == reference.keys()
            for key, value in reference.items():
                torch.testing.assert_close(results[name][key], value, atol=1e-6, rtol=0, msg=f"rank {rank} {name} {key}")
