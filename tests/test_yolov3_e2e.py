"""YOLOv3 through train.py and evaluate.py as a user runs them: the overfit preset fits its images, a run
trains at several sizes, evaluates from its checkpoint and resumes."""

import pytest
import torch

from test_train_e2e import TEXTURED_SHAPES, TINY, assert_evaluation_repeats_the_last_validation, read_metrics, \
    run, run_dir

# 256 px and the neck at a quarter of the paper's width (128: blocks of 32 / 64 / 128): small and short, and
# reliable (2-3 min on one shared CPU thread, 2026-12-04; seed 1: val mAP@0.5 0.33 / 0.95 / 1.00 after
# 40 / 60 / 80 epochs; BENCHMARKS.md)
SMALL = ["model=yolov3", "input_size=[256,256]", "multiscale.sizes=null", "neck.channels=128"]


@pytest.mark.slow
def test_overfit_preset_fits_two_images(tmp_path):
    out = run("train.py", *SMALL, *TEXTURED_SHAPES, "debug=overfit", "trainer.overfit_batches=1", "data.batch_size=2",
              "trainer.max_epochs=80", "trainer.check_val_every_n_epoch=80", run_dir(tmp_path, "overfit"))
    rows = read_metrics(tmp_path / "overfit")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/map_50"]) for r in rows if r.get("val/map_50")]
    assert len(losses) == 80 and losses[-1] < 0.3 * losses[0], out[-3000:]
    assert val[-1] >= 0.9, (val, losses[::10])


def test_train_evaluate_and_resume(tmp_path):
    args = ["model=yolov3", "input_size=[224,224]", "multiscale.sizes=[192,256]", "multiscale.every_n_batches=1"]
    out = run("train.py", *args, "trainer.max_epochs=1", run_dir(tmp_path, "run"), *TINY)
    assert "backbone darknet53: weights from random init" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2  # 4 images, batches of 2
    out = run("evaluate.py", f"ckpt_path={ckpt}", "split=val", "num_workers=0", "trainer.accelerator=cpu",
              run_dir(tmp_path, "eval"))
    assert "VOC AP@0.5 (area)" in out and "\ncircle" in out
    assert_evaluation_repeats_the_last_validation(out, tmp_path / "run", tmp_path / "eval")
    run("train.py", *args, "trainer.max_epochs=2", f"ckpt_path={ckpt}", run_dir(tmp_path, "run"), *TINY)
    resumed = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4  # the second epoch ran on from the first
    assert "detector.neck.blocks.0.0.conv.weight" in resumed["state_dict"]
