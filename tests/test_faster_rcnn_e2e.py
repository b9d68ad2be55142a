"""Faster R-CNN through train.py and evaluate.py as a user runs them: the overfit preset fits its images, a run
trains, evaluates from its checkpoint and resumes, and BCCD trains from each data format."""

import pytest
import torch

from test_train_e2e import (TEXTURED_SHAPES, TINY, assert_evaluation_repeats_the_last_validation,
                            assert_fast_dev_run_trained_and_validated, read_metrics, run, run_dir)

# MobileNetV2's stride-16 map (VGG16 and its fc6 of 4096 are minutes a step here), anchors for 256 px
SMALL = ["model=faster_rcnn", "backbone=mobilenet_v2", "input_size=[256,256]", "head.anchor_sizes=[32,64,128]",
         "head.fc_width=256", "head.rpn_channels=128", "head.roi_batch_size=128"]


@pytest.mark.slow
def test_overfit_preset_fits_two_images(tmp_path):
    """120 steps: the training-mode fit is there by step 60 or so, but the backbone's BatchNorm running statistics
    trail weights that move this fast, and the fc layers of the RoI head, fitted to two images, follow any shift
    of their features; evaluation (running statistics) catches up once the cosine schedule has slowed the weights
    (a 160 px pilot: eval mAP@0.5 0 at step 60, 1.0 from step 110; with its BN statistics refreshed, 0.96 at 60)."""
    run("train.py", *SMALL, *TEXTURED_SHAPES, "debug=overfit", "trainer.overfit_batches=1", "data.batch_size=2",
        "optimizer=adamw",
        "optimizer.lr=0.001", "trainer.max_epochs=120", "trainer.check_val_every_n_epoch=40",
        run_dir(tmp_path, "overfit"))
    rows = read_metrics(tmp_path / "overfit")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/map_50"]) for r in rows if r.get("val/map_50")]
    assert len(losses) == 120 and losses[-1] < 0.2 * losses[0], losses[::10]
    assert val[-1] >= 0.9, (val, losses[::10])


@pytest.mark.slow
def test_train_evaluate_and_resume(tmp_path):
    out = run("train.py", *SMALL, "trainer.max_epochs=1", run_dir(tmp_path, "run"), *TINY)
    assert "backbone mobilenet_v2: weights from random init" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and "detector.head.roi_head.fc6.weight" in state["state_dict"]
    out = run("evaluate.py", f"ckpt_path={ckpt}", "split=val", "num_workers=0", "trainer.accelerator=cpu",
              run_dir(tmp_path, "eval"))
    assert "VOC AP@0.5 (area)" in out and "\ncircle" in out
    # one epoch of 4 images: detections, none of them right yet (every stat 0)
    assert_evaluation_repeats_the_last_validation(out, tmp_path / "run", tmp_path / "eval", some_recall=False)
    run("train.py", *SMALL, "trainer.max_epochs=2", f"ckpt_path={ckpt}", run_dir(tmp_path, "run"), *TINY)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 1


# the quick tier's Faster R-CNN run of train.py, on BCCD's VOC folder. The COCO and YOLO layouts go through
# train.py in test_train_e2e's BCCD runs (SSD300, slow tier): a format is the data path's, not the head's,
# and CI runs one end-to-end run per head, not per option
def test_fast_dev_run_on_bccd(tmp_path, bccd_root):
    out = run("train.py", *SMALL, "data=voc", f"data.root={bccd_root}", "debug=fast_dev_run", "data.batch_size=2",
              "data.eval_batch_size=2", "data.num_workers=0", run_dir(tmp_path, "bccd"))
    assert "classes (label order): ['Platelets', 'RBC', 'WBC']" in out
    assert_fast_dev_run_trained_and_validated(out, tmp_path / "bccd")
