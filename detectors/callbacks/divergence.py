"""Catch a non-finite loss at the step where it happens, name the images, skip the step or stop."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or its gradients are not finite."""


class DivergenceGuard(L.Callback):
    """Checks every training step for a non-finite loss or gradient before the optimizer steps.

    Args:
        action: 'skip' (drop the step: gradients are discarded, weights and optimizer state stay as
            they were, training goes on) or 'stop' (raise NonFiniteLossError, which ends the run; a
            sweep records the trial as failed).
        max_skips: stop anyway after this many skipped steps in a run (a model that keeps
            diverging is not going to recover).

    The warning names the step, the loss terms and the batch's image ids, so the offending samples
    can be looked at. Mixed precision with a GradScaler (16-mixed) handles its own overflow;
    this guard sees only what survives unscaling.
    """

    def __init__(self, action: str = "skip", max_skips: int = 100):
        if action not in ("skip", "stop"):
            raise ValueError(f"action must be 'skip' or 'stop', got {action!r}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self._image_ids: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        # the tensor, read only when reporting: .tolist() here would wait for the GPU at every step
        self._image_ids = batch["image_ids"] if isinstance(batch, dict) and "image_ids" in batch else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # one fused reduction and one host sync per step
        total = torch.stack(torch._foreach_norm(grads)).sum()
        if torch.isfinite(total):
            return
        terms = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        message = (
            f"non-finite loss or gradient at epoch {trainer.current_epoch} step {trainer.global_step} "
            f"(last logged {terms}); image ids of the batch: "
            f"{self._image_ids.tolist() if self._image_ids is not None else []}"
        )
        if self.action == "stop" or self.skipped >= self.max_skips:
            raise NonFiniteLossError(message + ("" if self.action == "stop" else f"; {self.skipped} steps skipped already"))
        self.skipped += 1
        log.warning("%s: step skipped (%d so far)", message, self.skipped)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient untouched
