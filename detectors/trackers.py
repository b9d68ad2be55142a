"""Experiment trackers beside the CSV log: MLflow and Weights & Biases through Lightning's own loggers.

* :class:`MLFlowLogger`, :class:`WandbLogger`: Lightning's ``MLFlowLogger``/``WandbLogger`` with this project's
  defaults (``configs/logger/mlflow.yaml``, ``wandb.yaml``): a local store that needs no server, W&B offline unless
  the user has logged in, the run named after its run folder. A missing package is one line naming the extra.
* :func:`log_config`: the run's resolved config as the trackers' parameters.
* :func:`log_pictures`: hands pictures (files the run wrote, or ``(3, H, W)`` uint8 tensors) to every logger that
  takes pictures. ``detectors.callbacks.tracker_pictures.TrackerPictures`` calls both during a run.
"""

from __future__ import annotations

import importlib
import netrc
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from torch import Tensor
from torchvision.io import ImageReadMode, read_image

__all__ = ["MLFlowLogger", "TrackerUnavailable", "WandbLogger", "flatten", "is_tracker", "log_config", "log_pictures",
           "run_name", "wandb_logged_in"]

INSTALL_HINT = 'pip install -e ".[trackers]"'


class TrackerUnavailable(ImportError):
    """A tracker's package is not installed (train.py reports it in one line)."""


