"""The first training batches as the network receives them, drawn to ``train_batch0.jpg`` .. in the run folder:
a broken augmentation (boxes off their objects, colours wrong, mixup gone astray) is seen before hours of training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.io import write_jpeg
from torchvision.utils import draw_bounding_boxes

from detectors.callbacks.sample_images import class_names_of
from detectors.evaluation.plots import _FILLED_LABELS, class_colors, denormalize, image_grid, label_font

__all__ = ["TrainBatches", "draw_batch"]


def draw_batch(images: Tensor, boxes: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None,
               class_names: Sequence[str], columns: int = 4) -> Tensor:
    """A grid of a training batch with its boxes in their class colour, labelled with the class name and,
    where any box of the batch weighs other than 1 (mixup), the box's weight.

    images: (B, 3, H, W) uint8; boxes: (B, M, 4) xyxy in pixels of the images; labels, mask, weights: (B, M)
    (padding slots: mask False) -> (3, H', W') uint8.
    """
    images, boxes, labels, mask = images.cpu(), boxes.detach().float().cpu(), labels.cpu(), mask.cpu()
    weights = weights.detach().float().cpu() if weights is not None else torch.ones(mask.shape)
    show_weights = bool(((weights - 1).abs() > 1e-6)[mask].any())
    colors = class_colors(len(class_names))
    font, font_size = label_font(), max(10, int(images.shape[-2]) // 36)
    fonts = {"font": font, "font_size": font_size} if font is not None else {}
    pictures = []
    for image, b, c, m, w in zip(images, boxes, labels, mask, weights):
        b, c, w = b[m], c[m].tolist(), w[m].tolist()
        if len(c):
            text = [f"{class_names[k]} {x:.2f}" if show_weights else class_names[k] for k, x in zip(c, w)]
            image = draw_bounding_boxes(image, b, labels=text, colors=[colors[k] for k in c], width=2,
                                        **_FILLED_LABELS, **fonts)
        pictures.append(image)
    return image_grid(pictures, columns)


class TrainBatches(L.Callback):
    """Writes the first ``num_batches`` training batches of the run, as the network receives them, to
    ``train_batch0.jpg`` .. in ``output_dir``: after the module's on-device normalisation, multi-scale resize
    and mixup (``DetectionModule.on_after_batch_transfer``, which Lightning runs before
    ``on_train_batch_start``), un-normalised with the module's mean and std.

    After the last of them the hook returns at once (an integer comparison: no tensor is touched, no host
    sync). Only the global-zero process writes.

    Args:
        output_dir: the run folder.
        num_batches: how many batches to draw (0: off).
        max_images: the first images of a batch drawn (a batch of 64 would make an unreadable picture).
        columns: images per grid row.
    """

    def __init__(self, output_dir: str | Path, num_batches: int = 3, max_images: int = 16, columns: int = 4):
        super().__init__()
        if num_batches < 0 or max_images < 1 or columns < 1:
            raise ValueError(f"train_batches: num_batches must be >= 0, max_images and columns >= 1; got "
                             f"{num_batches}, {max_images}, {columns}")
        self.output_dir = Path(output_dir)
        self.num_batches = num_batches
        self.max_images = max_images
        self.columns = columns
        self.written = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.written >= self.num_batches:
            return
        index, self.written = self.written, self.written + 1
        if not trainer.is_global_zero or not isinstance(batch, Mapping) or "images" not in batch:
            return
        n = min(self.max_images, int(batch["images"].shape[0]))
        images = denormalize(batch["images"][:n], pl_module.mean, pl_module.std)
        grid = draw_batch(images, batch["boxes"][:n], batch["labels"][:n], batch["mask"][:n],
                          batch["weights"][:n] if "weights" in batch else None, class_names_of(pl_module), self.columns)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_jpeg(grid, str(self.output_dir / f"train_batch{index}.jpg"), quality=90)
