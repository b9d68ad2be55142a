"""One log line per training epoch: what a batch job's log shows of a run's progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from torch import Tensor

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """Logs, at the end of every training epoch (rank 0), a line such as

        epoch 3/15 step 75: loss 4.213 (epoch mean), lr 0.00492, 200 images 1.2 img/s, epoch 171.5 s; val map_50 0.4320 map 0.2010

    to the console and ``train.log``. The progress bar draws nothing where the output is no terminal
    (a SLURM or nohup log, a redirected run): without this line such a log would show nothing between
    the start and the final tables. The loss is summed on the device and read once per epoch (no
    per-step sync). Under DDP the loss and image count are rank 0's. Validation figures (all ranks)
    appear on the epochs that validated.

    Args:
        val_metrics: the validation metrics to print (names after ``val/``), when logged.
    """

    def __init__(self, val_metrics: tuple[str, ...] = ("map_50", "map")):
        self.val_metrics = tuple(val_metrics)
        self._reset()

    def _reset(self) -> None:
        self._start = time.perf_counter()
        self._loss_sum: Tensor | None = None
        self._batches = 0
        self._images = 0
        self._validated = False
        self._train_end: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1
        self._images += len(batch["images"])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        end = time.perf_counter()
        train_seconds = (self._train_end or end) - self._start
        of = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""  # -1: a max_steps run
        parts = [f"epoch {trainer.current_epoch + 1}{of} step {trainer.global_step}:"]
        if self._loss_sum is not None:
            parts.append(f"loss {self._loss_sum.item() / self._batches:.4g} (epoch mean),")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g},")
        parts.append(f"{self._images} images {self._images / max(train_seconds, 1e-9):.1f} img/s, "
                     f"epoch {end - self._start:.1f} s")
        line = " ".join(parts)
        if self._validated:  # validation ran inside this epoch, before this hook
            metrics = trainer.callback_metrics
            shown = [f"{name} {float(metrics[f'val/{name}']):.4f}" for name in self.val_metrics
                     if f"val/{name}" in metrics]
            if shown:
                line += "; val " + " ".join(shown)
        log.info(line)
