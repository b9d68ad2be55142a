"""The score threshold of best F1 of each validation, stored in every checkpoint for ``predict.py
score_threshold=auto``.

After each validation epoch the callback matches the epoch's detections as the metrics do (IoU 0.5,
crowd and difficult GTs ignored) and finds the threshold of best F1 over all classes pooled
(:mod:`detectors.evaluation.threshold_curves`). Every checkpoint written after it (best.ckpt,
last.ckpt, mid-epoch ones) carries it under ``checkpoint["best_f1_threshold"]``::

    {"threshold": 0.41, "f1": 0.87, "precision": 0.9, "recall": 0.84, "epoch": 11, "step": 3400,
     "per_class": {"RBC": 0.38, ...}}

(``epoch`` 0-based as Lightning counts, ``step`` the optimizer steps done). A resumed run keeps the
last one until its next validation.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from detectors.callbacks.sample_images import class_names_of
from detectors.evaluation.scored_detections import ScoredDetections, match_at_iou50
from detectors.evaluation.threshold_curves import ALL_CLASSES, best_f1_table

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_KEY", "BestF1Threshold", "describe", "origin", "stored_threshold"]

CHECKPOINT_KEY = "best_f1_threshold"


def stored_threshold(checkpoint: dict) -> dict | None:
    """The ``best_f1_threshold`` entry of a loaded checkpoint, or None when it has none."""
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return entry if isinstance(entry, dict) and entry.get("threshold") is not None else None


def origin(entry: dict) -> str:
    """``best-F1 threshold (F1 0.871, all classes) of the validation at epoch 11, step 3400``."""
    return (f"best-F1 threshold (F1 {float(entry['f1']):.3f}, all classes) of the validation at epoch "
            f"{entry.get('epoch')}, step {entry.get('step')}")


def describe(entry: dict) -> str:
    """``0.4137, the best-F1 threshold (F1 0.871, all classes) of the validation at epoch 11, step 3400``."""
    return f"{float(entry['threshold']):.4f}, the {origin(entry)}"


class BestF1Threshold(L.Callback):
    """Finds the best-F1 score threshold of each validation and stores it in the checkpoints.

    ``value`` holds the last validation's entry (see the module docstring), or None before the first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.value: dict[str, Any] | None = None
        self._metric: ScoredDetections | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric = ScoredDetections(num_classes=pl_module.detector.head.num_classes).to(pl_module.device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or self._metric is None or not isinstance(outputs, dict) or "preds" not in outputs:
            return
        self._metric.update(outputs["preds"], outputs["targets"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric, self._metric = self._metric, None
        if trainer.sanity_checking or metric is None or not metric._update_count:
            return
        s = metric.gathered()  # every rank calls it: the DDP gather is collective
        names = class_names_of(pl_module)
        table = best_f1_table(s, match_at_iou50(s, len(names)), names)
        overall = table[-1]
        if overall["threshold"] is None:
            log.info("validation at epoch %d: no true positive at any score, no best-F1 threshold",
                     trainer.current_epoch)
            return
        self.value = {
            "threshold": overall["threshold"], "f1": overall["f1"], "precision": overall["precision"],
            "recall": overall["recall"], "epoch": int(trainer.current_epoch), "step": int(trainer.global_step),
            "per_class": {r["class"]: r["threshold"] for r in table if r["class"] != ALL_CLASSES},
        }
        log.info("best-F1 score threshold: %s", describe(self.value))

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = state_dict.get("value")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.value is not None:
            checkpoint[CHECKPOINT_KEY] = dict(self.value)
