"""What ``evaluate.py`` writes: COCO results JSON, the ground truth scored, PR curves, a sample grid.

The callback collects from the outputs of ``validation_step``/``test_step`` (predictions and
targets in the original image frame) batch by batch, and writes the files when the epoch ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from detectors.callbacks.sample_images import class_names_of, sample_pictures
from detectors.evaluation.plots import image_grid, plot_pr_curves, save_png
from detectors.evaluation.results import coco_detections, coco_ground_truth, write_json
from detectors.evaluation.scored_detections import ScoredDetections
from detectors.evaluation.tide_report import write_error_breakdown
from detectors.evaluation.voc import VOCMeanAP
from detectors.evaluation.write_analyses import write_analyses

log = logging.getLogger(__name__)

__all__ = ["EvaluationWriter"]


def _to_cpu(items: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    return [{k: v.detach().cpu() for k, v in d.items()} for d in items]


class EvaluationWriter(L.Callback):
    """Collects one evaluation run (``trainer.validate`` or ``trainer.test``) and writes its files.

    Files in ``output_dir`` (each can be switched off):

    * ``results_file``: COCO results ``[{image_id, category_id, bbox [x, y, w, h], score}]`` in the
      original frame (ids: see :mod:`detectors.evaluation.results`).
    * ``ground_truth_file``: the ground truth that was scored, as a COCO dataset, so
      ``python -m detectors.evaluation.coco <gt> <results>`` or pycocotools reproduce the COCO stats.
    * ``pr_curves/pr_curve_<class>.png``: precision-recall at IoU 0.5 (VOC area AP) per class.
    * ``samples_file``: a grid of the first ``num_sample_images`` images with predictions and GT.
    * with ``analyses``: the confusion matrix, P/R/F1 against the threshold with the best-F1 thresholds, and
      per-image AP with the ``num_ranked_images`` lowest and highest drawn
      (:func:`detectors.evaluation.write_analyses.write_analyses` lists the files).

    Args:
        output_dir: the folder (evaluate.py: the run folder).
        category_ids: the category id of each label; None writes label + 1.
        file_names: image id -> file name, written into the ground-truth file's ``images``.
        num_sample_images: images in the grid (0: no grid).
        score_threshold: predictions above it are drawn in the grid.
        columns: images per grid row.
        pr_curves: write the PR-curve PNGs.
        results_file, ground_truth_file, samples_file: file names (None: not written).
        analyses: write the confusion matrix, threshold curves and image ranking.
        operating_threshold: the score threshold of the confusion matrix and the ranked pictures; None: the
            best-F1 threshold (all classes) of this evaluation. ``operating_threshold_source`` says where a
            given one comes from (logged and shown with it).
        num_ranked_images: images drawn at each end of the per-image AP ranking (0: none drawn).
        error_breakdown: write TIDE's dAP@0.5 per error type (``error_breakdown.csv``/``.png``,
            :mod:`detectors.evaluation.tide`) and log its summary.

    After the epoch, ``written`` maps each kind of output to its path(s), ``class_names`` holds the names of
    labels 0..C-1 and ``curves`` the precision-recall curve of each class at IoU 0.5
    (``VOCMeanAP.pr_curves()``: recall, precision, VOC area AP, GT count), whether drawn or not;
    ``analyses`` what ``write_analyses`` returned (``best_f1`` table, ``operating_threshold``, ...).
    """

    def __init__(
        self,
        output_dir: str | Path,
        category_ids: Sequence[int] | None = None,
        file_names: Mapping[int, str] | None = None,
        num_sample_images: int = 16,
        score_threshold: float = 0.3,
        columns: int = 4,
        pr_curves: bool = True,
        results_file: str | None = "coco_results.json",
        ground_truth_file: str | None = "coco_ground_truth.json",
        samples_file: str | None = "samples.png",
        analyses: bool = True,
        operating_threshold: float | None = None,
        operating_threshold_source: str = "",
        num_ranked_images: int = 10,
        error_breakdown: bool = True,
    ):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.file_names = dict(file_names) if file_names is not None else None
        self.num_sample_images = max(0, int(num_sample_images))
        self.score_threshold = score_threshold
        self.columns = columns
        self.pr_curves = pr_curves
        self.results_file = results_file
        self.ground_truth_file = ground_truth_file
        self.samples_file = samples_file
        self.analyses_enabled = analyses
        self.operating_threshold = operating_threshold
        self.operating_threshold_source = operating_threshold_source
        self.num_ranked_images = max(0, int(num_ranked_images))
        self.analyses: dict[str, Any] = {}
        self._split = "val"
        self.error_breakdown = error_breakdown
        self.tide = None  # the last TideBreakdown written
        self.written: dict[str, Path | list[Path]] = {}
        self.class_names: list[str] = []
        self.curves: list[dict] = []
        self._reset(0)

    def _reset(self, num_classes: int) -> None:
        self._detections: list[dict] = []
        self._targets: list[dict[str, Tensor]] = []
        self._image_ids: list[Tensor] = []
        self._orig_sizes: list[Tensor] = []
        self._pictures: list[Tensor] = []
        # its own metric on the CPU: the module's is reset at its epoch end, and this one has no DDP sync
        self._voc = VOCMeanAP(num_classes=num_classes, iou_threshold=0.5, use_07_metric=False) if num_classes else None
        self._scored = ScoredDetections(num_classes=num_classes) if num_classes else None

    # ---- Lightning hooks ------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        self._reset(pl_module.detector.head.num_classes)
        self.analyses, self._split = {}, split
        self.written, self.curves = {}, []
        self.class_names = list(class_names_of(pl_module))

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        if trainer.sanity_checking or not isinstance(outputs, Mapping) or "preds" not in outputs:
            return
        preds, targets = _to_cpu(outputs["preds"]), _to_cpu(outputs["targets"])
        image_ids = batch["image_ids"].detach().cpu()
        categories = self.category_ids or list(range(1, pl_module.detector.head.num_classes + 1))
        self._detections.extend(coco_detections(preds, image_ids, categories))
        self._targets.extend(targets)
        self._image_ids.append(image_ids)
        self._orig_sizes.append(batch["orig_sizes"].detach().cpu())
        self._voc.update(preds, targets)
        self._scored.update(preds, targets)
        missing = self.num_sample_images - len(self._pictures)
        if missing > 0:
            self._pictures += sample_pictures(pl_module, batch, outputs, missing, self.score_threshold)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._image_ids:
            return
        out, names = self.output_dir, self.class_names
        categories = self.category_ids or list(range(1, len(names) + 1))
        if self.results_file:
            self.written["results"] = write_json(self._detections, out / self.results_file)
        if self.ground_truth_file:
            gt = coco_ground_truth(self._targets, torch.cat(self._image_ids), torch.cat(self._orig_sizes),
                                   categories, names, self.file_names)
            self.written["ground_truth"] = write_json(gt, out / self.ground_truth_file)
        self.curves = self._voc.pr_curves()
        if self.pr_curves:
            self.written["pr_curves"] = plot_pr_curves(self.curves, names, out / "pr_curves")
        if self.samples_file and self._pictures:
            self.written["samples"] = save_png(image_grid(self._pictures, self.columns), out / self.samples_file)
        if self.error_breakdown:  # TIDE's dAP per error type, on the same COCO data as the files above
            gt = coco_ground_truth(self._targets, torch.cat(self._image_ids), torch.cat(self._orig_sizes),
                                   categories, names)
            self.tide, files = write_error_breakdown(gt, self._detections, out)
            self.written.update(files)
        if self.analyses_enabled:  # confusion matrix, P/R/F1 against the threshold, per-image AP
            self.analyses = write_analyses(
                self._scored.gathered(), names, torch.cat(self._image_ids).tolist(), out, self.operating_threshold,
                self.operating_threshold_source, self.file_names, self.num_ranked_images,
                self._picture_loader(trainer))
            self.written.update(self.analyses["written"])
        for kind, path in self.written.items():
            where = f"{len(path)} files in {path[0].parent}" if isinstance(path, list) and path else path
            log.info("wrote %s: %s", kind, where)

    def _picture_loader(self, trainer: L.Trainer):
        """image_id -> (image at network size, frame, original size), read again from the split's dataset for
        the ranked pictures; None without a datamodule that has the split's dataset."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "dataset"):
            return None
        dataset = datamodule.dataset(self._split)
        index = {int(r.image_id): i for i, r in enumerate(dataset.records)}

        def load(image_id: int):
            item = dataset[index[image_id]] if image_id in index else None
            if item is None:
                return None
            image, target = item
            return image, torch.as_tensor(target["frame"], dtype=torch.float32), torch.as_tensor(target["orig_size"])

        return load

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, outputs, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
