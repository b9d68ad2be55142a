"""VOCMeanAP against a literal transcription of the VOC devkit's ``voc_eval``.

The reference below follows py-faster-rcnn's ``voc_eval.py`` line by line
(per-image GT dict with ``det`` flags, difficult handling, a Python loop over
ranked detections) with our two documented changes: no "+1" in the IoU on our
continuous boxes (``plus_one=True`` puts it back, for the devkit's own 1-based
boxes: the VOC reader's x1 = xmin - 1 makes the two agree, tested below) and a
hit at IoU >= threshold (MATLAB devkit). Ties in score are ranked by a stable
sort in the order detections were given (image order, then order in the image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.data.formats.voc import parse_voc_xml
from detectors.evaluation.voc import VOCMeanAP, voc_ap, voc_box_iou


def devkit_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """``voc_ap`` of the devkit, verbatim."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return float(ap)


def devkit_voc_eval(preds, targets, cls: int, ovthresh: float, use_07_metric: bool, plus_one: bool = False) -> float:
    """``voc_eval`` of the devkit for one class (no +1 unless ``plus_one``, >= threshold, stable tie order);
    -1 if npos == 0."""
    one = 1.0 if plus_one else 0.0
    class_recs = {}
    npos = 0
    for i, t in enumerate(targets):
        labels = t["labels"].tolist()
        R = [j for j in range(len(labels)) if labels[j] == cls]
        bbox = t["boxes"].double().numpy()[R].reshape(-1, 4)
        diff = t.get("difficult", torch.zeros(len(labels), dtype=torch.bool)).numpy()[R].astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~diff)
        class_recs[i] = {"bbox": bbox, "difficult": diff, "det": det}
    image_ids, confidence, BB = [], [], []
    for i, p in enumerate(preds):
        for box, score, label in zip(p["boxes"].double().tolist(), p["scores"].double().tolist(), p["labels"].tolist()):
            if label == cls:
                image_ids.append(i)
                confidence.append(score)
                BB.append(box)
    confidence = np.array(confidence)
    BB = np.array(BB).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + one, 0.0)
            ih = np.maximum(iymax - iymin + one, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                   + (BBGT[:, 2] - BBGT[:, 0] + one) * (BBGT[:, 3] - BBGT[:, 1] + one) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax >= ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return -1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric)


def random_case(rng: np.random.Generator, n_images: int, n_classes: int):
    """Boxes on a coarse integer grid (exact IoU ties and IoU == 0.5 happen), rounded
    scores (ties), duplicate GT and detections, difficult flags, images without GT
    or without detections."""
    preds, targets = [], []
    for _ in range(n_images):
        n_gt = int(rng.integers(0, 7))
        xy = rng.integers(0, 8, (n_gt, 2)) * 10
        wh = rng.integers(1, 5, (n_gt, 2)) * 10
        gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        gl = rng.integers(0, n_classes, n_gt)
        dup = rng.random(n_gt) < 0.3  # identical GT pairs: equal-IoU ties go to the first one
        gt, gl = np.concatenate([gt, gt[dup]]), np.concatenate([gl, gl[dup]])
        n_gt = len(gt)
        n_det = int(rng.integers(0, 15))
        src = rng.integers(0, max(n_gt, 1), n_det)
        near = gt[src] + rng.integers(-1, 2, (n_det, 4)) * 5 if n_gt else np.zeros((n_det, 4))
        xy = rng.integers(0, 8, (n_det, 2)) * 10
        rand = np.concatenate([xy, xy + rng.integers(1, 5, (n_det, 2)) * 10], 1)
        db = np.where(rng.random((n_det, 1)) < 0.7, near, rand).astype(np.float32)
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 5)
        dl = np.where(rng.random(n_det) < 0.8, gl[src] if n_gt else 0, rng.integers(0, n_classes, n_det))
        preds.append(
            {
                "boxes": torch.from_numpy(db),
                "scores": torch.from_numpy(rng.integers(0, 6, n_det) / 5.0).float(),
                "labels": torch.from_numpy(dl).long(),
            }
        )
        targets.append(
            {
                "boxes": torch.from_numpy(gt),
                "labels": torch.from_numpy(gl).long(),
                "difficult": torch.from_numpy(rng.random(n_gt) < 0.2),
            }
        )
    return preds, targets


