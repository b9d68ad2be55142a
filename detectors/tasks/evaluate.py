"""What ``python evaluate.py`` does: rebuild the model a checkpoint was trained with, evaluate it on a
split, print the COCO stats and the per-class table, and write the result files into the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.callbacks.evaluation_writer import EvaluationWriter
from detectors.checkpoints import load_checkpoint, restore_model
from detectors.evaluation.report import format_report
from detectors.evaluation.results import category_ids_of
from detectors.noise import silence_known_noise

log = logging.getLogger(__name__)


def build_writer(cfg: DictConfig, datamodule: L.LightningDataModule, num_classes: int) -> EvaluationWriter:
    """The callback that writes ``cfg.output``'s files (results JSON, PR curves, sample grid) for ``cfg.split``."""
    out = cfg.get("output") or {}
    records = datamodule.dataset(cfg.split).records if hasattr(datamodule, "dataset") else []
    return EvaluationWriter(
        output_dir=Path(cfg.paths.output_dir),
        category_ids=category_ids_of(datamodule.source, num_classes),
        file_names={r.image_id: r.file for r in records},
        num_sample_images=out.get("num_sample_images", 16),
        score_threshold=out.get("score_threshold", 0.3),
        columns=out.get("columns", 4),
        pr_curves=out.get("pr_curves", True),
        results_file=out.get("results_file", "coco_results.json"),
        ground_truth_file=out.get("ground_truth_file", "coco_ground_truth.json"),
        samples_file=out.get("samples_file", "samples.png"),
    )


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's data or of ``cfg.data``."""
    silence_known_noise()
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
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
    datamodule = hydra.utils.instantiate(run.data)
    model = restore_model(ckpt, run, cfg.ckpt_path)

    writer = build_writer(cfg, datamodule, len(class_names))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
        enable_checkpointing=False, default_root_dir=cfg.paths.output_dir, callbacks=[writer],
    )
    if cfg.split == "val":
        trainer.validate(model, datamodule=datamodule)
    else:
        trainer.test(model, datamodule=datamodule)
    print(format_report(model.last_metrics, class_names, title=f"{cfg.split} split, {cfg.ckpt_path}"))
    print(f"evaluation files in {cfg.paths.output_dir}:")
    for kind, path in writer.written.items():
        where = f"{path[0].parent}/ ({len(path)} PNGs)" if isinstance(path, list) and path else path
        print(f"  {kind:<13} {where}")
    return model.last_metrics
