"""Learning-rate schedules stepped every iteration: linear warm-up, then cosine or multi-step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupSchedule:
    """Linear warm-up from ``warmup_factor * lr`` over ``warmup_epochs``, but over at least
    ``min_warmup_steps`` optimizer steps (at most a quarter of the run), then ``decay``:

    - 'cosine': cosine from lr down to ``min_lr_ratio * lr`` at the last step;
    - 'multistep': lr times ``gamma`` at each fraction of training in ``milestones``;
    - 'constant'.

    Warm-up matters most from scratch: SSD's early high-loss steps otherwise blow up the BN-free
    VGG16 (and still upset the BN one at lr 1e-2 and above). The step floor is for small datasets
    (YOLOv5 keeps one of 100): BCCD's 205 images make 6 steps of 32 an epoch, and 1 epoch of warm-up
    is then no warm-up at all. Overfitting one batch of 4 images from scratch at lr 1e-2 (SGD,
    momentum 0.9), the loss climbed from 22 to 38 in 10 steps with a 1-step warm-up and fell to 0.9
    in 40 with a 30-step one (gradient norm 150 at the first step, 15 at the 40th).
    """

    def __init__(
        self,
        decay: str = "cosine",
        warmup_epochs: float = 1.0,
        min_warmup_steps: int = 0,
        warmup_factor: float = 1e-3,
        min_lr_ratio: float = 0.01,
        milestones: Sequence[float] = (2 / 3, 8 / 9),
        gamma: float = 0.1,
    ):
        if decay not in ("cosine", "multistep", "constant"):
            raise ValueError(f"unknown decay {decay!r} (have: cosine, multistep, constant)")
        self.decay = decay
        self.warmup_epochs = warmup_epochs
        self.min_warmup_steps = min_warmup_steps
        self.warmup_factor = warmup_factor
        self.min_lr_ratio = min_lr_ratio
        self.milestones = list(milestones)
        self.gamma = gamma

    def warmup_steps(self, total_steps: int, steps_per_epoch: int) -> int:
        """The warm-up's length in optimizer steps for a run of ``total_steps``."""
        warmup = int(self.warmup_epochs * steps_per_epoch)
        if warmup > 0:
            warmup = max(warmup, min(self.min_warmup_steps, total_steps // 4))
        return min(warmup, max(total_steps - 1, 0))

    def factor(self, step: int, total_steps: int | None, steps_per_epoch: int | None,
               warmup_steps: int | None = None, anchor: tuple[int, float] | None = None) -> float:
        """The multiplier of the base learning rate at optimizer step ``step``. Before the run's length
        is known (``total_steps`` None, see ``StepPlan``) it is the warm-up's starting factor.

        ``warmup_steps``: a warm-up length fixed earlier (a time budget fixes it at its first plan, so that a
        later plan does not move it); None: from ``total_steps``. ``anchor``: (step, progress) where a
        re-planned run's decay stands (``StepPlan.replan``): from there the decay goes linearly in steps to
        its end at ``total_steps``, so moving the end changes the slope, never the current value."""
        if total_steps is None or steps_per_epoch is None:
            return self.warmup_factor if self.warmup_epochs > 0 else 1.0
        warmup = self.warmup_steps(total_steps, steps_per_epoch) if warmup_steps is None else warmup_steps
        if step < warmup:
            alpha = step / warmup
            return self.warmup_factor * (1 - alpha) + alpha
        return self.decay_factor(self.progress(step, total_steps, warmup, anchor))

    @staticmethod
    def progress(step: int, total_steps: int, warmup: int, anchor: tuple[int, float] | None = None) -> float:
        """How far the decay is at ``step``: 0 at the warm-up's end, 1 at ``total_steps``."""
        start, done = (warmup, 0.0) if anchor is None or anchor[0] < warmup else anchor
        return min(done + (1 - done) * (step - start) / max(total_steps - start, 1), 1.0)

    def decay_factor(self, progress: float) -> float:
        if self.decay == "cosine":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if self.decay == "multistep":
            return self.gamma ** sum(progress >= m for m in self.milestones)
        return 1.0

    def build(self, optimizer: Optimizer, plan: StepPlan) -> LambdaLR:
        """A per-step LambdaLR reading the run's length from ``plan`` at every step."""
        plan.schedule = self
        return LambdaLR(optimizer, lambda step: self.factor(step, plan.total_steps, plan.steps_per_epoch,
                                                            plan.warmup_steps, plan.anchor))


@dataclass
class StepPlan:
    """The run's length in optimizer steps, filled in once the training loader exists.

    ``configure_optimizers`` runs before Lightning restores a checkpoint's loop and loader state;
    asking the trainer for ``estimated_stepping_batches`` there builds the training loader too early,
    and Lightning then never restores its position (lightning issue #20550), so a mid-epoch resume
    would restart the epoch. The module fills this in at ``on_train_start`` instead.

    A time budget (``detectors.callbacks.time_budget``) changes the length while the run goes: it fixes
    ``warmup_steps`` at its first plan and moves the end with :meth:`replan`, which keeps the learning rate
    continuous (``anchor``: the step and the decay's progress where the last plan took over).
    """

    total_steps: int | None = None
    steps_per_epoch: int | None = None
    warmup_steps: int | None = None
    anchor: tuple[int, float] | None = None
    schedule: WarmupSchedule | None = field(default=None, repr=False, compare=False)

    def replan(self, total_steps: int, step: int) -> None:
        """End the run at ``total_steps`` from optimizer step ``step`` on: the warm-up keeps its length (fixed
        now if it was not), the decay goes on from where it is at ``step`` to its end at ``total_steps``."""
        if self.steps_per_epoch is None or self.schedule is None:
            self.total_steps = total_steps
            return
        if self.warmup_steps is None:
            # the new length's warm-up, unless the one of the length planned so far is over already
            done = None if self.total_steps is None else self.schedule.warmup_steps(self.total_steps, self.steps_per_epoch)
            self.warmup_steps = done if done is not None and step >= done else self.schedule.warmup_steps(
                total_steps, self.steps_per_epoch)
        if step >= self.warmup_steps:
            # where the decay stands now (at its start when the length was unknown until now)
            progress = 0.0 if self.total_steps is None else self.schedule.progress(
                step, self.total_steps, self.warmup_steps, self.anchor)
            self.anchor = (step, progress)
        self.total_steps = max(total_steps, step + 1)

    def state(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "anchor": list(self.anchor) if self.anchor is not None else None}

    def load_state(self, state: dict) -> None:
        self.total_steps = state.get("total_steps")
        self.warmup_steps = state.get("warmup_steps")
        anchor = state.get("anchor")
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor is not None else None
