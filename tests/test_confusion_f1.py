"""The analyses evaluation writes beyond mAP, each against a hand count or an independent tool: the
confusion matrix (hand-built cases), the class-aware matching under it (pycocotools' dtMatches), the
best-F1 threshold (hand computation), per-image AP (hand cases and VOCMeanAP on each image alone),
the files and pictures, and the best-F1 threshold training stores for ``predict.py score_threshold=auto``."""

from __future__ import annotations

import contextlib
import csv
import io
import logging

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.callbacks.best_f1_threshold import CHECKPOINT_KEY, BestF1Threshold
from detectors.evaluation.confusion import confusion_matrix
from detectors.evaluation.image_ranking import per_image_ap, ranked_images
from detectors.evaluation.scored_detections import ScoredDetections, match_at_iou50
from detectors.evaluation.threshold_curves import CSV_GRID, best_f1, best_f1_table, curves_on_grid
from detectors.evaluation.voc import VOCMeanAP
from detectors.evaluation.write_analyses import write_analyses
from detectors.tasks.predict import PredictError, score_threshold_of

A, B, C = 0, 1, 2
NAMES = ["A", "B", "C"]


def boxes(*xyxy: float) -> torch.Tensor:
    return torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)


def square(i: int, size: float = 10.0, shift: float = 0.0) -> list[float]:
    """The i-th of a row of squares 100 px apart: no two overlap, so every match is unambiguous."""
    return [100.0 * i + shift, shift, 100.0 * i + size + shift, size + shift]


def flat(preds, targets, num_classes=3):
    metric = ScoredDetections(num_classes)
    metric.update(preds, targets)
    s = metric.gathered()
    return s, match_at_iou50(s, num_classes)


def hand_case():
    """Image 0: GT A, GT B, a crowd A, a difficult C; image 1: GT C and GT B, neither found above 0.2."""
    t0 = {"boxes": boxes(*square(0), *square(1), *square(2), *square(3)), "labels": torch.tensor([A, B, A, C]),
          "iscrowd": torch.tensor([False, False, True, False]), "difficult": torch.tensor([False, False, False, True])}
    p0 = {"boxes": boxes(*square(0),            # A on GT A: TP
                         *square(0, shift=1),   # A again on GT A: a duplicate, background row
                         *square(1),            # C on GT B: B confused with C
                         *square(2),            # B on the crowd A: an FP of B, background row
                         *square(2, shift=1),   # A on the crowd A: ignored
                         *square(3),            # C on the difficult C: ignored
                         *square(5),            # B on nothing: background row
                         *square(0, shift=2)),  # A below the threshold: not counted
          "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.05]),
          "labels": torch.tensor([A, A, C, B, A, C, B, A])}
    t1 = {"boxes": boxes(*square(0), *square(1)), "labels": torch.tensor([C, B])}
    p1 = {"boxes": boxes(*square(1)), "scores": torch.tensor([0.1]), "labels": torch.tensor([B])}
    return [p0, p1], [t0, t1]


# ---- confusion matrix ---------------------------------------------------------------------------
def test_confusion_matrix_of_a_hand_built_case():
    s, m = flat(*hand_case())
    matrix = confusion_matrix(s, m, 3, score_threshold=0.2)
    expected = torch.tensor([
        # A  B  C  background (predicted)
        [1, 0, 0, 0],  # A: found; the crowd A is not counted
        [0, 0, 1, 1],  # B: taken by a C box (image 0); missed (image 1: its B box is below 0.2)
        [0, 0, 0, 1],  # C: missed (image 1); the difficult C is not counted
        [1, 2, 0, 0],  # background: the duplicate A; B on the crowd A and B on nothing
    ])
    assert torch.equal(matrix, expected)
    # rows sum to the scored GTs per class, the background column to the GTs no box found
    assert matrix[:3].sum(1).tolist() == [1, 2, 1]
    assert int(matrix[:3, 3].sum()) == 2
    # the columns count the boxes above the threshold that the metrics count: 8 boxes above 0.2, 2 ignored
    assert int(matrix.sum(0)[:3].sum()) == 7 - 2
    # at threshold 0 the B box of image 1 finds its GT: the miss moves to the diagonal
    at_zero = confusion_matrix(s, m, 3, score_threshold=0.0)
    assert at_zero[B, B] == 1 and at_zero[B, 3] == 0 and at_zero[3, A] == 2


