"""What evaluation shows the user: COCO results JSON (checked with pycocotools), per-class AP@0.5
(against pycocotools' precision table), PR curves (hand-computed), sample pictures (pixels where the
boxes must be), the TensorBoard callback and evaluate.py's files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.io import decode_png, read_file

import detectors  # noqa: F401  (resolvers)
from detectors.callbacks import EvaluationWriter, SampleImages
from detectors.evaluation.coco import COCOMeanAP
from detectors.evaluation.plots import (
    GT_COLOR,
    GT_OUTLINE,
    class_colors,
    denormalize,
    draw_sample,
    image_grid,
    plot_pr_curves,
)
from detectors.evaluation.results import category_ids_of, coco_detections, coco_ground_truth
from detectors.evaluation.voc import VOCMeanAP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def pycocotools_eval(gt: dict, results: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))  # through JSON, as a file would be read
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def random_images(n: int, num_classes: int, seed: int = 0):
    """Predictions and targets per image in an original frame of varying size."""
    g = torch.Generator().manual_seed(seed)
    preds, targets, sizes = [], [], []
    for _ in range(n):
        h, w = (int(v) for v in torch.randint(200, 600, (2,), generator=g))
        m = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * 0.7
        gt = torch.cat([xy, xy + 10 + torch.rand(m, 2, generator=g) * 150], 1)
        labels = torch.randint(0, num_classes, (m,), generator=g)
        copies = gt + torch.randn(m, 4, generator=g) * 6
        noise_xy = torch.rand(8, 2, generator=g) * 150
        noise = torch.cat([noise_xy, noise_xy + 5 + torch.rand(8, 2, generator=g) * 100], 1)
        preds.append({"boxes": torch.cat([copies, noise]).float(), "scores": torch.rand(m + 8, generator=g),
                      "labels": torch.cat([labels, torch.randint(0, num_classes, (8,), generator=g)])})
        targets.append({"boxes": gt.float(), "labels": labels})
        sizes.append((h, w))
    return preds, targets, torch.tensor(sizes)


# ---- results JSON and per-class AP50 ---------------------------------------------------------------
class CocoLikeSource:
    category_ids = [3, 7, 90]


def test_category_ids_come_from_the_source_or_are_label_plus_one():
    assert category_ids_of(CocoLikeSource(), 3) == [3, 7, 90]
    assert category_ids_of(object(), 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="must be 4 distinct ids"):
        category_ids_of(CocoLikeSource(), 4)


def test_results_json_scored_by_pycocotools_equals_our_metric():
    preds, targets, sizes = random_images(12, 3)
    image_ids = torch.tensor([5, 9, 11, 20, 21, 30, 31, 40, 41, 50, 77, 100])  # ascending, as pycocotools sorts
    cats = category_ids_of(CocoLikeSource(), 3)
    results = coco_detections(preds, image_ids, cats)
    gt = coco_ground_truth(targets, image_ids, sizes, cats, ["a", "b", "c"], {5: "first.jpg"})

    # one entry by hand: [x, y, w, h] of the original frame, the source's category id, the score
    first = results[0]
    x1, y1, x2, y2 = preds[0]["boxes"][0].double().tolist()
    assert first["image_id"] == 5 and first["category_id"] == cats[int(preds[0]["labels"][0])]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-9)
    assert first["score"] == pytest.approx(float(preds[0]["scores"][0]))
    assert len(results) == sum(len(p["scores"]) for p in preds)
    assert gt["images"][0] == {"id": 5, "height": int(sizes[0, 0]), "width": int(sizes[0, 1]), "file_name": "first.jpg"}

    ev = pycocotools_eval(gt, results)
    metric = COCOMeanAP(num_classes=3)
    metric.update(preds, targets)
    ours = metric.compute()
    np.testing.assert_array_equal(np.float32(ev.stats), np.array([float(ours[s]) for s in STATS], np.float32))
    assert ours["map_50"] > 0.2  # the case has real matches, not a 0 == 0 comparison


def test_map_50_per_class_equals_pycocotools_precision_at_iou_05():
    import coco_eval  # benchmarks/coco_eval.py: a COCO-shaped case with crowds and non-contiguous ids

    case = coco_eval.make_case(images=60, max_gt=15, dets=40, classes=6, seed=3)
    ev = pycocotools_eval(case["gt"], case["results"])
    precision = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, every category, area all, 100 dets
    expected = [precision[:, k].mean() if (precision[:, k] > -1).any() else -1.0 for k in range(6)]
    metric = COCOMeanAP(num_classes=6)
    metric.update(case["preds"], case["targets"])
    out = metric.compute()
    np.testing.assert_allclose(out["map_50_per_class"].numpy(), expected, atol=1e-6)
    assert np.ptp(expected) > 0.01  # classes differ, so a wrong class order would show


# ---- PR curves ---------------------------------------------------------------------------------
def test_pr_curves_hand_computed_and_consistent_with_the_ap():
    # class 0: 2 GT in image 0 plus a difficult one; ranked: 0.9 TP, 0.85 on the difficult GT (not
    # counted), 0.8 FP (duplicate), 0.7 TP -> recall 0.5, 0.5, 1; precision 1, 1/2, 2/3
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float)
    target = {"boxes": gt, "labels": torch.tensor([0, 0, 0]), "difficult": torch.tensor([False, False, True])}
    pred = {"boxes": torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 9], [20, 20, 30, 31]],
                                  dtype=torch.float),
            "scores": torch.tensor([0.9, 0.85, 0.8, 0.7]), "labels": torch.tensor([0, 0, 0, 0])}
    metric = VOCMeanAP(num_classes=2)
    metric.update([pred], [target])
    curves = metric.pr_curves()
    torch.testing.assert_close(curves[0]["recall"], torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(curves[0]["precision"], torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64))
    assert curves[0]["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert curves[0]["num_gt"] == 2
    assert curves[1]["ap"] == -1 and curves[1]["recall"].numel() == 0  # no GT of class 1
    assert curves[0]["ap"] == pytest.approx(float(metric.compute()["voc_ap_per_class"][0]), abs=1e-6)


def test_pr_curve_pngs_are_written_per_class(tmp_path):
    curves = [{"recall": torch.tensor([0.5, 1.0]), "precision": torch.tensor([1.0, 0.5]), "ap": 0.75, "num_gt": 2},
              {"recall": torch.zeros(0), "precision": torch.zeros(0), "ap": -1.0, "num_gt": 0}]
    paths = plot_pr_curves(curves, ["red cell", "a/b"], tmp_path)
    assert [p.name for p in paths] == ["pr_curve_red_cell.png", "pr_curve_a_b.png"]
    for p in paths:
        image = decode_png(read_file(str(p)))
        assert image.shape[1:] == (450, 500) and image.float().std() > 10  # a drawn figure, not a blank one
    with pytest.raises(ValueError, match="2 curves for 1 class names"):
        plot_pr_curves(curves, ["one"], tmp_path)


# ---- pictures ----------------------------------------------------------------------------------
def test_boxes_are_drawn_where_the_original_frame_maps_to_the_network_image():
    image = torch.full((3, 100, 200), 128, dtype=torch.uint8)  # network size (H, W) = (100, 200)
    orig = (200, 400)  # the file was twice as large: boxes divide by 2
    target = {"boxes": torch.tensor([[40.0, 20.0, 200.0, 120.0]]), "labels": torch.tensor([0])}
    pred = {"boxes": torch.tensor([[200.0, 100.0, 360.0, 180.0], [10.0, 150.0, 60.0, 190.0]]),
            "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2])}
    out = draw_sample(image, pred, target, orig, ["a", "b", "c"], score_threshold=0.3)
    # GT -> [20, 10, 100, 60]: a black line at x=20 inside a white outline, the inside untouched
    assert out[:, 35, 20].tolist() == list(GT_COLOR)
    assert out[:, 35, 21].tolist() == list(GT_OUTLINE)
    assert out[:, 35, 60].tolist() == [128, 128, 128]
    # the kept prediction -> [100, 50, 180, 90] in class 1's colour; the 0.1 one -> [5, 75, 30, 95] is not drawn
    assert out[:, 75, 100].tolist() == list(class_colors(3)[1])
    assert out[:, 85, 5].tolist() == [128, 128, 128]
    assert out[:, 50:91, 100:181].ne(128).any() and out.shape == image.shape


def test_denormalize_undoes_the_module_normalisation():
    from detectors.backbones.base import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(denormalize((images.float() - mean) / std, mean, std), images, rtol=0, atol=0)


def test_image_grid_places_the_images_in_rows():
    images = [torch.full((3, 10, 20), v, dtype=torch.uint8) for v in (50, 100, 150)]
    grid = image_grid(images, columns=2)
    assert grid.shape == (3, 2 * 10 + 3 * 4, 2 * 20 + 3 * 4)
    assert grid[:, 4:14, 4:24].eq(50).all() and grid[:, 4:14, 28:48].eq(100).all()
    assert grid[:, 18:28, 4:24].eq(150).all()


# ---- callbacks on a real module ------------------------------------------------------------------
CONFIGS = ROOT / "configs"
TINY = ["data.source.sizes={train: 2, val: 2, test: 3}", "data.batch_size=2", "data.eval_batch_size=2",
        "data.num_workers=0", "trainer.accelerator=cpu"]


def build_run(output_dir, overrides):
    """(config, datamodule, DetectionModule) of train.py's config with ``overrides``, its classes from the data,
    the config resolved as train.py stores it in checkpoints."""
    import hydra

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])
    datamodule = hydra.utils.instantiate(cfg.data)
    with open_dict(cfg):
        cfg.data.classes = list(datamodule.classes)
    module = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    return cfg, datamodule, module


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A tiny shapes run (``build_run``), built once for this file's tests."""
    return build_run(tmp_path_factory.mktemp("run"), TINY)


