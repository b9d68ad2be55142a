"""Batch-level augmentation on the device: mixup and multi-scale resizing (downscaling only).

Both work on a whole padded batch (``collate_detection``'s dict, images already normalised to
float) with tensor ops only, no loop over images. Their random draws come from a NumPy generator
seeded by (seed, batch counter), never from global state, so a resumed run draws what an
uninterrupted one would, on any device and with any number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detectors.boxes import in_dtype, scale_boxes, scale_xy

_MIXUP_STREAM, _MULTISCALE_STREAM = 0, 1  # separate random streams from one seed


def mixup_batch(batch: dict[str, Tensor], partner: Tensor, lam: Tensor) -> dict[str, Tensor]:
    """Blend each image with another of its batch and keep both images' boxes, weighted.

    Args:
        batch: images (B, 3, H, W) float; boxes (B, M, 4), labels (B, M), mask (B, M),
            difficult (B, M), iscrowd (B, M), weights (B, M) padded as ``collate_detection`` makes them.
        partner: (B,) int64, the image each one is blended with; ``partner[i] == i`` leaves image i as it is.
        lam: (B,) float in (0, 1], the share of image i itself (ignored where not mixed).

    Returns the batch with images ``lam x_i + (1 - lam) x_partner``, and M doubled: slots 0..M-1 hold
    image i's own boxes with weights ``w lam``, slots M..2M-1 its partner's with ``w (1 - lam)``
    (padding: mask False, label -1, weight 0, box 0, where the image is not mixed). Other keys pass through.
    """
    images = batch["images"]
    index = torch.arange(len(images), device=images.device)
    mixed = partner != index  # (B,)
    lam = torch.where(mixed, lam.to(images.dtype), torch.ones_like(lam, dtype=images.dtype))
    lam_img = lam.view(-1, 1, 1, 1)
    out = dict(batch)
    out["images"] = images * lam_img + images[partner] * (1 - lam_img)

    mask = torch.cat([batch["mask"], batch["mask"][partner] & mixed[:, None]], 1)  # (B, 2M)
    lam_box = lam.to(batch["weights"].dtype)[:, None]
    weights = torch.cat([batch["weights"] * lam_box, batch["weights"][partner] * (1 - lam_box)], 1)
    out["mask"] = mask
    out["weights"] = weights * mask
    out["boxes"] = torch.cat([batch["boxes"], batch["boxes"][partner]], 1) * mask[..., None]
    out["labels"] = torch.cat([batch["labels"], batch["labels"][partner]], 1).masked_fill(~mask, -1)
    for flag in ("difficult", "iscrowd"):
        if flag in batch:
            out[flag] = torch.cat([batch[flag], batch[flag][partner]], 1) & mask
    return out


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An input size as (H, W): an int is a square; anything else must be two positive ints."""
    pair = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"an input size is an int or (H, W) of positive ints, got {size!r}")
    return pair  # type: ignore[return-value]


def largest_size(sizes: Sequence[int | Sequence[int]]) -> tuple[int, int]:
    """Per side, the largest of ``sizes`` (each an int or (H, W)): (max H, max W). Every size fits
    inside it, so a batch of that size reaches any of them by shrinking alone; for sizes of several
    aspect ratios it is none of them (e.g. (320, 480) and (480, 320) give (480, 480))."""
    pairs = [as_size(s) for s in sizes]
    if not pairs:
        raise ValueError("no sizes to take the largest of")
    return max(h for h, _ in pairs), max(w for _, w in pairs)


def resize_batch(batch: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
    """Resize images (B, 3, H, W) to ``size`` = (H', W') and scale boxes (B, M, 4) with them, and the
    ``frames`` (B, 4) (scale_x, scale_y, pad_left, pad_top) where present, so they still say where
    each file's image lies in the (now resized) input.

    Bilinear with ``align_corners=False``: pixel edges map as ``x' = x W'/W``, which is exactly how
    the box coordinates (pixel-edge, continuous) scale; antialiased when shrinking. The same size
    returns the batch itself, not resampled.
    """
    images = batch["images"]
    from_size = (int(images.shape[-2]), int(images.shape[-1]))
    size = (int(size[0]), int(size[1]))
    if size == from_size:
        return batch
    out = dict(batch)
    out["images"] = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                  antialias=size[0] < from_size[0] or size[1] < from_size[1])
    out["boxes"] = scale_boxes(batch["boxes"], from_size, size)
    if "frames" in batch:
        # x' = x W'/W = x0 (scale_x W'/W) + pad_left W'/W: scales and paddings scale alike
        # (Python numbers, not a tensor of them: nothing copied to the device in a training step)
        frames = batch["frames"]
        rx, ry = (in_dtype(r, frames.dtype) for r in (size[1] / from_size[1], size[0] / from_size[0]))
        out["frames"] = scale_xy(frames, rx, ry)
    return out


