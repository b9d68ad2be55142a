"""What ``python evaluate.py`` does: rebuild the model a checkpoint was trained with, evaluate it on a split."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.checkpoints import check_fits, load_checkpoint
from detectors.evaluation.report import format_report

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's data or of ``cfg.data``."""
    ckpt, run = load_checkpoint(cfg.ckpt_path)
    class_names = list(run.data.classes)
    if cfg.get("data") is not None:
        # the user's data config, resolved against the run's input size and seed; labels follow the model's classes
        run = OmegaConf.merge(run, {"data": OmegaConf.to_container(cfg.data)})
        with open_dict(run):
            run.data.classes = class_names
    with open_dict(run):
        run.data.batch_size = run.data.eval_batch_size = cfg.batch_size
        run.data.num_workers = cfg.num_workers
        run.backbone.weights = None  # the checkpoint holds the weights; never download
        run.model.detector.backbone.weights = None
    datamodule = hydra.utils.instantiate(run.data)
    model = hydra.utils.instantiate(run.model, run_config=OmegaConf.to_yaml(run))
    check_fits(model, ckpt["state_dict"], cfg.ckpt_path)
    model.load_state_dict(ckpt["state_dict"])

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
        enable_checkpointing=False, default_root_dir=cfg.paths.output_dir,
    )
    if cfg.split == "val":
        trainer.validate(model, datamodule=datamodule)
    elif cfg.split == "test":
        trainer.test(model, datamodule=datamodule)
    else:
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    print(format_report(model.last_metrics, class_names, title=f"{cfg.split} split, {cfg.ckpt_path}"))
    return model.last_metrics
