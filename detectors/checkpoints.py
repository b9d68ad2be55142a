"""Finding, reading and checking checkpoints of this framework, with clear messages for wrong files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """Load a Lightning checkpoint written by train.py and the run config stored in it.

    Loads with ``weights_only=True``: a checkpoint cannot run code when loaded. Anything else (a
    corrupt file, another program's checkpoint) raises ValueError saying what it is.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean: not a checkpoint we can read
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    run = OmegaConf.create(config) if isinstance(config, str) else None
    if run is None or "model" not in run or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by detectors' train.py (no run config in it)")
    return ckpt, run


def check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise a one-line ValueError when ``state_dict`` was not made by a model like ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        detail = (f"{first}: {tuple(state_dict[first].shape)} in the checkpoint, {tuple(own[first].shape)} here"
                  if reshaped else first)
        raise ValueError(
            f"checkpoint {path} was made by another model: {len(reshaped)} tensors of other shapes, "
            f"{len(missing)} missing, {len(unexpected)} unexpected (first: {detail}). "
            "Use the model, backbone and data (class count) it was trained with."
        )


def find_last_checkpoint(runs_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/last.ckpt`` below ``runs_dir`` (for ``ckpt_path=auto``), or None."""
    candidates = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