def _require(package: str, logger: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise TrackerUnavailable(f"logger={logger} needs the `{package}` package ({e}): {INSTALL_HINT}") from None


def run_name(run_dir: str | Path, log_dir: str | Path) -> str:
    """The run folder as a tracker's run name: its path under the logs folder (``train/runs/2026-01-02_10-00-00``,
    ``train/multiruns/.../3``: unique, and it says where the files are), else the folder's own name."""
    run, logs = Path(run_dir).resolve(), Path(log_dir).resolve()
    return run.relative_to(logs).as_posix() if run.is_relative_to(logs) else run.name


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's ``MLFlowLogger``, the run named after its run folder, artifacts beside a local store.

    Args:
        run_dir, log_dir: the run folder and the logs folder (the run's name, :func:`run_name`).
        tracking_uri: any MLflow tracking URI; by default a SQLite store under the logs folder (MLflow 3 refuses
            its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``, and SQLite needs no server).
        experiment_name: the MLflow experiment (created when missing).
        artifact_location: where a new experiment keeps its artifacts; None: ``artifacts/`` beside a local
            (``sqlite:``/``file:``) store, the server's choice otherwise.
        kwargs: as ``lightning.pytorch.loggers.MLFlowLogger`` (tags, prefix, log_model, ...).
    """

    def __init__(self, run_dir: str | Path, log_dir: str | Path, tracking_uri: str, experiment_name: str,
                 artifact_location: str | None = None, **kwargs: Any):
        _require("mlflow", "mlflow")
        local_store = None
        if tracking_uri.startswith("sqlite:///"):
            local_store = Path(tracking_uri.removeprefix("sqlite:///")).parent
        elif tracking_uri.startswith("file:"):
            local_store = Path(tracking_uri.removeprefix("file:").removeprefix("//"))
        if local_store is not None:
            local_store.mkdir(parents=True, exist_ok=True)
            if artifact_location is None:
                artifact_location = str((local_store / "artifacts").resolve())
        super().__init__(experiment_name=experiment_name, run_name=run_name(run_dir, log_dir),
                         tracking_uri=tracking_uri, artifact_location=artifact_location, **kwargs)


def wandb_logged_in() -> bool:
    """Whether W&B can reach its server as this user: ``WANDB_API_KEY`` set, or a netrc entry for api.wandb.ai
    (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``, the run named after its run folder, its files in ``run_dir/wandb``.

    Args:
        run_dir, log_dir: the run folder (W&B's ``save_dir``) and the logs folder (the run's name).
        project: the W&B project.
        offline: True, False, or ``auto``: offline unless the user has logged in (:func:`wandb_logged_in`);
            ``wandb sync RUN/wandb/offline-run-*`` uploads an offline run later.
        kwargs: as ``lightning.pytorch.loggers.WandbLogger`` (group, tags, entity, log_model, ...).
    """

    def __init__(self, run_dir: str | Path, log_dir: str | Path, project: str, offline: bool | str = "auto",
                 **kwargs: Any):
        _require("wandb", "wandb")
        if offline == "auto":
            offline = not wandb_logged_in()
        elif not isinstance(offline, bool):
            raise ValueError(f"logger.wandb.offline must be true, false or auto; got {offline!r}")
        super().__init__(name=run_name(run_dir, log_dir), project=project, save_dir=str(run_dir), offline=offline,
                         **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb >= 0.2x warns about the key even when unset
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        if self._experiment is None:
            import wandb

            # a sweep's earlier trial in this process left its run open: Lightning would log this trial into it
            if wandb.run is not None:
                wandb.run.finish()
        return LightningWandbLogger.experiment.fget(self)


def _tracker_kinds() -> dict[str, type]:
    """The logger classes that take pictures, by kind (Lightning's: a user's own MLFlowLogger counts too)."""
    return {"mlflow": LightningMLFlowLogger, "wandb": LightningWandbLogger, "tensorboard": TensorBoardLogger}


def is_tracker(logger: Any, kinds: Iterable[str] = ("mlflow", "wandb")) -> bool:
    """Whether ``logger`` is one of the trackers ``kinds`` (mlflow, wandb, tensorboard)."""
    classes = _tracker_kinds()
    return any(isinstance(logger, classes[k]) for k in kinds)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer/lr": 0.1}`` (lists stay values)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}/") if isinstance(value, Mapping) and value else {name: value})
    return flat


def log_config(loggers: Iterable[Any], config: Mapping[str, Any]) -> None:
    """The resolved run config (a nested plain dict) as the trackers' parameters: MLflow gets it flattened
    (``optimizer/lr``; Lightning cuts values at 250 characters), W&B nested as its run config.

    MLflow refuses to change a logged parameter: keys the run already has (the module's hyperparameters that
    Lightning logged, e.g. ``input_size``) keep their value."""
    classes = _tracker_kinds()
    for logger in loggers:
        if isinstance(logger, classes["mlflow"]):
            logged = logger.experiment.get_run(logger.run_id).data.params
            logger.log_hyperparams({k: v for k, v in flatten(config).items() if k not in logged})
        elif isinstance(logger, classes["wandb"]):
            logger.log_hyperparams(dict(config))


def _as_tensor(picture: str | Path | Tensor) -> Tensor:
    if isinstance(picture, Tensor):
        return picture
    return read_image(str(picture), mode=ImageReadMode.RGB)


def log_pictures(loggers: Iterable[Any], pictures: Mapping[str, str | Path | Tensor], step: int | None = None) -> int:
    """Hand each picture to every logger that takes pictures; the others (CSV) are skipped.

    Args:
        loggers: the trainer's loggers.
        pictures: name -> a written PNG/JPG file or a ``(3, H, W)`` uint8 tensor. The name is the picture's key
            (W&B, TensorBoard) and its artifact path in MLflow (``pr_curves/pr_curve_cat.png``; a tensor gets
            ``_step<step>.png`` appended so each step's picture stays).
        step: the trainer's global step, where the tracker keeps a picture per step.

    Returns:
        how many (logger, picture) hand-offs were made.
    """
    classes = _tracker_kinds()
    handed = 0
    for logger in loggers:
        for name, picture in pictures.items():
            key = name.rsplit(".", 1)[0] if isinstance(picture, (str, Path)) else name
            if isinstance(logger, classes["mlflow"]):
                if isinstance(picture, Tensor):
                    logger.experiment.log_image(logger.run_id, picture.permute(1, 2, 0).cpu().numpy(),
                                                artifact_file=f"{name}_step{step or 0:06d}.png")
                else:
                    folder = Path(name).parent.as_posix()
                    logger.experiment.log_artifact(logger.run_id, str(picture),
                                                   artifact_path=None if folder == "." else folder)
            elif isinstance(logger, classes["wandb"]):
                image = picture.permute(1, 2, 0).cpu().numpy() if isinstance(picture, Tensor) else str(picture)
                logger.log_image(key=key, images=[image], step=step)
            elif isinstance(logger, classes["tensorboard"]):
                logger.experiment.add_image(key, _as_tensor(picture).to(torch.uint8), global_step=step or 0,
                                            dataformats="CHW")
            else:
                continue
            handed += 1
    return handed
