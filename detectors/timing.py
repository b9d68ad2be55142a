"""Named stages inside a training step, timed only while a StepTimeBreakdown callback asks for it.

Heads mark their stages (``with stage("assign"): ...``); when nobody listens this costs one
attribute check. Timing synchronises the GPU at stage edges, so it slows the step a little.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageRecorder:
    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


RECORDER = StageRecorder()


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the enclosed code as stage ``name`` (also a torch.profiler range)."""
    with torch.profiler.record_function(name):
        if not RECORDER.enabled:
            yield
            return
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        RECORDER.seconds[name] += time.perf_counter() - start
