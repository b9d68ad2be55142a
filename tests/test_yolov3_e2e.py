"""YOLOv3 through train.py and evaluate.py as a user runs them: the overfit preset fits its images, a run
trains at several sizes, evaluates from its checkpoint and resumes."""

import ast
import re

import pytest
import torch

from detectors.checkpoints import load_checkpoint, restore_model
from test_train_e2e import TINY, assert_evaluation_repeats_the_last_validation, \
    assert_overfit_preset_fits_two_images, run, run_dir

# 192 px and the neck at a quarter of the paper's width (128: blocks of 32 / 64 / 128): small and short, and
# reliable (val mAP@0.5 1.00 from epoch 60 of the 80; BENCHMARKS.md, "YOLOv3 overfit check")
SMALL = ["model=yolov3", "input_size=[192,192]", "multiscale.sizes=null", "neck.channels=128"]


def assert_auto_anchors_stored(out: str, ckpt, rebuild: bool = True) -> None:
    """The anchors train.py logged (``anchors: configured fit ...: using k-means [[w, h], ...]`` or, resuming,
    ``anchors: restored from PATH: [[w, h], ...]``) are the checkpoint's, k-means', and (``rebuild``: 6 s) a model
    rebuilt from it as predict.py and export rebuild one (run config ``anchors: auto``: the defaults, then the
    state dict) uses them."""
    found = (re.search(r"anchors: configured fit .*: using k-means (\[\[.*\]\])", out)
             or re.search(r"anchors: restored from \S+: (\[\[.*\]\])", out))
    assert found, out[-3000:]
    logged = torch.tensor(ast.literal_eval(found.group(1)))
    checkpoint, run_config = load_checkpoint(ckpt)
    assert run_config.model.detector.head.anchors == "auto" and checkpoint["auto_anchors"]["used"] == "k-means"
    anchors = (restore_model(checkpoint, run_config, ckpt).detector.head.anchors if rebuild
               else checkpoint["state_dict"]["detector.head.chosen_anchors"])
    assert torch.allclose(anchors, logged, atol=0.006)  # the fit line rounds to 2 decimals
    assert torch.equal(anchors, torch.tensor(checkpoint["auto_anchors"]["anchors"]))
    assert not torch.allclose(anchors, torch.tensor(list(run_config.model.detector.head.default_anchors)).float())


@pytest.mark.slow
def test_overfit_preset_fits_two_images(tmp_path):
    assert_overfit_preset_fits_two_images(tmp_path, SMALL)


@pytest.mark.slow
def test_train_evaluate_and_resume(tmp_path):
    # head.anchors=auto measured at IoU 0.9, which the COCO anchors reach for few of the shapes' boxes: k-means
    # replaces them (tests/test_auto_anchors.py tests the choice itself)
    args = ["model=yolov3", "input_size=[224,224]", "multiscale.sizes=[192,256]", "multiscale.every_n_batches=1",
            "head.anchors=auto", "head.auto_anchors.iou=0.9"]
    out = run("train.py", *args, "trainer.max_epochs=1", run_dir(tmp_path, "run"), *TINY)
    assert "backbone darknet53: weights from random init" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2  # 4 images, batches of 2
    assert_auto_anchors_stored(out, ckpt)
    out = run("evaluate.py", f"ckpt_path={ckpt}", "split=val", "num_workers=0", "trainer.accelerator=cpu",
              run_dir(tmp_path, "eval"))
    assert "VOC AP@0.5 (area)" in out and "\ncircle" in out
    assert_evaluation_repeats_the_last_validation(out, tmp_path / "run", tmp_path / "eval")
    out = run("train.py", *args, "trainer.max_epochs=2", f"ckpt_path={ckpt}", run_dir(tmp_path, "run"), *TINY)
    assert "anchors: restored from" in out and "anchors: configured fit" not in out  # not computed again
    assert_auto_anchors_stored(out, ckpt, rebuild=False)
    resumed = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4  # the second epoch ran on from the first
    assert "detector.neck.blocks.0.0.conv.weight" in resumed["state_dict"]
