"""Random-number-generator state that survives a checkpoint.

Lightning does not keep RNG state in checkpoints; without it a resumed run shuffles and augments
differently from an uninterrupted one. Everything is stored as tensors, ints and tuples, so the
checkpoint still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def collect_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
