"""Test-time augmentation (detectors/tta.py): one view is plain evaluation exactly; flipped and scaled views
map back onto the box a hand-placed object has; weighted box fusion on hand-built boxes; the per-class NMS
against torchvision's; the settings of evaluate.py and predict.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from torchvision.ops import batched_nms

import detectors  # noqa: F401  (resolvers)
from detectors.detector import Detector
from detectors.tta import DEFAULTS, TTA, per_class_nms, tta_from_config, view_size, weighted_box_fusion

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model=ssdlite", "backbone.width_mult=0.25", "input_size=[128,160]", "multiscale.sizes=null",
        "data.source.sizes={train: 2, val: 4, test: 4}", "data.num_workers=0"]


def tiny_module(*overrides: str):
    """An untrained SSDLite (MobileNetV2 x0.25, 128x160) on the shapes data, and its run config."""
    import hydra

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", *TINY, *overrides])
    with open_dict(cfg):
        cfg.data.classes = ["circle", "square", "triangle", "star", "ellipse", "cross"]  # ShapesSource's
    module = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    return module.eval(), cfg


@pytest.fixture(scope="module")
def built():
    return tiny_module()[0]


@pytest.fixture
def module(built):
    """The module's tiny SSDLite, without a TTA installed on it by an earlier test."""
    yield built
    built.__dict__.pop("predictions_in_original_frame", None)


@pytest.fixture(scope="module")
def checkpoint(built, tmp_path_factory):
    module = built
    path = tmp_path_factory.mktemp("tta") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"run_config": module.hparams.run_config}},
               path)
    return path


def hand_batch(orig=(240, 400), size=(128, 160), box=(40.0, 30.0, 100.0, 90.0)):
    """One image of ``orig`` (H0, W0) stretched to ``size``: ones inside ``box`` (original pixels, left of the
    middle, so its mirror image does not overlap it), zeros elsewhere; normalised as a module would see it."""
    sx, sy = size[1] / orig[1], size[0] / orig[0]
    x0, y0, x1, y1 = round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)
    images = torch.zeros(1, 3, *size)
    images[:, :, y0:y1, x0:x1] = 1.0
    exact = torch.tensor([[x0 / sx, y0 / sy, x1 / sx, y1 / sy]])  # where the drawn pixels lie in the original
    return {"images": images, "orig_sizes": torch.tensor([orig])}, exact


