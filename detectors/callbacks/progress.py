"""Lightning's RichProgressBar, made to start on Lightning < 2.5.3 with rich >= 14.1, and to show
the training loss without reading it to the host at every step."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar as _LightningRichProgressBar
from packaging.version import Version
from rich.console import Console

from detectors.time_budget import format_duration

# Lightning < 2.5.3 calls Console.clear_live() with no live display when a progress bar starts; since
# rich 14.1 (a stack of live displays) that raises "IndexError: pop from empty list" (Lightning PR #21016)
_NEEDS_SHIM = Version(version("lightning")) < Version("2.5.3")


class RichProgressBar(_LightningRichProgressBar):
    """Same bar, which also shows ``step_metrics`` (logged without ``prog_bar``) read every few steps.

    A metric logged with ``prog_bar=True`` is converted to a Python number by Lightning after every
    batch, which on a GPU waits for the step to finish: a host sync per step. The training module
    logs its loss without it; this bar reads the loss from ``trainer.callback_metrics`` (a tensor on
    the device) only every ``every_n_steps`` optimizer steps and at the end of an epoch, and shows
    the last value it read in between.

    Args:
        step_metrics: names of logged per-step metrics to show.
        every_n_steps: steps between reads; None: the trainer's ``log_every_n_steps``, the steps at
            which the loggers read the logged values to the host anyway (so the bar adds no sync
            of its own there).
        *args, **kwargs: Lightning's RichProgressBar's (``refresh_rate`` is redraws per second).

    On an old Lightning its start skips ``clear_live()`` when there is no live display to clear.
    """

    def __init__(self, *args: Any, step_metrics: Sequence[str] = ("train/loss",), every_n_steps: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_metrics = tuple(step_metrics)
        self.every_n_steps = every_n_steps
        self._shown: dict[str, float] = {}
        self._read_at: int | None = None  # the global step of the last read

    def _init_progress(self, trainer) -> None:
        if not _NEEDS_SHIM:
            return super()._init_progress(trainer)
        clear_live = Console.clear_live

        def clear_if_live(console: Console) -> None:
            if getattr(console, "_live_stack", None) != []:  # rich < 14.1 has no stack: clear as before
                clear_live(console)

        Console.clear_live = clear_if_live
        try:
            super()._init_progress(trainer)
        finally:
            Console.clear_live = clear_live

    def _read_step_metrics(self, trainer: L.Trainer) -> None:
        """The step metrics as host numbers (a host sync: called every ``every_n_steps`` only)."""
        self._read_at = trainer.global_step
        metrics = trainer.callback_metrics
        self._shown = {name: float(metrics[name]) for name in self.step_metrics if name in metrics}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.is_enabled:
            every = self.every_n_steps or trainer.log_every_n_steps or 50
            # global_step counts this batch's optimizer step already: the loggers read at multiples of it
            if self._read_at is None or (trainer.global_step != self._read_at and trainer.global_step % every == 0):
                self._read_step_metrics(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled:
            self._read_step_metrics(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shown, self._read_at = {}, None
        super().on_train_start(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {**super().get_metrics(trainer, pl_module), **self._shown}
        budget = next((c for c in trainer.callbacks if type(c).__name__ == "TimeBudget"), None)
        if budget is not None:  # time_budget=...: what is left of it, and the planned steps
            metrics["left"] = format_duration(budget.left())
            if budget.planned_steps is not None:
                metrics["steps"] = f"{trainer.global_step}/{budget.planned_steps}"
        return metrics