class BatchMixup:
    """Mixup for detection (Zhang et al. 2019, "Bag of Freebies for Training Object Detection Neural Networks").

    Each image of a training batch is, with probability ``prob``, blended with another image of the
    same batch with ``lam ~ Beta(alpha, alpha)``; the boxes of both are kept, weighted ``lam`` and
    ``1 - lam`` (the losses multiply every box term by its weight). Partners come from a random
    cycle over the batch, so no image is paired with itself.

    Args:
        prob: probability that an image is mixed (0 turns mixup off).
        alpha: Beta distribution parameter (1.5 in the paper; larger keeps lam nearer 0.5).
        seed: with the batch counter, seeds the draws.
    """

    def __init__(self, prob: float = 0.5, alpha: float = 1.5, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mixup.prob must be in [0, 1], got {prob}")
        if alpha <= 0:
            raise ValueError(f"mixup.alpha must be > 0, got {alpha}")
        self.prob = float(prob)
        self.alpha = float(alpha)
        self.seed = int(seed)

    def draw(self, batch_size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """partner (B,) int64 and lam (B,) float32 of batch number ``step`` (partner[i] == i: not mixed)."""
        rng = np.random.default_rng([self.seed, _MIXUP_STREAM, int(step)])
        order = rng.permutation(batch_size)
        partner = np.empty(batch_size, dtype=np.int64)
        partner[order] = np.roll(order, -1)  # each image's partner is the next one on a random cycle
        apply = rng.random(batch_size) < self.prob
        lam = rng.beta(self.alpha, self.alpha, batch_size).astype(np.float32)
        if batch_size < 2:
            apply[:] = False
        partner = np.where(apply, partner, np.arange(batch_size))
        return partner, np.where(apply, lam, np.float32(1.0)).astype(np.float32)

    def __call__(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        images = batch["images"]
        partner, lam = self.draw(len(images), step)
        if (partner == np.arange(len(images))).all():
            return batch  # nothing mixed: keep M as it is
        device = images.device
        return mixup_batch(batch, torch.from_numpy(partner).to(device, non_blocking=True),
                           torch.from_numpy(lam).to(device, non_blocking=True))


class MultiScale:
    """Multi-scale training (YOLOv2, sec. "Multi-Scale Training"): every ``every_n_batches`` batches a
    new input size is drawn from ``sizes`` and the batch is shrunk to it on the device, boxes with it.

    It only ever shrinks: the training loader delivers every batch at ``largest`` (the per-side
    maximum of the sizes; ``DetectionDataModule(train_input_size=...)``, which configs/data/*.yaml
    derive from ``multiscale.sizes``), a batch drawn at that size is used as delivered, and a smaller
    draw is an antialiased downscale of it. Enlarging a batch the loader made smaller would give
    a blurred image with no more detail than the small one, which defeats the point of training at
    large sizes; a batch smaller than ``largest`` is therefore refused (ValueError on the first such
    batch, not later when a large size happens to be drawn).

    The cost is loader work at the largest size for every batch: decoding is the same (it happens at
    the file's size), while the resize output, the augmentations after it, the collate and the
    transfer grow with the largest area instead of the mean drawn one (608^2 is 1.65x the mean of
    s^2 over YOLOv2's 320..608; what that costs: BENCHMARKS.md, "Multi-scale training"). That is
    acceptable: it asks for more loader workers, not another model or result, and the network's step
    grows with the area as well; the shrink itself is one interpolate of the batch on the device. A
    loader that makes each batch at its own drawn size would save it, at the price of moving the draw
    into a batch sampler (sizes from (seed, epoch, batch of the epoch), which a mid-epoch resume
    replays), one augmentation pipeline per size in the dataset, and a module that no longer draws;
    until the loader is the bottleneck the draw stays here, keyed by Lightning's batch counter, which
    exact resume restores.

    Args:
        sizes: input sizes, each an int (square) or (H, W); e.g. 320, 352, ..., 608.
        every_n_batches: batches between size changes.
        seed: with the batch counter, seeds the draws.
    """

    def __init__(self, sizes: Sequence[int | Sequence[int]], every_n_batches: int = 10, seed: int = 0):
        if not sizes:
            raise ValueError("multiscale.sizes is empty; give sizes such as [320, 352, 384] or leave multiscale off")
        if every_n_batches < 1:
            raise ValueError(f"multiscale.every_n_batches must be >= 1, got {every_n_batches}")
        self.sizes = [self._pair(s) for s in sizes]
        self.largest = largest_size(self.sizes)
        self.every_n_batches = int(every_n_batches)
        self.seed = int(seed)

    @staticmethod
    def _pair(size: int | Sequence[int]) -> tuple[int, int]:
        try:
            return as_size(size)
        except (TypeError, ValueError):
            raise ValueError(f"a multiscale size is an int or (H, W) of positive ints, got {size!r}") from None

    def size_at(self, step: int) -> tuple[int, int]:
        """The (H, W) of batch number ``step``: the same for each block of ``every_n_batches`` batches."""
        rng = np.random.default_rng([self.seed, _MULTISCALE_STREAM, int(step) // self.every_n_batches])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __call__(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """``batch`` (images (B, 3, H, W), H >= largest H and W >= largest W) shrunk to batch ``step``'s size."""
        height, width = (int(s) for s in batch["images"].shape[-2:])
        if height < self.largest[0] or width < self.largest[1]:
            raise ValueError(
                f"multiscale: a training batch of {height}x{width} is smaller than the largest multiscale size "
                f"{self.largest[0]}x{self.largest[1]}; it would be upsampled (blurred, no detail gained). The "
                "training loader must deliver the largest size: DetectionDataModule(train_input_size=...), which "
                "configs/data/*.yaml set from multiscale.sizes (data.train_input_size)")
        return resize_batch(batch, self.size_at(step))
