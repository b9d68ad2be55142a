"""Hands a run's pictures to its experiment trackers (MLflow, W&B, TensorBoard): train.py adds this callback when
the run has such a logger, so the code that draws a picture only writes its file and knows nothing of trackers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from detectors.callbacks.sample_images import SampleImages, sample_grid
from detectors.callbacks.train_batches import TrainBatches
from detectors.trackers import is_tracker, log_config, log_pictures

__all__ = ["TrackerPictures", "pictures_in"]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
# folders of the run that hold no picture of the run's own: the trackers' stores (W&B copies every picture it
# gets into wandb/), the checkpoints, Hydra's
SKIPPED_FOLDERS = frozenset({"wandb", "mlruns", "mlflow", "tensorboard", "checkpoints", ".hydra"})


def pictures_in(folder: Path) -> dict[str, Path]:
    """The PNG/JPG files under ``folder`` (outside :data:`SKIPPED_FOLDERS`), by their path relative to it."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() in PICTURE_SUFFIXES and not SKIPPED_FOLDERS.intersection(rel.parts[:-1]) \
                and path.is_file():
            found[rel.as_posix()] = path
    return found


class TrackerPictures(L.Callback):
    """Logs the run's config to its trackers when fitting starts, and hands them every picture the run writes in
    its folder (``train_batch0.jpg`` .., evaluation plots, ranked images: new or rewritten files, found by their
    modification time) after each of the first training batches the ``TrainBatches`` callback draws, after each
    validation, and at the end of training and testing. The validation sample grid that ``SampleImages`` draws
    for TensorBoard goes to MLflow and W&B too, with that callback's settings. Only the global-zero process logs.

    Args:
        output_dir: the run folder.
        config: the run's resolved config (a nested plain dict), logged as parameters; None: not logged.
    """

    def __init__(self, output_dir: str | Path, config: Mapping[str, Any] | None = None):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.config = config
        self.handed: dict[Path, int] = {}  # picture -> modification time (ns) when last handed over
        self.early_scans = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.early_scans = max([c.num_batches for c in trainer.callbacks if isinstance(c, TrainBatches)], default=0)

    def hand_over_new_pictures(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.output_dir.is_dir():
            return
        new = {}
        for name, path in pictures_in(self.output_dir).items():
            mtime = path.stat().st_mtime_ns
            if self.handed.get(path) != mtime:
                new[name], self.handed[path] = path, mtime
        if new:
            log_pictures(trainer.loggers, new, step=trainer.global_step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config is not None and trainer.is_global_zero:
            log_config(trainer.loggers, self.config)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.early_scans > 0:  # TrainBatches wrote its picture of this batch at the batch's start
            self.early_scans -= 1
            self.hand_over_new_pictures(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        samples = next((c for c in trainer.callbacks if isinstance(c, SampleImages)), None)
        if (samples is None or trainer.current_epoch % samples.every_n_epochs or not isinstance(outputs, Mapping)
                or "preds" not in outputs):
            return
        trackers = [lg for lg in trainer.loggers if is_tracker(lg)]  # TensorBoard has it from SampleImages
        if trackers:
            grid = sample_grid(pl_module, batch, outputs, samples.num_images, samples.score_threshold,
                               samples.columns)
            if grid is not None:
                log_pictures(trackers, {samples.tag: grid}, step=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.hand_over_new_pictures(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hand_over_new_pictures(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hand_over_new_pictures(trainer)


def tracker_callbacks(loggers: Sequence[Any], output_dir: str | Path, config: Mapping[str, Any]) -> list:
    """``[TrackerPictures]`` when one of ``loggers`` takes pictures (MLflow, W&B, TensorBoard), else nothing: a
    CSV-only run pays nothing."""
    if any(is_tracker(lg, ("mlflow", "wandb", "tensorboard")) for lg in loggers):
        return [TrackerPictures(output_dir, config if any(is_tracker(lg) for lg in loggers) else None)]
    return []