@pytest.mark.parametrize("use_07", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_matches_devkit_reference(seed: int, use_07: bool) -> None:
    rng = np.random.default_rng(seed)
    n_classes = 4
    preds, targets = random_case(rng, n_images=int(rng.integers(1, 12)), n_classes=n_classes)
    thr = [0.5, 0.3, 0.7][seed % 3]
    metric = VOCMeanAP(n_classes, iou_threshold=thr, use_07_metric=use_07)
    # Several update calls: the given order (and so the tie order) must survive batching.
    for s in range(0, len(preds), 3):
        metric.update(preds[s : s + 3], targets[s : s + 3])
    out = metric.compute()
    prefix = "voc07" if use_07 else "voc"
    expected = np.array([devkit_voc_eval(preds, targets, c, thr, use_07) for c in range(n_classes)])
    np.testing.assert_allclose(out[f"{prefix}_ap_per_class"].numpy(), expected, atol=1e-6)
    valid = expected > -1
    expected_map = expected[valid].mean() if valid.any() else -1.0
    assert abs(out[f"{prefix}_map_{round(100 * thr)}"].item() - expected_map) < 1e-6


def one_based_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 4)`` integer devkit boxes xmin, ymin, xmax, ymax (1-based, inclusive) on a 1..40 grid:
    one-pixel boxes (xmin == xmax), shared edges, nested and disjoint boxes all happen."""
    lo = rng.integers(1, 41, (n, 2))
    return np.concatenate([lo, lo + rng.integers(0, 12, (n, 2))], 1)


def read_as_voc_xml(boxes: np.ndarray, tmp_path: Path) -> torch.Tensor:
    """Our boxes for the devkit's integer ``boxes``: written into a VOC xml, read by the VOC reader."""
    objects = "".join(f"<object><name>a</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                      f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes.tolist())
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.xml"
    path.write_text(f"<annotation><size><width>60</width><height>60</height></size>{objects}</annotation>")
    return torch.tensor([box for _, box, _ in parse_voc_xml(path)["objects"]], dtype=torch.float32).reshape(-1, 4)


@pytest.mark.parametrize("seed", range(5))
def test_continuous_iou_equals_the_devkits_plus_one_iou_on_the_xml_boxes(seed: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(seed)
    gts, dets = one_based_boxes(rng, 30), one_based_boxes(rng, 40)
    dets[:5] = gts[:5]  # identical boxes: IoU 1, one-pixel ones included
    gts[0, 2], gts[0, 3] = gts[0, 0], gts[0, 1]
    dets[0] = gts[0]
    # the devkit (voc_eval.py), on its own 1-based inclusive boxes
    expected = np.zeros((len(dets), len(gts)))
    for d, bb in enumerate(dets.astype(float)):
        BBGT = gts.astype(float)
        ixmin = np.maximum(BBGT[:, 0], bb[0])
        iymin = np.maximum(BBGT[:, 1], bb[1])
        ixmax = np.minimum(BBGT[:, 2], bb[2])
        iymax = np.minimum(BBGT[:, 3], bb[3])
        iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
        ih = np.maximum(iymax - iymin + 1.0, 0.0)
        inters = iw * ih
        uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
               + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
        expected[d] = inters / uni
    ours_gt, ours_det = read_as_voc_xml(gts, tmp_path), read_as_voc_xml(dets, tmp_path)
    assert ours_gt[0].tolist() == [gts[0, 0] - 1, gts[0, 1] - 1, gts[0, 0], gts[0, 1]]  # a 1 x 1 box
    ours = voc_box_iou(ours_det, ours_gt[None].expand(len(dets), -1, -1))
    np.testing.assert_array_equal(ours.numpy(), expected)  # the same integers divided: bit-equal
    assert (expected == 1).sum() >= 5 and (expected == 0).any() and ((expected > 0) & (expected < 1)).any()


@pytest.mark.parametrize("seed", range(4))
def test_voc_ap_on_read_xml_boxes_equals_the_devkits_on_its_own_numbers(seed: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(seed)
    preds, targets, devkit_preds, devkit_targets = [], [], [], []
    for _ in range(6):
        gt = one_based_boxes(rng, int(rng.integers(1, 6)))
        det = np.concatenate([gt + rng.integers(-1, 2, gt.shape), one_based_boxes(rng, 3)])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2])
        gl, dl = rng.integers(0, 2, len(gt)), rng.integers(0, 2, len(det))
        scores = torch.from_numpy(rng.integers(0, 5, len(det)) / 4.0).float()
        difficult = torch.from_numpy(rng.random(len(gt)) < 0.2)
        for boxes_gt, boxes_det, p, t in ((read_as_voc_xml(gt, tmp_path), read_as_voc_xml(det, tmp_path), preds, targets),
                                          (torch.from_numpy(gt).float(), torch.from_numpy(det).float(),
                                           devkit_preds, devkit_targets)):
            p.append({"boxes": boxes_det, "scores": scores, "labels": torch.from_numpy(dl)})
            t.append({"boxes": boxes_gt, "labels": torch.from_numpy(gl), "difficult": difficult})
    metric = VOCMeanAP(2, iou_threshold=0.5)
    metric.update(preds, targets)
    expected = [devkit_voc_eval(devkit_preds, devkit_targets, c, 0.5, False, plus_one=True) for c in range(2)]
    np.testing.assert_allclose(metric.compute()["voc_ap_per_class"].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_voc_ap_function_matches_devkit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 30))
    hits = rng.random(n) < 0.5
    npos = max(int(hits.sum()) + int(rng.integers(0, 3)), 1)
    tp = np.cumsum(hits).astype(float)
    fp = np.cumsum(~hits).astype(float)
    rec, prec = tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    for use_07 in (False, True):
        ours = voc_ap(torch.from_numpy(rec), torch.from_numpy(prec), use_07)
        assert abs(ours - devkit_voc_ap(rec, prec, use_07)) < 1e-12