@pytest.fixture
def blob_detector(monkeypatch):
    """Every detector "detects" the pixels above 0.5 of channel 0: one box (pixel edges) of label 1 scored 0.9,
    whatever size, flip or resampling it is given: an image-dependent detector with a known answer. Returns the
    list of the sizes it was called at."""
    sizes = []

    def forward(self, images, targets=None):
        return images

    def predict(self, raw, image_size):
        sizes.append(tuple(image_size))
        out = []
        for image in raw[:, 0]:
            ys, xs = torch.nonzero(image > 0.5, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out

    monkeypatch.setattr(Detector, "forward", forward)
    monkeypatch.setattr(Detector, "predict", predict)
    return sizes


# ---- one view is plain evaluation -------------------------------------------------------------------------
def test_one_scale_without_flip_is_plain_prediction_and_its_merge_changes_nothing(checkpoint):
    from detectors.checkpoints import load_checkpoint, restore_model
    from detectors.data.dataset import collate_detection

    ckpt, run = load_checkpoint(checkpoint)
    module = restore_model(ckpt, run, checkpoint).eval()
    import hydra

    dataset = hydra.utils.instantiate(run.data).dataset("test")
    batch = module.on_after_batch_transfer(collate_detection([dataset[i] for i in range(3)]), 0)
    with torch.inference_mode():
        plain = module.predictions_in_original_frame(batch)
        tta = tta_from_config(module, {"enabled": True, "scales": [1.0], "flip": False})
        assert module.predictions_in_original_frame is tta
        one_view = module.predictions_in_original_frame(batch)
        # the merge itself on the one view: the head's NMS output at the head's IoU is a fixed point
        raw = module.detector.predict(module.detector(batch["images"]), (128, 160))
    assert sum(len(p["scores"]) for p in plain) > 0
    for p, q, r in zip(plain, one_view, raw):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(p[key], q[key])
        merged = tta.merge_views([r], 1)
        order = r["scores"].argsort(descending=True, stable=True)
        assert torch.equal(merged["scores"], r["scores"][order]) and torch.equal(merged["boxes"], r["boxes"][order])


@pytest.mark.slow
def test_evaluate_with_one_view_prints_and_writes_what_plain_evaluation_does(checkpoint, tmp_path, capsys):
    """The key check of issue 24: evaluate.py tta.enabled=true tta.scales=[1.0] tta.flip=false equals
    evaluate.py (same results file, same printed stats); tta=true itself runs and changes the results."""
    from detectors.tasks.evaluate import evaluate

    def run(out, *overrides):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"ckpt_path={checkpoint}", "num_workers=0", "batch_size=2",
                                                 "trainer.accelerator=cpu", "trainer.precision=32",
                                                 f"paths.output_dir={tmp_path / out}", "output.num_sample_images=0",
                                                 "output.error_breakdown=false", "output.analyses=false",
                                                 "output.pr_curves=false", *overrides])
        capsys.readouterr()
        metrics = evaluate(cfg)
        printed = capsys.readouterr().out
        report = printed[printed.index("test split, "):printed.index("evaluation files in")]  # not the progress bar
        return metrics, report, json.loads((tmp_path / out / "coco_results.json").read_text())

    plain_metrics, plain_report, plain = run("plain")
    one_metrics, one_report, one = run("one", "tta.enabled=true", "tta.scales=[1.0]", "tta.flip=false")
    _, _, full = run("full", "tta=true")
    assert len(plain) > 0 and one == plain and one_report == plain_report and "0." in plain_report
    assert plain_metrics.keys() == one_metrics.keys()
    assert all(torch.equal(plain_metrics[k], one_metrics[k]) for k in plain_metrics)
    assert full != plain


# ---- flip and scales map back -----------------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_a_flipped_view_maps_back_onto_the_object(module, blob_detector, merge):
    """The object left of the middle: its flipped view finds it on the right; un-flipped, it is the same box,
    so the merge gives one box, exactly the drawn one (a missing un-flip leaves two boxes, a wrong one moves it)."""
    batch, exact = hand_batch()
    tta = TTA(module, scales=[1.0], flip=True, merge=merge)
    out = tta(batch)[0]
    assert len(out["boxes"]) == 1
    torch.testing.assert_close(out["boxes"], exact, rtol=0, atol=1e-3)
    assert out["scores"].tolist() == pytest.approx([0.9])  # wbf: (0.9 + 0.9) / 2 views
    assert out["labels"].tolist() == [1]


def test_scaled_and_flipped_views_map_back_within_a_resampled_pixel(module, blob_detector):
    batch, exact = hand_batch()
    tta = TTA(module, scales=[0.5, 1.0, 1.5], flip=True, merge="wbf")
    assert [s for s, f in tta.views_of((128, 160)) if not f] == [(64, 80), (128, 160), (192, 240)]
    views = []
    original = tta.merge_views
    tta.merge_views = lambda preds, n: views.append([p["boxes"].clone() for p in preds]) or original(preds, n)
    out = tta(batch)[0]
    # each of the 6 views in the input frame: within a pixel of the view (0.5 px at scale 1.5 is 1/3 input px)
    drawn = exact * torch.tensor([160 / 400, 128 / 240] * 2)
    assert len(views[0]) == 6
    for boxes in views[0]:
        torch.testing.assert_close(boxes, drawn, rtol=0, atol=2.0)
    # the fused box in the original (2.5 original px per input px across), all six views agreeing: score 0.9
    assert len(out["boxes"]) == 1 and out["scores"].tolist() == pytest.approx([0.9])
    torch.testing.assert_close(out["boxes"], exact, rtol=0, atol=2.5)


