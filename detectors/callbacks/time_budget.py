"""Train to a time budget: the run measures its pace and sets its length (and the learning-rate schedule's) so
that it ends, its last validation included, when the budget does."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L

from detectors.time_budget import (Pace, describe_budget, epochs_of, format_duration, parse_duration,
                                   seconds_to_finish, steps_that_fit)

log = logging.getLogger(__name__)

#: validation's cost per batch against a training step's, before a validation was measured (forward only, but
#: with decoding, NMS and the metrics' matching): a guess that the first measured validation replaces
EVAL_BATCH_GUESS = 0.5


class BudgetTooShort(ValueError):
    """The budget cannot hold a useful run at the pace measured; the message says the minimum."""


class TimeBudget(L.Callback):
    """Sets the run's number of optimizer steps so that training, validations, checkpoints and the final
    validation fit in ``budget`` counted from this callback's creation (train.py makes it first thing), and
    builds the learning-rate schedule over those steps (``StepPlan.replan``: warm-up and decay end at the end).

    How: the first ``probe_steps`` steps after the first one (which carries one-off costs) give the step's pace;
    a validation's cost is guessed from the sanity check until one is measured. Then, at every step (every
    ``log_every_n_steps`` under DDP: rank 0 decides and broadcasts), the steps that fit in what is left are
    planned again from the recent pace (the last ``window`` steps), so the end moves when the pace does
    (another job on the machine, multi-scale sizes) while the learning rate goes on continuously. The run
    stops at the planned step (Lightning then validates and saves as at an epoch's end); it never plans past
    ``max_epochs``/``max_steps``, which stay caps (``trainer.max_epochs=-1``: the budget alone). A budget too
    short for ``min_steps`` steps and a validation raises :class:`BudgetTooShort` saying the minimum.

    The time spent travels in checkpoints: a resumed run goes on with what is left of the same budget.

    Args:
        budget: ``12m``, ``90s``, ``2h``, ``1h30m`` or seconds as a number.
        probe_steps: timed steps before the first plan.
        min_steps: the fewest steps a run must get.
        window: the steps whose mean pace plans the rest.
        clock: seconds, monotonic (tests give a fake one).
    """

    def __init__(self, budget: str | float, probe_steps: int = 3, min_steps: int = 10, window: int = 30,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s = float(budget) if isinstance(budget, (int, float)) else parse_duration(budget)
        self.probe_steps = int(probe_steps)
        self.min_steps = int(min_steps)
        self.clock = clock
        self._created = clock()
        self._spent_before = 0.0  # seconds spent by the run before this process (a resumed run)
        self._steps: deque[float] = deque(maxlen=int(window))
        self._last_end: float | None = None
        self._last_step: int | None = None
        self._validation_start: float | None = None  # a validation under way (it ends at the next batch)
        self._before_validation = 0.0  # the seconds of the step's interval before the validation that cut it
        self._validation_s: float | None = None
        self._sanity_batch_s: float | None = None
        self._sanity_ends: list[float] = []  # the sanity check's start and its batches' ends
        self.planned_steps: int | None = None
        self.plan_lines: list[str] = []  # the plans logged
        self._logged: tuple[int, bool] | None = None  # the steps last logged, and whether validation was measured
        self._cap: int | None = None
        self._resumed_plan: int | None = None

    # ---- time ---------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of the budget spent so far, earlier processes of a resumed run included."""
        return self._spent_before + self.clock() - self._created

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    @property
    def state_key(self) -> str:
        return "TimeBudget"

    def state_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "spent_s": self.elapsed(), "validation_s": self._validation_s,
                "planned_steps": self.planned_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the budget is part of the run's configuration (ckpt_path=auto compares it): the spent time carries over
        self._spent_before = float(state_dict.get("spent_s", 0.0)) - (self.clock() - self._created)
        self._validation_s = state_dict.get("validation_s")
        self._resumed_plan = state_dict.get("planned_steps")  # a plan was made: too late to refuse the budget

    # ---- measuring ----------------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sanity_ends = [self.clock()]

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            self._sanity_ends.append(self.clock())

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a validation batch's cost: from the sanity check's second batch on where it has two (the first one
        # carries one-off costs: the kernels' first calls), else its one batch
        ends = getattr(self, "_sanity_ends", [])
        if len(ends) >= 3:
            self._sanity_batch_s = (ends[-1] - ends[1]) / (len(ends) - 2)
        elif len(ends) == 2:
            self._sanity_batch_s = ends[1] - ends[0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fit_loop.min_epochs or trainer.fit_loop.min_steps:
            # Lightning ignores a stop before min_epochs: the budget decides instead
            log.info("time budget: trainer.min_epochs/min_steps are ignored (the budget sets the run's length)")
            trainer.fit_loop.min_epochs = 0
            trainer.fit_loop.epoch_loop.min_steps = None
        estimated = trainer.estimated_stepping_batches
        self._cap = int(estimated) if math.isfinite(estimated) else None
        self._last_end, self._last_step = self.clock(), trainer.global_step
        self._steps.clear()
        self._probe_left = self.probe_steps + 1  # the first step carries one-off costs: not timed

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._last_end is not None:
            self._validation_start = self.clock()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._validation_start is not None:
            # the validation and all that came with it (checkpoints after it, the next epoch's start, the loader's
            # restart) ran from its start to this batch: its cost; the step's time resumes from here
            now = self.clock()
            self._validation_s = now - self._validation_start
            self._before_validation = self._validation_start - self._last_end  # the epoch's end, before it
            self._last_end = now
            self._validation_start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: not an optimizer step yet
            return
        now = self.clock()
        interval = (now - self._last_end + self._before_validation) / max(step - self._last_step, 1)
        self._before_validation = 0.0
        self._last_end, self._last_step = now, step
        if self._probe_left > self.probe_steps:
            self._probe_left -= 1  # the first step
        else:
            self._steps.append(interval)
            self._probe_left = max(self._probe_left - 1, 0)
        if self._probe_left == 0 and self._due(trainer, step):
            self._plan(trainer, pl_module, step)
        if self.planned_steps is not None and step >= self.planned_steps:
            trainer.should_stop = True

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        return self.planned_steps is None or trainer.world_size == 1 or step % max(trainer.log_every_n_steps, 1) == 0

    def _mean_step(self) -> float:
        return sum(self._steps) / len(self._steps)

    # ---- planning -----------------------------------------------------------------------------------------
    def pace(self, trainer: L.Trainer) -> Pace:
        """The loop's pace as measured so far."""
        step_s = self._mean_step()
        val_batches = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) else trainer.num_val_batches
        if not val_batches or not math.isfinite(val_batches):
            return Pace(step_s, 0.0, None)
        validation_s = self._validation_s
        if validation_s is None:
            batch_s = self._sanity_batch_s if self._sanity_batch_s is not None else EVAL_BATCH_GUESS * step_s
            validation_s = batch_s * val_batches
        return Pace(step_s, validation_s, validation_interval(trainer))

    def _plan(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        planned = None
        if trainer.is_global_zero:
            pace = self.pace(trainer)
            # on the validation grid, this step's validation runs after this hook: it is spent already
            pending = pace.validation_s if pace.validate_every and step % pace.validate_every == 0 else 0.0
            planned = steps_that_fit(self.left() - pending, step, pace, self._cap)
            short = planned < step + self.min_steps and (self._cap is None or planned < self._cap)
            if self.planned_steps is None and self._resumed_plan is None and short:  # the budget, not max_epochs, ends it so soon
                needed = self.elapsed() + seconds_to_finish(step, step + self.min_steps, pace)
                planned = -int(math.ceil(needed))  # refused: the minimum travels in the broadcast
        if trainer.world_size > 1:
            planned = trainer.strategy.broadcast(planned, src=0)
        if planned < 0:
            raise BudgetTooShort(
                f"time_budget {describe_budget(self.budget_s)} is too short for this run: start-up and the first "
                f"{step} steps took {format_duration(self.elapsed())}; {self.min_steps} more steps and a validation "
                f"need at least {format_duration(-planned)} ({-planned} s) in all")
        plan = getattr(pl_module, "step_plan", None)
        if plan is not None and planned != plan.total_steps and planned > step:  # planned == step: it stops now
            plan.replan(planned, step)
        self.planned_steps = planned
        # said when first made, when the first validation was measured, and when the end moves by over 10%
        measured = self._validation_s is not None
        logged = self._logged
        if trainer.is_global_zero and (logged is None or (measured and not logged[1])
                                       or abs(planned - logged[0]) > 0.1 * logged[0]):
            self._logged = (planned, measured)
            self.plan_lines.append(self.describe(trainer, step))
            log.info("%s", self.plan_lines[-1])

    def describe(self, trainer: L.Trainer, step: int) -> str:
        """E.g. "budget 12 min: 3.10 s a step, validation 40 s every 60 steps: 200 steps of 8 (3.3 epochs), last
        validation at 11:40"."""
        pace = self.pace(trainer)
        steps_per_epoch = max(math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches), 1)
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        of = f" of {batch * trainer.accumulate_grad_batches * trainer.world_size}" if batch else ""
        every = f"every {pace.validate_every} steps" if pace.validate_every else "at the end"
        measured = "" if self._validation_s is not None else " (estimated until one runs)"
        end = self.elapsed() + seconds_to_finish(step, self.planned_steps, pace)
        capped = " (max_epochs/max_steps end it first)" if self._cap is not None and self.planned_steps >= self._cap else ""
        return (f"budget {describe_budget(self.budget_s)}: {pace.step_s:.2f} s a step, validation "
                f"{pace.validation_s:.0f} s{measured} {every}: {self.planned_steps} steps{of} "
                f"({epochs_of(self.planned_steps, steps_per_epoch):.1f} epochs){capped}, last validation ends at "
                f"{format_duration(end)}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # detectors.compare reads this line (detectors/tasks/run_folder.py)
            log.info("time budget %s (%.0f s): %.0f s used (%.0f%%), %d steps", describe_budget(self.budget_s),
                     self.budget_s, self.elapsed(), 100 * self.elapsed() / self.budget_s, trainer.global_step)


def validation_interval(trainer: L.Trainer) -> int | None:
    """Optimizer steps between the validations Lightning runs (None: never during training)."""
    batches = trainer.num_training_batches
    check = trainer.val_check_batch
    if not batches or not math.isfinite(batches) or check is None or not math.isfinite(check):
        return None
    accumulate = trainer.accumulate_grad_batches
    if check >= batches:
        return max(math.ceil(batches / accumulate), 1) * (trainer.check_val_every_n_epoch or 1)
    return max(int(check) // accumulate, 1)
