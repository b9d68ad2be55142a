"""What ``python evaluate.py`` does: rebuild the model a checkpoint was trained with, evaluate it on a
split, print the COCO stats and the per-class table, and write the result files into the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.callbacks.best_f1_threshold import origin, stored_threshold
from detectors.callbacks.evaluation_writer import EvaluationWriter
from detectors.checkpoints import load_checkpoint, restore_model
from detectors.evaluation.report import format_report
from detectors.evaluation.results import category_ids_of
from detectors.evaluation.tide_report import summary_lines
from detectors.evaluation.threshold_curves import format_best_f1
from detectors.noise import silence_known_noise
from detectors.tta import tta_from_config

log = logging.getLogger(__name__)


def operating_threshold_of(setting, checkpoint: dict | None) -> tuple[float | None, str]:
    """``output.operating_threshold``: a number; or ``auto``: the checkpoint's best-F1 threshold of its last
    validation (what ``predict.py score_threshold=auto`` keeps), else None (the evaluated split's own best-F1
    threshold). Returns the threshold and where it comes from."""
    if setting is None or str(setting) == "auto":
        stored = stored_threshold(checkpoint or {})
        if stored is None:
            return None, ""
        return float(stored["threshold"]), f"the checkpoint's {origin(stored)}"
    try:
        return float(setting), "output.operating_threshold"
    except ValueError:
        raise ValueError(f"output.operating_threshold must be a number or auto, got {setting!r}") from None


def build_writer(cfg: DictConfig, datamodule: L.LightningDataModule, num_classes: int,
                 checkpoint: dict | None = None) -> EvaluationWriter:
    """The callback that writes ``cfg.output``'s files (results JSON, PR curves, sample grid, confusion matrix,
    threshold curves, image ranking) for ``cfg.split``; ``checkpoint`` gives the stored best-F1 threshold."""
    out = cfg.get("output") or {}
    threshold, source = operating_threshold_of(out.get("operating_threshold", "auto"), checkpoint)
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
        analyses=out.get("analyses", True),
        operating_threshold=threshold,
        operating_threshold_source=source,
        num_ranked_images=out.get("num_ranked_images", 10),
        error_breakdown=out.get("error_breakdown", True),
    )


def with_data(run: DictConfig, data: DictConfig) -> DictConfig:
    """The run config with the user's data config in place of its own, resolved against the run's input size
    and seed; the labels follow the model's classes. Another format's source replaces the run's whole (none of
    its keys, e.g. a COCO run's ``root``, apply to shapes or VOC); the same format's is merged into it."""
    class_names = list(run.data.classes)
    data = OmegaConf.to_container(data)
    run = run.copy()
    if (data.get("source") or {}).get("_target_") != (run.data.get("source") or {}).get("_target_"):
        with open_dict(run):
            run.data.source = None
    run = OmegaConf.merge(run, {"data": data})
    with open_dict(run):
        run.data.classes = class_names
    return run


def run_evaluation(cfg: DictConfig, verbose: bool = True) -> tuple[dict, EvaluationWriter]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's data or of ``cfg.data`` and write
    ``cfg.output``'s files into ``cfg.paths.output_dir``; returns the metrics (``DetectionModule.last_metrics``)
    and the writer (its ``written`` files and ``curves``, the VOC PR curve of each class). ``verbose``:
    Lightning's progress bar, model summary and metric table (``python -m detectors.compare`` turns them off)."""
    silence_known_noise()
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    ckpt, run = load_checkpoint(cfg.ckpt_path)
    class_names = list(run.data.classes)
    if cfg.get("data") is not None:
        run = with_data(run, cfg.data)
    with open_dict(run):
        run.data.batch_size = run.data.eval_batch_size = cfg.batch_size
        run.data.num_workers = cfg.num_workers
    datamodule = hydra.utils.instantiate(run.data)
    model = restore_model(ckpt, run, cfg.ckpt_path)
    tta_from_config(model, cfg.get("tta"))  # tta=true: flipped and scaled views, merged (detectors/tta.py)

    writer = build_writer(cfg, datamodule, len(class_names), ckpt)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision, logger=False,
        enable_checkpointing=False, default_root_dir=cfg.paths.output_dir, callbacks=[writer],
        **({} if verbose else {"enable_progress_bar": False, "enable_model_summary": False}),
    )
    if cfg.split == "val":
        trainer.validate(model, datamodule=datamodule, verbose=verbose)
    else:
        trainer.test(model, datamodule=datamodule, verbose=verbose)
    return model.last_metrics, writer


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's data or of ``cfg.data``; print the
    COCO stats and the per-class table, and where the files went."""
    metrics, writer = run_evaluation(cfg)
    print(format_report(metrics, writer.class_names, title=f"{cfg.split} split, {cfg.ckpt_path}"))
    if writer.analyses:
        print("best-F1 score thresholds at IoU 0.5 (boxes scored above the threshold are kept):")
        print(format_best_f1(writer.analyses["best_f1"]))
        print(f"confusion matrix and ranked images at score > {writer.analyses['operating_threshold']:.4f}: "
              f"{writer.analyses['operating_threshold_source']}")
    if writer.tide is not None:  # TIDE's error breakdown: the AP@0.5 that fixing each error type adds
        print("\n".join(summary_lines(writer.tide)))
    print(f"evaluation files in {cfg.paths.output_dir}:")
    for kind, path in writer.written.items():
        where = f"{path[0].parent}/ ({len(path)} PNGs)" if isinstance(path, list) and path else path
        print(f"  {kind:<13} {where}")
    return metrics