def test_a_box_of_the_right_class_wins_over_a_higher_scored_box_of_another():
    """The metrics' true positive stays on the diagonal: GT A with a B box (0.9, IoU 1) and an A box (0.5,
    IoU 0.68). The A box is the TP; the B box then overlaps only a taken GT: background, no confusion."""
    t = {"boxes": boxes(*square(0, 20)), "labels": torch.tensor([A])}
    p = {"boxes": boxes(*square(0, 20), 0, 0, 20, 16.5), "scores": torch.tensor([0.9, 0.5]),
         "labels": torch.tensor([B, A])}
    s, m = flat([p], [t])
    assert m.tp.tolist() == [False, True]
    matrix = confusion_matrix(s, m, 3, score_threshold=0.0)
    assert matrix[A].tolist() == [1, 0, 0, 0] and matrix[3].tolist() == [0, 1, 0, 0]


def test_matching_equals_pycocotools_dtmatches_at_iou_05():
    """The true positives under the matrix and the curves are pycocotools' (IoU 0.5, area all), crowds
    included, on a random case with overlapping boxes."""
    g = torch.Generator().manual_seed(5)
    preds, targets, images, annotations, results = [], [], [], [], []
    for i in range(30):
        m = int(torch.randint(1, 7, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 200
        gt = torch.cat([xy, xy + 20 + torch.rand(m, 2, generator=g) * 60], 1)
        labels = torch.randint(0, 3, (m,), generator=g)
        crowd = torch.rand(m, generator=g) < 0.15
        half = m // 2  # a second box on half the GTs: duplicates
        det = torch.cat([gt + torch.randn(m, 4, generator=g) * 8, gt[:half] + torch.randn(half, 4, generator=g) * 4])
        wrong = torch.rand(m, generator=g) >= 0.8
        det_labels = torch.cat([torch.where(wrong, (labels + 1) % 3, labels), labels[:half]])
        scores = torch.rand(det.shape[0], generator=g)
        preds.append({"boxes": det, "scores": scores, "labels": det_labels})
        targets.append({"boxes": gt, "labels": labels, "iscrowd": crowd})
        images.append({"id": i, "height": 400, "width": 400})
        for b, c, z in zip(gt.double().tolist(), labels.tolist(), crowd.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1, "iscrowd": int(z),
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, c, sc in zip(det.double().tolist(), det_labels.tolist(), scores.double().tolist()):
            results.append({"image_id": i, "category_id": c + 1, "score": sc,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
    reference = []  # (image, category, score) of each pycocotools true positive at IoU 0.5
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        for det_id, match, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
            if match > 0 and not ignored:
                reference.append(det_id - 1)  # loadRes numbers results 1.. in the given order
    s, m = flat(preds, targets)
    ours = torch.nonzero(m.tp).squeeze(1).tolist()  # rows in the given order, as the results
    assert sorted(ours) == sorted(reference)
    assert len(ours) > 40  # a real case, not an empty one


# ---- P, R, F1 against the threshold --------------------------------------------------------------
def test_best_f1_equals_the_hand_computation():
    """4 GTs of A; boxes at 0.905 TP, 0.805 FP, 0.705 TP, 0.605 TP, 0.305 FP, 0.205 FP. F1 = 2 tp / (kept + 4):
    0.4, 0.333, 0.571, 0.75, 0.667, 0.6 -> best 0.75 keeping the first four, threshold (0.605 + 0.305) / 2."""
    t = {"boxes": boxes(*square(0), *square(1), *square(2), *square(3)), "labels": torch.tensor([A] * 4)}
    p = {"boxes": boxes(*square(0), *square(7), *square(1), *square(2), *square(8), *square(9)),
         "scores": torch.tensor([0.905, 0.805, 0.705, 0.605, 0.305, 0.205]), "labels": torch.tensor([A] * 6)}
    s, m = flat([p], [t])
    row = best_f1_table(s, m, NAMES)[A]
    assert row["threshold"] == pytest.approx(0.455)
    assert (row["f1"], row["precision"], row["recall"], row["tp"], row["fp"]) == pytest.approx((0.75, 0.75, 0.75, 3, 1))
    # the grid curve passes through the same point: at 0.45 the first four boxes are kept
    curves = curves_on_grid(s, m, 3, CSV_GRID)
    j = 45
    assert float(curves["f1"][A, j]) == pytest.approx(0.75) and int(curves["tp"][A, j]) == 3
    # a box counts at the grid thresholds below its score only: 0.605 at 0.60, not at 0.61
    assert (int(curves["tp"][A, 60]), int(curves["fp"][A, 60]), int(curves["tp"][A, 61])) == (3, 1, 2)
    assert float(curves["f1"][A, 0]) == pytest.approx(2 * 3 / (6 + 4))  # all six kept
    assert float(curves["recall"][A, 95]) == 0.0 and torch.isnan(curves["precision"][A, 95])  # nothing kept
    assert torch.isnan(curves["recall"][B]).all()  # B has no GT


def test_best_f1_never_splits_equal_scores():
    """2 GTs; 0.9 TP, 0.5 TP, 0.5 FP: keeping the first two would give F1 1, but the two 0.5 boxes go
    together: 0.667 (one box) or 0.8 (all three), at (0.5 + 0) / 2."""
    result = best_f1(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([True, True, False]), num_gt=2)
    assert result["f1"] == pytest.approx(0.8) and result["threshold"] == pytest.approx(0.25)
    assert best_f1(torch.tensor([0.9]), torch.tensor([False]), num_gt=2)["threshold"] is None


def test_all_classes_pool_every_box():
    s, m = flat(*hand_case())
    table = best_f1_table(s, m, NAMES)
    overall = table[-1]
    assert overall["class"] == "all" and overall["num_gt"] == 4
    # by hand: boxes counted in score order 0.9 TP, 0.8 FP, 0.7 FP, 0.6 FP, 0.3 FP, 0.1 TP (0.05 FP):
    # F1 after the first: 2 / (1 + 4) = 0.4, the best; threshold (0.9 + 0.8) / 2
    assert overall["f1"] == pytest.approx(0.4) and overall["threshold"] == pytest.approx(0.85)


# ---- per-image AP -------------------------------------------------------------------------------
def test_per_image_ap_perfect_all_miss_mixed_and_no_gt():
    gt = {"boxes": boxes(*square(0), *square(1)), "labels": torch.tensor([A, A])}
    perfect = {"boxes": boxes(*square(0), *square(1)), "scores": torch.tensor([0.9, 0.8]),
               "labels": torch.tensor([A, A])}
    miss = {"boxes": boxes(*square(5), *square(0)), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([A, B])}
    # FP 0.9, TP 0.8, TP 0.7: precision 1/2, 2/3 at the TPs, envelope 2/3 at both: AP 2/3
    mixed = {"boxes": boxes(*square(5), *square(0), *square(1)), "scores": torch.tensor([0.9, 0.8, 0.7]),
             "labels": torch.tensor([A, A, A])}
    empty_gt = {"boxes": boxes(), "labels": torch.zeros(0, dtype=torch.long)}
    s, m = flat([perfect, miss, mixed, perfect], [gt, gt, gt, empty_gt])
    ap, num_gt = per_image_ap(s, m, 3, 4)
    assert ap.tolist() == pytest.approx([1.0, 0.0, 2 / 3, -1.0])
    assert num_gt.tolist() == [2, 2, 2, 0]
    lowest, highest = ranked_images(ap, num_gt, 2)
    assert lowest == [1, 2] and highest == [0, 2]


def test_per_image_ap_equals_voc_ap_of_each_image_alone():
    """On separated boxes (no matching ambiguity) each image's AP is VOCMeanAP's mAP on that image alone."""
    g = torch.Generator().manual_seed(2)
    preds, targets = [], []
    for _ in range(12):
        n = int(torch.randint(1, 6, (1,), generator=g))
        gt = boxes(*sum((square(i, 30) for i in range(n)), []))
        labels = torch.randint(0, 3, (n,), generator=g)
        hit = torch.rand(n, generator=g) < 0.7
        found = gt[hit] + torch.randn(int(hit.sum()), 4, generator=g) * 3
        det = torch.cat([found, boxes(*square(8, 30), *square(9, 30))])
        preds.append({"boxes": det, "scores": torch.rand(det.shape[0], generator=g),
                      "labels": torch.cat([labels[hit], torch.randint(0, 3, (2,), generator=g)])})
        targets.append({"boxes": gt, "labels": labels})
    s, m = flat(preds, targets)
    ap, _ = per_image_ap(s, m, 3, len(preds))
    for i, (p, t) in enumerate(zip(preds, targets)):
        voc = VOCMeanAP(num_classes=3)
        present = t["labels"].unique()
        keep = torch.isin(p["labels"], present)  # the classes without GT in the image are not in its mean
        voc.update([{k: v[keep] for k, v in p.items()}], [t])
        assert float(ap[i]) == pytest.approx(float(voc.compute()["voc_map_50"]), abs=1e-6), i


# ---- the files ----------------------------------------------------------------------------------
def test_write_analyses_files(tmp_path):
    s, _ = flat(*hand_case())
    image = torch.full((3, 60, 700), 128, dtype=torch.uint8)

    def load(image_id):
        return image, torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([60, 700])

    result = write_analyses(s, NAMES, [10, 11], tmp_path, 0.2, "a test's threshold", {10: "a.jpg", 11: "b.jpg"},
                            num_ranked_images=10, load_picture=load)
    with open(result["written"]["confusion"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\predicted", "A", "B", "C", "background"]
    assert [r[0] for r in rows[1:]] == ["A", "B", "C", "background"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == result["confusion"].tolist()
    with open(result["written"]["best_f1"]) as f:
        best = {r["class"]: r for r in csv.DictReader(f)}
    assert float(best["all"]["threshold"]) == pytest.approx(0.85) and best["C"]["threshold"] == ""
    with open(result["written"]["thr_curves"]) as f:
        curve_rows = list(csv.DictReader(f))
    assert len(curve_rows) == 4 * len(CSV_GRID)
    with open(result["written"]["per_image_ap"]) as f:
        per_image = list(csv.DictReader(f))
    assert [(r["image_id"], r["file"], float(r["ap_50"])) for r in per_image] == [("10", "a.jpg", 0.5),
                                                                                 ("11", "b.jpg", 0.5)]
    for kind in ("confusion_png", "confusion_nrm", "thr_curves_png", "lowest_ap", "highest_ap"):
        assert result["written"][kind].stat().st_size > 1000, kind
    # without a given threshold the split's own best F1 (all classes) is the operating threshold
    again = write_analyses(s, NAMES, [10, 11], tmp_path / "auto")
    assert again["operating_threshold"] == pytest.approx(0.85)
    assert "this evaluation" in again["operating_threshold_source"]
    assert "lowest_ap" not in again["written"]  # no picture loader: no pictures


# ---- the threshold training stores, and predict.py score_threshold=auto ----------------------------
class FakeTrainer:
    sanity_checking = False
    current_epoch = 4
    global_step = 120


class FakeModule:
    device = torch.device("cpu")
    class_names = NAMES

    class detector:  # noqa: N801 (the attribute path the callback reads)
        class head:  # noqa: N801
            num_classes = 3


def test_best_f1_callback_stores_the_validation_threshold_in_checkpoints():
    callback = BestF1Threshold()
    trainer, module = FakeTrainer(), FakeModule()
    callback.on_validation_epoch_start(trainer, module)
    preds, targets = hand_case()
    callback.on_validation_batch_end(trainer, module, {"preds": preds[:1], "targets": targets[:1]}, None, 0)
    callback.on_validation_batch_end(trainer, module, {"preds": preds[1:], "targets": targets[1:]}, None, 1)
    callback.on_validation_epoch_end(trainer, module)
    checkpoint = {}
    callback.on_save_checkpoint(trainer, module, checkpoint)
    stored = checkpoint[CHECKPOINT_KEY]
    assert stored["threshold"] == pytest.approx(0.85) and stored["f1"] == pytest.approx(0.4)
    assert (stored["epoch"], stored["step"]) == (4, 120)
    assert stored["per_class"]["A"] == pytest.approx(0.85) and stored["per_class"]["C"] is None
    restored = BestF1Threshold()
    restored.load_state_dict(callback.state_dict())  # a resumed run keeps it until its next validation
    assert restored.value == callback.value


def test_score_threshold_auto_reads_the_stored_value(caplog):
    checkpoint = {CHECKPOINT_KEY: {"threshold": 0.4137, "f1": 0.871, "precision": 0.9, "recall": 0.84, "epoch": 11,
                                   "step": 3400, "per_class": {}}}
    with caplog.at_level(logging.INFO, logger="detectors.tasks.predict"):
        assert score_threshold_of("auto", checkpoint) == pytest.approx(0.4137)
    expected = "0.4137, the best-F1 threshold (F1 0.871, all classes) of the validation at epoch 11, step 3400"
    assert expected in caplog.text
    assert score_threshold_of(0.25, checkpoint) == 0.25
    with pytest.raises(PredictError, match="score_threshold=auto: the checkpoint stores no best-F1 threshold"):
        score_threshold_of("auto", {"state_dict": {}})
    with pytest.raises(PredictError, match="must be a number or auto"):
        score_threshold_of("high", checkpoint)


def test_empty_evaluation_writes_without_error(tmp_path):
    s, _ = flat([{"boxes": boxes(), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}],
                [{"boxes": boxes(), "labels": torch.zeros(0, dtype=torch.long)}])
    result = write_analyses(s, NAMES, [0], tmp_path)
    assert result["confusion"].sum() == 0 and result["operating_threshold"] == 0.5


# ---- end to end: training stores it, evaluate.py draws at it, predict.py score_threshold=auto uses it --------
@pytest.mark.slow
def test_fit_stores_the_threshold_evaluate_and_predict_use_it(tmp_path, monkeypatch, caplog):
    """One training batch and a validation of shapes images whose predictions are the jittered GT plus a
    wrong box (an untrained model finds nothing): the checkpoint carries that validation's best-F1 threshold,
    evaluation's confusion matrix is drawn at it (GT rows = the GT file's boxes per class), and predict.py
    score_threshold=auto keeps the boxes above it."""
    import json

    import lightning as L
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.callbacks import ModelCheckpoint

    from detectors.module import DetectionModule
    from detectors.tasks.evaluate import run_evaluation
    from detectors.tasks.predict import predict

    from test_eval_outputs import CONFIGS, build_run

    tiny = ["data.source.sizes={train: 2, val: 3, test: 3}", "data.batch_size=2", "data.eval_batch_size=2",
            "data.num_workers=0", "trainer.accelerator=cpu", "model=ssdlite", "backbone.width_mult=0.25",
            "input_size=[128,128]", "multiscale.sizes=null"]
    cfg, datamodule, module = build_run(tmp_path / "run", tiny)
    original = DetectionModule.predict_original_frame

    def noisy_truth(self, batch):
        preds, targets = original(self, batch)
        g = torch.Generator().manual_seed(int(batch["image_ids"][0]))
        preds = []
        for t in targets:
            n = len(t["labels"])
            found = torch.cat([t["boxes"] + torch.randn(n, 4, generator=g), t["boxes"][:1] + 40])
            preds.append({"boxes": found, "scores": torch.rand(n + min(n, 1), generator=g),
                          "labels": torch.cat([t["labels"], (t["labels"][:1] + 1) % 6])})
        return preds, targets

    monkeypatch.setattr(DetectionModule, "predict_original_frame", noisy_truth)
    callback = BestF1Threshold()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback, checkpoint])
    trainer.fit(module, datamodule=datamodule)
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert stored == callback.value and 0 < stored["threshold"] < 1 and stored["f1"] > 0.5
    assert (stored["epoch"], stored["step"]) == (0, 1)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[f"ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", "split=val",
                                                  "num_workers=0", "batch_size=2", "trainer.accelerator=cpu",
                                                  f"paths.output_dir={tmp_path / 'eval'}", "output.num_sample_images=0",
                                                  "output.error_breakdown=false"])
    _, writer = run_evaluation(eval_cfg, verbose=False)
    assert writer.analyses["operating_threshold"] == stored["threshold"]
    assert "checkpoint's best-F1 threshold" in writer.analyses["operating_threshold_source"]
    gt = json.loads((tmp_path / "eval" / "coco_ground_truth.json").read_text())
    gt_per_class = [sum(a["category_id"] == k + 1 for a in gt["annotations"]) for k in range(6)]
    with open(tmp_path / "eval" / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))[1:]
    assert [sum(int(v) for v in r[1:]) for r in rows[:6]] == gt_per_class and sum(gt_per_class) > 0
    for name in ("confusion_matrix.png", "threshold_curves.png", "lowest_ap_images.png", "highest_ap_images.png"):
        assert (tmp_path / "eval" / name).is_file(), name

    monkeypatch.undo()  # predict.py runs the untrained model itself
    image = tmp_path / "image.png"
    from torchvision.io import write_png

    write_png(torch.full((3, 64, 80), 90, dtype=torch.uint8), str(image))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        predict_cfg = compose("predict", overrides=[f"ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}", f"input={image}",
                                                    f"paths.output_dir={tmp_path / 'predict'}", "num_workers=0",
                                                    "device=cpu", "score_threshold=auto", "output.images=false"])
    with caplog.at_level(logging.INFO, logger="detectors.tasks.predict"):
        predict(predict_cfg)
    assert f"score_threshold=auto: {stored['threshold']:.4f}, the best-F1 threshold" in caplog.text
    assert "of the validation at epoch 0, step 1" in caplog.text
    written = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert written["score_threshold"] == pytest.approx(stored["threshold"])