def _tiny_case():
    """2 GT, 3 detections: TP (0.9), FP (0.8, no overlap), TP (0.7).

    recall 0.5, 0.5, 1.0; precision 1, 1/2, 2/3.
    area AP = 0.5 * 1 + 0.5 * 2/3 = 5/6; 11-point AP = (6 * 1 + 5 * 2/3) / 11 = 28/33.
    """
    preds = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([0, 0, 0]),
        }
    ]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([0, 0])}]
    return preds, targets


def test_hand_computed_area_and_11_point_differ() -> None:
    preds, targets = _tiny_case()
    area, eleven = VOCMeanAP(1), VOCMeanAP(1, use_07_metric=True)
    area.update(preds, targets)
    eleven.update(preds, targets)
    a, e = area.compute(), eleven.compute()
    assert set(a) == {"voc_map_50", "voc_ap_per_class", "num_gt_per_class"}
    assert a["num_gt_per_class"].reshape(-1).tolist() == [2]  # torchmetrics squeezes one-element outputs
    assert set(e) == {"voc07_map_50", "voc07_ap_per_class", "num_gt_per_class"}
    assert a["voc_map_50"].item() == pytest.approx(5 / 6, abs=1e-6)
    assert e["voc07_map_50"].item() == pytest.approx(28 / 33, abs=1e-6)
    assert abs(a["voc_map_50"].item() - e["voc07_map_50"].item()) > 0.01


def test_difficult_duplicates_and_empty_classes() -> None:
    preds, targets = _tiny_case()
    # A difficult GT of class 0 hit by a detection: neither TP nor FP, npos unchanged.
    targets[0]["boxes"] = torch.cat([targets[0]["boxes"], torch.tensor([[100.0, 100, 120, 120]])])
    targets[0]["labels"] = torch.tensor([0, 0, 0])
    targets[0]["difficult"] = torch.tensor([False, False, True])
    preds[0]["boxes"] = torch.cat([preds[0]["boxes"], torch.tensor([[100.0, 100, 120, 120], [0, 0, 10, 10]])])
    preds[0]["scores"] = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])  # the 0.6 one duplicates the first TP
    preds[0]["labels"] = torch.tensor([0, 0, 0, 0, 0])
    metric = VOCMeanAP(3, class_names=["a", "b", "c"])
    metric.update(preds, targets)
    out = metric.compute()
    # ranked: ignored, TP, FP, TP, FP(dup) -> rec 0 .5 .5 1 1, prec 0 1 .5 2/3 .5: area AP still 5/6.
    assert out["voc_ap_per_class"].tolist()[0] == pytest.approx(5 / 6, abs=1e-6)
    assert out["voc_ap_per_class"].tolist()[1:] == [-1.0, -1.0]  # no GT: -1, left out of the mean
    assert out["voc_map_50"].item() == pytest.approx(5 / 6, abs=1e-6)
    assert out["voc_ap_50/a"].item() == pytest.approx(5 / 6, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*before the ``update``:UserWarning")
def test_empty_metric_and_reset() -> None:
    metric = VOCMeanAP(2)
    out = metric.compute()
    assert out["voc_map_50"].item() == -1.0
    preds, targets = _tiny_case()
    metric.update(preds, targets)
    assert metric.compute()["voc_map_50"].item() == pytest.approx(5 / 6, abs=1e-6)
    metric.reset()
    metric.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}], targets)
    assert metric.compute()["voc_map_50"].item() == 0.0  # GT but no detections