def quiet_trainer(**kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_sample_images_callback_logs_the_denormalised_grid_to_tensorboard(tmp_path, shapes_run):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, datamodule, module = shapes_run
    # no prediction drawn (threshold 1): the logged picture must be the file's image with its GT
    callback = SampleImages(num_images=2, score_threshold=1.0, columns=2)
    trainer = quiet_trainer(logger=TensorBoardLogger(tmp_path, name="tb", version=""), callbacks=[callback])
    trainer.validate(module, datamodule=datamodule, verbose=False)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("val/samples")
    picture = decode_png(torch.frombuffer(bytearray(logged.encoded_image_string), dtype=torch.uint8))
    assert picture.shape == (3, 300 + 8, 2 * 300 + 12)

    images = []
    for i in range(2):
        image, t = datamodule.dataset("val")[i]
        gt = t["ground_truth"]  # the picture shows the file's own annotations, which the metrics score
        target = {"boxes": torch.from_numpy(gt.boxes), "labels": torch.from_numpy(gt.labels)}
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        images.append(draw_sample(image, empty, target, t["orig_size"], datamodule.classes))
    expected = image_grid(images, 2)
    assert (picture.int() - expected.int()).abs().max() <= 1  # float normalise/denormalise rounding

    # without a TensorBoardLogger the callback does nothing
    csv = quiet_trainer(logger=CSVLogger(tmp_path, name="csv"), callbacks=[callback], limit_val_batches=1)
    csv.validate(module, datamodule=datamodule, verbose=False)
    assert not list((tmp_path / "csv").rglob("events.out.tfevents*"))


def test_evaluation_writer_files_reproduce_the_metrics(tmp_path, shapes_run, monkeypatch):
    _, datamodule, module = shapes_run
    original = module.predict_original_frame

    def noisy_truth(batch):
        """Jittered ground truth plus one false positive per image: metrics far from 0 untrained."""
        _, targets = original(batch)
        g = torch.Generator().manual_seed(int(batch["image_ids"][0]))
        preds = []
        for t in targets:
            n = len(t["labels"])
            boxes = torch.cat([t["boxes"] + torch.randn(n, 4, generator=g) * 3, t["boxes"][:1] + 40])
            preds.append({"boxes": boxes, "scores": torch.rand(n + min(n, 1), generator=g),
                          "labels": torch.cat([t["labels"], t["labels"][:1]])})
        return preds, targets

    monkeypatch.setattr(module, "predict_original_frame", noisy_truth)
    writer = EvaluationWriter(tmp_path / "out", num_sample_images=3, score_threshold=0.5, columns=2)
    quiet_trainer(logger=False, callbacks=[writer]).test(module, datamodule=datamodule, verbose=False)

    results = json.loads(writer.written["results"].read_text())
    gt = json.loads(writer.written["ground_truth"].read_text())
    assert {r["category_id"] for r in results} <= set(range(1, 7))  # shapes: label + 1
    assert [im["id"] for im in gt["images"]] == [0, 1, 2]
    ev = pycocotools_eval(gt, results)
    ours = module.last_metrics
    np.testing.assert_array_equal(np.float32(ev.stats), np.array([float(ours[s]) for s in STATS], np.float32))
    assert ours["map_50"] > 0.3

    assert [p.name for p in writer.written["pr_curves"]] == [f"pr_curve_{c}.png" for c in datamodule.classes]
    grid = decode_png(read_file(str(writer.written["samples"])))
    assert grid.shape == (3, 2 * 300 + 12, 2 * 300 + 12)  # 3 pictures, 2 per row


@pytest.mark.slow
def test_evaluate_py_writes_its_files_into_the_run_folder(tmp_path, shapes_run):
    cfg, _, module = shapes_run
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"run_config": module.hparams.run_config}},
               ckpt)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt_path={ckpt}", "split=val", "num_workers=0", "batch_size=2",
         "trainer.accelerator=cpu", "output.num_sample_images=2", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "eval"
    assert f"evaluation files in {run}" in out and "COCO AP@0.5" in out
    results = json.loads((run / "coco_results.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    gt = json.loads((run / "coco_ground_truth.json").read_text())
    assert [c["name"] for c in gt["categories"]] == list(cfg.data.classes)
    assert len(list((run / "pr_curves").glob("pr_curve_*.png"))) == len(cfg.data.classes)
    assert decode_png(read_file(str(run / "samples.png"))).shape == (3, 300 + 8, 2 * 300 + 12)

    # the printed numbers are those of the same weights validated here on the same split, and pycocotools
    # gives them on the files evaluate.py wrote
    from tests.test_train_e2e import printed_report, pycocotools_stats_of

    _, datamodule, _ = shapes_run
    quiet_trainer(logger=False).validate(module, datamodule=datamodule, verbose=False)
    here = {k: float(v) for k, v in module.last_metrics.items() if v.numel() == 1}
    stats, table = printed_report(out)
    assert stats == pytest.approx({k: here[k] for k in stats}, abs=5e-4)
    assert [row[0] for row in table.values()] == module.last_metrics["num_gt_per_class"].tolist()
    reference = pycocotools_stats_of(run)
    assert reference == pytest.approx({k: here[k] for k in STATS}, abs=1e-6)  # untrained: 0 (the GT counts are not)


def test_evaluate_on_another_format_takes_its_source_whole():
    """evaluate.py data=...: a COCO run evaluated on shapes gets shapes' source without COCO's keys (root, splits:
    ShapesSource would refuse them); a VOC run given another root reads that root; the labels stay the model's
    classes either way."""
    import hydra

    from detectors.tasks.evaluate import with_data

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        coco_run = compose("train", overrides=["data=coco", "data.root=/coco", "data.classes=[a,b]"])
        shapes = compose("evaluate", overrides=["ckpt_path=x", "data=shapes"]).data
        voc_run = compose("train", overrides=["data=voc", "data.root=/voc", "data.classes=[a,b]"])
        voc = compose("evaluate", overrides=["ckpt_path=x", "data=voc", "data.root=/other"]).data
    run = with_data(coco_run, shapes)
    assert run.data.source._target_ == shapes.source._target_ and "root" not in run.data.source
    assert list(run.data.classes) == ["a", "b"] and coco_run.data.source.root == "/coco"  # the run's own untouched
    source = hydra.utils.instantiate(OmegaConf.merge(run.data.source, {"sizes": {"train": 1, "val": 1, "test": 1}}))
    assert type(source).__name__ == "ShapesSource"
    run = with_data(voc_run, voc)
    assert run.data.source.root == "/other" and list(run.data.classes) == ["a", "b"]