def test_scales_round_to_the_size_divisor():
    assert view_size((300, 300), 0.83, 32) == (256, 256)  # 249 -> 7.8 x 32 -> 8 x 32
    assert view_size((300, 300), 1.17, 32) == (352, 352)  # 351 -> 11.0 x 32
    assert view_size((128, 160), 0.83, 32) == (96, 128)  # 106.2 -> 3.3 x 32; 132.8 -> 4.15 x 32
    assert view_size((100, 100), 0.1, 32) == (32, 32)  # never below one divisor


# ---- the merges against hand computation and torchvision ----------------------------------------------------
def test_weighted_box_fusion_of_hand_built_boxes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10],
                          [100, 100, 110, 110], [100, 101, 110, 111], [101, 100, 111, 110]])
    scores = torch.tensor([0.9, 0.6, 0.8, 0.5, 0.6, 0.3, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    fused, fused_scores, fused_labels = weighted_box_fusion(boxes, scores, labels, 0.55, num_views=2)
    # IoU([0,0,10,10], [1,1,11,11]) = 81 / 119 = 0.68: one cluster, (0.9 A + 0.6 B) / 1.5, scored 1.5 / 2 views;
    # the same box of another class is its own; three boxes of label 2 from two views: their mean score
    expected = torch.tensor([[0.4, 0.4, 10.4, 10.4], [50, 50, 60, 60], [100.25, 100.25, 110.25, 110.25],
                             [0, 0, 10, 10]])
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused_scores, torch.tensor([0.75, 0.4, 0.4, 0.25]))
    assert fused_labels.tolist() == [0, 0, 2, 1]
    nothing = weighted_box_fusion(boxes[:0], scores[:0], labels[:0], 0.55, num_views=2)  # no view found anything
    assert [tuple(t.shape) for t in nothing] == [(0, 4), (0,), (0,)]


def test_per_class_nms_keeps_what_torchvision_batched_nms_keeps():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 60], 1)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 4, (300,), generator=g)
    kept = per_class_nms(boxes, scores, labels, 0.5)
    assert 0 < len(kept) < 300
    assert torch.equal(kept, batched_nms(boxes, scores, labels, 0.5))
    assert len(per_class_nms(boxes[:0], scores[:0], labels[:0], 0.5)) == 0


# ---- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["evaluate", "predict"])
def test_tta_true_on_the_command_line_and_the_configs_defaults(module, config):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        off = compose(config, overrides=["ckpt_path=x"])
        on = compose(config, overrides=["ckpt_path=x", "tta=true"])
    options = OmegaConf.to_container(off.tta)
    assert options.pop("enabled") is False
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()} == DEFAULTS
    assert on.tta is True
    assert tta_from_config(module, off.tta) is None
    tta = tta_from_config(module, on.tta)
    assert tta.scales == list(DEFAULTS["scales"]) and tta.flip and tta.merge == "nms"
    assert tta.iou_threshold == module.detector.head.nms_threshold


def test_bad_settings_are_one_line_errors(module, monkeypatch, caplog):
    monkeypatch.setattr(module.detector.backbone, "_min_size", 100)  # a backbone config's min_size: 100
    for setting, words in [({"merge": "mean"}, "tta.merge must be one of nms, wbf"),
                           ({"scales": [0.0, 1.0]}, "tta.scales must be positive"),
                           ({"flips": True}, "unknown option(s) ['flips']"),
                           ({"scales": [0.5, 0.6]},
                            "no view this model takes (tta scale 0.5 of (128, 160): (64, 80) is too small"),
                           ("yes", "tta must be true, false or a mapping")]:
        with pytest.raises(ValueError) as error:
            tta_from_config(module, setting)
        assert words in str(error.value) and "\n" not in str(error.value)
    # a scale the model cannot take is left out, with the reason: the default scales serve SSD300 (>= 257 px)
    with caplog.at_level(logging.WARNING, logger="detectors.tta"):
        tta = tta_from_config(module, {"scales": [0.5, 1.0, 1.25]})
    assert [s for s, _ in tta.views_of((128, 160))] == [(128, 160), (128, 160), (160, 200), (160, 200)]
    assert "tta scale 0.5 of (128, 160): (64, 80) is too small" in caplog.text and "left out" in caplog.text


