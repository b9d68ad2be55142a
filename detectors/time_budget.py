"""A run's length from a time budget: durations as users write them, and the number of optimizer steps that
fit in what is left of the budget at the measured pace (the callback that measures and re-plans is
``detectors.callbacks.time_budget.TimeBudget``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh])")


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration written ``90s``, ``12m``, ``2h``, ``1h30m`` or ``1.5h``.

    A bare number is refused (seconds, minutes or hours? Ultralytics' ``time=`` reads hours, Lightning's
    ``max_time`` a D:HH:MM:SS string): ValueError saying how to write it."""
    value = str(text).strip().lower().replace(" ", "")
    parts = _PART.findall(value)
    if not value or not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"time_budget={text!r} is not a duration: write it with its unit, e.g. 90s, 12m, 2h or 1h30m")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"time_budget={text!r} is not a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05`` (h:mm:ss, m:ss under an hour)."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe_budget(seconds: float) -> str:
    """A budget in words as users wrote it: ``12 min``, ``90 s``, ``2 h``, ``1 h 30 min``."""
    if seconds < 120 and seconds != 60:
        return f"{seconds:g} s"
    hours, minutes = divmod(seconds / 60, 60)
    if hours < 1:
        return f"{minutes:g} min"
    return f"{int(hours)} h" + (f" {minutes:g} min" if minutes else "")


@dataclass(frozen=True)
class Pace:
    """What the loop costs, measured: ``step_s`` seconds an optimizer step (loading, forward, backward, the
    callbacks' per-step work), ``validation_s`` seconds a validation with what follows it (checkpoints, result
    files), every ``validate_every`` optimizer steps (None: only at the end) and once more at the end when the
    run stops between two (Lightning validates when a run is stopped)."""

    step_s: float
    validation_s: float
    validate_every: int | None


def validations_between(done: int, total: int, every: int | None) -> int:
    """Validations the loop runs after step ``done`` up to and including the end at step ``total``: one every
    ``every`` steps, plus the final one when ``total`` is not on that grid."""
    if total <= done:
        return 0
    if not every:
        return 1
    regular = total // every - done // every
    return regular + (0 if total % every == 0 else 1)


def seconds_to_finish(done: int, total: int, pace: Pace) -> float:
    """Seconds from now (``done`` steps taken) to the end of a run of ``total`` steps, its last validation
    included."""
    return (total - done) * pace.step_s + validations_between(done, total, pace.validate_every) * pace.validation_s


def steps_that_fit(left_s: float, done: int, pace: Pace, cap: int | None = None) -> int:
    """The largest step count ``total >= done`` whose remaining steps and validations fit in ``left_s``
    seconds at ``pace`` (``done`` when not even one more step fits), at most ``cap`` (max_epochs' or max_steps'
    length; None: no cap). The cost grows with ``total`` (each step and each validation adds time), so a
    bisection finds it."""
    if left_s <= 0 or pace.step_s <= 0:
        return done
    low = done
    high = done + int(left_s / pace.step_s) + 1
    if cap is not None:
        high = min(high, max(cap, done))
    while low < high:
        middle = (low + high + 1) // 2
        if seconds_to_finish(done, middle, pace) <= left_s:
            low = middle
        else:
            high = middle - 1
    return low


def epochs_of(steps: int, steps_per_epoch: int | None) -> float:
    return steps / steps_per_epoch if steps_per_epoch else math.nan
