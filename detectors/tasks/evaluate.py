"""What ``python evaluate.py`` does: rebuild the model a checkpoint was trained with, evaluate it on a split."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.evaluation.report import format_report

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """Load a Lightning checkpoint of this framework and the run config stored in it, with a clear
    message for anything else (weights_only: a checkpoint cannot run code when loaded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean: not a checkpoint we can read
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    run = OmegaConf.create(config) if isinstance(config, str) else None
    if run is None or "model" not in run or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by detectors' train.py (no run config in it)")
    return ckpt, run


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
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {cfg.ckpt_path} does not fit the model its config describes: {e}") from None

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
