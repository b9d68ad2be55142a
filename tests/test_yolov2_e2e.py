"""YOLOv2 through train.py and evaluate.py as a user runs them: the overfit preset fits its images, a run
trains, evaluates from its checkpoint and resumes (the prior-term image count travels in the checkpoint)."""

import pytest
import torch

from test_train_e2e import TINY, assert_evaluation_repeats_the_last_validation, \
    assert_overfit_preset_fits_two_images, run, run_dir

SMALL = ["model=yolov2", "input_size=[256,256]", "multiscale.sizes=null"]


@pytest.mark.slow
def test_overfit_preset_fits_two_images(tmp_path):
    assert_overfit_preset_fits_two_images(tmp_path, SMALL)


@pytest.mark.slow
def test_train_evaluate_and_resume(tmp_path):
    out = run("train.py", "model=yolov2", "input_size=[224,224]", "multiscale.sizes=[192,256]",
              "multiscale.every_n_batches=1", "trainer.max_epochs=1", run_dir(tmp_path, "run"), *TINY)
    assert "backbone darknet19: weights from random init" in out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["detector.head.images_seen"].item() == 4  # one epoch of 4 images
    out = run("evaluate.py", f"ckpt_path={ckpt}", "split=val", "num_workers=0", "trainer.accelerator=cpu",
              run_dir(tmp_path, "eval"))
    assert "VOC AP@0.5 (area)" in out and "\ncircle" in out
    # one epoch of 4 images: YOLOv2's scores (objectness x class) stay under its 0.005, no detection yet
    assert_evaluation_repeats_the_last_validation(out, tmp_path / "run", tmp_path / "eval", some_recall=False)
    run("train.py", "model=yolov2", "input_size=[224,224]", "multiscale.sizes=[192,256]",
        "multiscale.every_n_batches=1", "trainer.max_epochs=2", f"ckpt_path={ckpt}", run_dir(tmp_path, "run"), *TINY)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["detector.head.images_seen"].item() == 8