def test_predict_py_with_tta_finds_the_object_where_plain_prediction_does(checkpoint, blob_detector, tmp_path, caplog):
    """predict.py tta=true: the views are logged, and the object's box in predictions.json is the drawn one
    (original pixels), as without TTA."""
    import cv2

    from detectors.tasks.predict import predict

    image = np.zeros((240, 400, 3), np.uint8)
    image[30:90, 40:100] = 255
    cv2.imwrite(str(tmp_path / "one.png"), image)
    found = {}
    for name, overrides in (("plain", []), ("tta", ["tta=true"])):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("predict", overrides=[f"ckpt_path={checkpoint}", f"input={tmp_path / 'one.png'}",
                                                f"paths.output_dir={tmp_path / name}", "num_workers=0", "device=cpu",
                                                "precision=32", "output.images=false", *overrides])
        with caplog.at_level(logging.INFO, logger="detectors.tta"):
            predict(cfg)
        found[name] = [a["bbox"] for a in json.loads((tmp_path / name / "predictions.json").read_text())["annotations"]]
        found[name + " sizes"] = list(blob_detector)
        blob_detector.clear()
    assert found["plain sizes"] == [(128, 160)]
    assert found["tta sizes"] == [(106, 133), (106, 133), (128, 160), (128, 160), (150, 187), (150, 187)]
    # SSDLite takes any size (size divisor 1): 0.83 x (128, 160) = (106.2, 132.8), 1.17 x = (149.8, 187.2)
    assert "test-time augmentation: 6 views (H x W 106x133, 128x160, 150x187, each also flipped)" in caplog.text
    assert len(found["plain"]) == len(found["tta"]) == 1
    np.testing.assert_allclose(found["plain"][0], [40, 30, 60, 60], atol=2.5)  # 2.5 original px per input px
    np.testing.assert_allclose(found["tta"][0], [40, 30, 60, 60], atol=2.5)


@pytest.mark.slow
@pytest.mark.parametrize("model, overrides, num_views", [
    ("ssd300", ["backbone=mobilenet_v2", "input_size=[288,288]"], 4),  # 0.83 x 288 = 239 < 257: left out
    # the FC head takes its one input size: only 1.0 and its flip
    ("yolov1", ["backbone=mobilenet_v2", "input_size=[224,288]", "head.channels=64", "head.fc_width=32",
                "head.fully_connected=true"], 2),
    ("yolov2", ["backbone=mobilenet_v2", "input_size=[160,192]", "neck.channels=32"], 6),
    ("yolov3", ["backbone=mobilenet_v2", "input_size=[160,192]", "neck.channels=32"], 6),
    ("faster_rcnn", ["backbone=mobilenet_v2", "input_size=[160,192]", "head.anchor_sizes=[32,64,128]",
                     "head.rpn_channels=32", "head.fc_width=32"], 6),
])
def test_every_head_predicts_through_its_views(model, overrides, num_views):
    """An untrained model of each head (scores kept down to 0): the views it takes run, and the merged boxes
    lie in each image's original frame (stretched from 240x400 and 300x200), at most max_detections a image."""
    module, _ = tiny_module(f"model={model}", "backbone.width_mult=0.25", *overrides,
                            *([] if model == "ssd300" else ["head.score_threshold=0.0"]))
    tta = TTA(module, merge="wbf")
    size = module.input_size
    views = tta.views_of(size)
    assert len(views) == num_views and (size, True) in views
    batch = {"images": torch.randn(2, 3, *size), "orig_sizes": torch.tensor([[240, 400], [300, 200]])}
    with torch.inference_mode():
        preds = tta(batch)
    for p, (h, w) in zip(preds, [(240, 400), (300, 200)]):
        assert 0 < len(p["boxes"]) <= tta.max_detections and p["boxes"].dtype == torch.float32
        assert (p["boxes"] >= 0).all() and (p["boxes"][:, 0::2] <= w).all() and (p["boxes"][:, 1::2] <= h).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
