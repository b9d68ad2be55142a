"""DetectionModule: the Lightning loop around a Detector (steps, optimisation, metrics)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from detectors.boxes import scale_boxes
from detectors.detector import Detector
from detectors.evaluation.coco import COCOMeanAP
from detectors.evaluation.voc import VOCMeanAP
from detectors.rng import collect_rng_state, restore_rng_state
from detectors.schedules import WarmupSchedule

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectionModule(L.LightningModule):
    """Trains and evaluates any Detector.

    Args:
        detector: backbone + neck + head.
        optimizer: a callable taking parameter groups, e.g. ``functools.partial(torch.optim.SGD, lr=...)``
            (Hydra's ``_partial_: true``). BatchNorm, bias and scale parameters get no weight decay.
        scheduler: per-step learning-rate schedule (warm-up + decay), or None.
        class_names: names of labels 0..C-1 (printed tables, logged per-class AP).
        input_size: (H, W) of the network input; evaluation maps boxes back to each image's own size.
        mean, std: input normalisation (0..1 scale); ImageNet's, so torchvision weights fit.
        channels_last: NHWC memory format, faster convolutions on tensor cores and oneDNN.
        run_config: the run's resolved configuration as YAML (a string: Hydra would instantiate a dict),
            stored in checkpoints so evaluate.py can rebuild the model.
    """

    def __init__(
        self,
        detector: Detector,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: WarmupSchedule | None = None,
        class_names: Sequence[str] = (),
        input_size: Sequence[int] = (300, 300),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = True,
        run_config: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["detector", "optimizer", "scheduler"])
        self.detector = detector
        self.optimizer_factory = optimizer
        self.schedule = scheduler
        self.class_names = list(class_names)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        num_classes = detector.head.num_classes
        if self.class_names and len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a head of {num_classes} classes")
        self.coco_map = COCOMeanAP(num_classes=num_classes)
        self.voc_map = VOCMeanAP(num_classes=num_classes, iou_threshold=0.5, use_07_metric=False)
        if channels_last:
            self.detector.to(memory_format=torch.channels_last)
        self._rng_to_restore: dict | None = None

    # ---- data on the device -------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """uint8 images travel (4x fewer bytes than float); normalise here, on the device."""
        images = (batch["images"].float() - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {**batch, "images": images}

    def forward(self, images: Tensor) -> Any:
        return self.detector(images)

    # ---- training ------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self._rng_to_restore is not None:
            # here, not at load time: the sanity check between the two draws from the RNG too
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["images"]
        raw = self.detector(images)
        losses = self.detector.loss(raw, batch, tuple(images.shape[-2:]))
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"})
        self.log("train/skipped_samples", batch["num_skipped"].float(), reduce_fx="sum", on_step=False, on_epoch=True)
        return losses["loss"]

    # ---- evaluation ----------------------------------------------------------------------
    def predict_original_frame(self, batch: dict[str, Tensor]) -> tuple[list[dict], list[dict]]:
        """Predictions and ground truth of a batch in each image's original pixel frame."""
        images = batch["images"]
        size = tuple(images.shape[-2:])
        preds = self.detector.predict(self.detector(images), size)
        orig = batch["orig_sizes"].to(torch.float32)
        targets = []
        for i, p in enumerate(preds):
            p["boxes"] = scale_boxes(p["boxes"], size, orig[i])
            m = batch["mask"][i]
            targets.append(
                {
                    "boxes": scale_boxes(batch["boxes"][i][m], size, orig[i]),
                    "labels": batch["labels"][i][m],
                    "difficult": batch["difficult"][i][m],
                }
            )
        return preds, targets

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, list[dict]]:
        """Returns predictions and ground truth in the original image frame, for callbacks
        (sample pictures, result files)."""
        preds, targets = self.predict_original_frame(batch)
        self.coco_map.update(preds, targets)
        self.voc_map.update(preds, targets)
        return {"preds": preds, "targets": targets}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, list[dict]]:
        return self.validation_step(batch, batch_idx)

    def compute_metrics(self) -> dict[str, Tensor]:
        metrics = {**self.coco_map.compute(), **self.voc_map.compute()}
        self.coco_map.reset()
        self.voc_map.reset()
        return metrics

    def _log_metrics(self, stage: str) -> None:
        metrics = self.compute_metrics()
        self.last_metrics = metrics
        scalars = {f"{stage}/{k}": v.float() for k, v in metrics.items() if v.numel() == 1}
        for name, values in metrics.items():
            if values.numel() > 1 and values.numel() == len(self.class_names):
                scalars.update({f"{stage}/{name}/{c}": v.float() for c, v in zip(self.class_names, values)})
        self.log(f"{stage}/map_50", scalars.pop(f"{stage}/map_50"), prog_bar=True)
        self.log_dict(scalars)  # metric states are synced across processes already, the values agree

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_state"] = collect_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.detector.named_parameters():
            if not p.requires_grad:
                continue
            # BN affine, biases and the L2Norm scale are 1-D: decaying them only hurts
            (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.schedule is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(self.trainer.max_epochs or 1, 1)
        scheduler = self.schedule.build(optimizer, total, max(total // epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
