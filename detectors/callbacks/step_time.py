"""Where a training step's time goes: data wait, forward, target assignment, loss, backward, optimizer."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import lightning as L

from detectors.timing import RECORDER, synchronize

log = logging.getLogger(__name__)

STAGES = ("data_wait", "forward", "assign", "loss", "backward", "optimizer")


class StepTimeBreakdown(L.Callback):
    """Times each training step in stages and logs the mean milliseconds (``time/<stage>_ms``)
    every ``every_n_steps`` steps, also printing a one-line table.

    forward = forward pass + loss computation minus the head's ``assign`` and ``loss`` stages;
    optimizer = everything after backward up to the end of the step (step, zero_grad, logging).
    The GPU is synchronised at every edge, which costs a little throughput: switch it on to look,
    not for production runs (``+callbacks.step_time._target_=detectors.callbacks.step_time.StepTimeBreakdown``).
    """

    def __init__(self, every_n_steps: int = 50, skip_first: int = 5):
        self.every_n_steps = every_n_steps
        self.skip_first = skip_first
        self._sums: dict[str, float] = defaultdict(float)
        self._steps = 0
        self._last_end: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RECORDER.enabled = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RECORDER.enabled = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        synchronize()
        self._start = time.perf_counter()
        self._wait = self._start - self._last_end if self._last_end is not None else 0.0
        RECORDER.take()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        synchronize()
        self._forward_end = time.perf_counter()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize()
        self._backward_end = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        synchronize()
        end = time.perf_counter()
        self._last_end = end
        if not hasattr(self, "_backward_end") or trainer.global_step <= self.skip_first:
            return  # warm-up steps (allocator, cudnn autotuning) would dominate the means
        inner = RECORDER.take()
        step = {
            "data_wait": self._wait,
            "forward": self._forward_end - self._start - inner.get("assign", 0.0) - inner.get("loss", 0.0),
            "assign": inner.get("assign", 0.0),
            "loss": inner.get("loss", 0.0),
            "backward": self._backward_end - self._forward_end,
            "optimizer": end - self._backward_end,
        }
        for k, v in step.items():
            self._sums[k] += v
        self._steps += 1
        if self._steps % self.every_n_steps == 0:
            self.report(pl_module)

    def means_ms(self) -> dict[str, float]:
        return {k: 1000 * self._sums[k] / max(self._steps, 1) for k in STAGES}

    def report(self, pl_module: L.LightningModule) -> None:
        means = self.means_ms()
        total = sum(means.values())
        log.info("step time (ms, mean of %d steps): %s | total %.1f", self._steps,
                 "  ".join(f"{k} {v:.1f} ({100 * v / max(total, 1e-9):.0f}%)" for k, v in means.items()), total)
        pl_module.log_dict({f"time/{k}_ms": v for k, v in means.items()})
        self._sums.clear()
        self._steps = 0
