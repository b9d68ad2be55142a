"""Sample pictures of predictions and ground truth in TensorBoard during validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from detectors.evaluation.plots import denormalize, image_grid, render_samples

__all__ = ["SampleImages", "class_names_of", "sample_grid"]


def class_names_of(pl_module: L.LightningModule) -> list[str]:
    """The module's class names, or "0", "1", ... when it has none."""
    names = list(getattr(pl_module, "class_names", []) or [])
    return names or [str(i) for i in range(pl_module.detector.head.num_classes)]


def sample_pictures(
    pl_module: L.LightningModule,
    batch: Mapping[str, Tensor],
    outputs: Mapping[str, Sequence[Mapping[str, Tensor]]],
    num_images: int,
    score_threshold: float,
) -> list[Tensor]:
    """The first ``num_images`` images of an evaluation batch with predictions and ground truth drawn.

    Args:
        pl_module: the DetectionModule (``mean``/``std`` on the 0..255 scale undo its normalisation).
        batch: the batch as the step saw it: ``images`` ``(B, 3, H, W)`` normalised float at network size,
            ``orig_sizes`` ``(B, 2)``, ``frames`` ``(B, 4)`` (where each original image lies in its
            input; absent: plain resizes).
        outputs: ``validation_step``/``test_step`` output: ``preds`` and ``targets`` in the original frame.
        num_images: how many images to draw (from the front of the batch).
        score_threshold: predictions above it are drawn.

    Returns:
        ``(3, H, W)`` uint8 pictures, at most ``num_images``.
    """
    n = min(num_images, batch["images"].shape[0], len(outputs["preds"]))
    if n <= 0:
        return []
    images = denormalize(batch["images"][:n], pl_module.mean, pl_module.std)
    frames = batch["frames"][:n].cpu() if "frames" in batch else None
    return render_samples(images, outputs["preds"][:n], outputs["targets"][:n], batch["orig_sizes"][:n].cpu(),
                          class_names_of(pl_module), score_threshold, frames)


def sample_grid(
    pl_module: L.LightningModule,
    batch: Mapping[str, Tensor],
    outputs: Mapping[str, Sequence[Mapping[str, Tensor]]],
    num_images: int = 8,
    score_threshold: float = 0.3,
    columns: int = 4,
) -> Tensor | None:
    """:func:`sample_pictures` as one ``(3, H', W')`` uint8 grid, or None when there is nothing to draw."""
    pictures = sample_pictures(pl_module, batch, outputs, num_images, score_threshold)
    return image_grid(pictures, columns) if pictures else None


class SampleImages(L.Callback):
    """Logs a grid of the first validation batch's images, with predictions (score above
    ``score_threshold``, class colour, "name score") and ground truth (thin black in white), to every
    TensorBoardLogger of the trainer. Without one it does nothing (a CSV-only run pays nothing).

    Args:
        num_images: images in the grid (the first of the first validation batch: the same ones
            every epoch, so the pictures show the model learning).
        score_threshold: predictions at or below it are not drawn.
        columns: images per grid row.
        every_n_epochs: log every n-th validation epoch.
        tag: the TensorBoard image tag.
    """

    def __init__(
        self,
        num_images: int = 8,
        score_threshold: float = 0.3,
        columns: int = 4,
        every_n_epochs: int = 1,
        tag: str = "val/samples",
    ):
        super().__init__()
        if num_images < 1 or columns < 1 or every_n_epochs < 1:
            raise ValueError("num_images, columns and every_n_epochs must be >= 1")
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.columns = columns
        self.every_n_epochs = every_n_epochs
        self.tag = tag

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not isinstance(outputs, Mapping) or "preds" not in outputs:
            return
        grid = sample_grid(pl_module, batch, outputs, self.num_images, self.score_threshold, self.columns)
        if grid is None:
            return
        for logger in loggers:
            logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step, dataformats="CHW")
