"""A map-style dataset over records, and the collate that pads targets for batched assignment."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from detectors.data.records import (
    BadSampleError,
    GroundTruth,
    Record,
    SkipCounter,
    Source,
)
from detectors.data.transforms import input_frame

log = logging.getLogger(__name__)


class DetectionDataset(Dataset):
    """Loads an image, applies the transform, returns ``(image (3, H, W) uint8, target dict)``.

    The target holds ``boxes`` (N, 4) float32 xyxy in pixels of the transformed image,
    ``labels`` (N,) int64, ``difficult`` (N,) bool, ``weights`` (N,) float32 (1 unless mixup),
    ``image_id``, ``orig_size`` (H0, W0) of the file, which evaluation maps predictions back to,
    ``frame`` (scale_x, scale_y, pad_left, pad_top): where the transform put the file's image,
    ``x = x0 * scale_x + pad_left`` (see ``input_frame``; ``resize`` names the transform's resize,
    'stretch' or 'letterbox', and only an evaluation transform has such a frame), and
    ``num_dropped``: boxes of the record the augmentation dropped (cropped out, or shrunk under the
    minimum size), summed per batch by the collate so the module can log them.

    With ``ground_truth=True`` (evaluation splits) the target also holds ``ground_truth``: the
    record's ``GroundTruth``, the file's annotations in its own pixels as the metrics score them.

    An unreadable sample returns None with ``on_bad_sample='skip'`` (the collate drops it and it is
    counted), or raises with 'raise'.

    Indexed with ``(index, epoch)`` (see ``EpochSampler``), the augmentation of that sample is seeded
    from (seed, epoch, index): the same in any worker, in any order, and after a resume.
    """

    def __init__(
        self, source: Source, records: list[Record], transform: A.Compose, on_bad_sample: str = "skip", seed: int = 0,
        resize: str = "stretch", ground_truth: bool = False,
    ):
        self.source = source
        self.ground_truth = ground_truth
        self.resize = resize
        self.records = records
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.skips = SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]] | None:
        if isinstance(item, tuple):
            index, epoch = item
            self.transform.set_random_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
        else:
            index = item
        record = self.records[index]
        try:
            image, record = self.source.load(record)
        except BadSampleError as e:
            if self.on_bad_sample == "raise":
                raise
            self.skips.skip(record.file, getattr(e, "kind", None) or "unreadable image", str(e))
            return None
        out = self.transform(image=image, bboxes=record.boxes, box_index=np.arange(len(record.boxes)))
        keep = np.asarray(out["box_index"], dtype=np.int64)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(record.labels[keep]),
            "difficult": torch.from_numpy(record.difficult[keep]),
            "iscrowd": torch.from_numpy(record.iscrowd[keep]),
            "weights": torch.ones(len(keep)),
            "image_id": record.image_id,
            "orig_size": image.shape[:2],
            "frame": input_frame(image.shape[:2], out["image"].shape[:2], self.resize),
            "num_dropped": len(record.boxes) - len(keep),
        }
        if self.ground_truth:
            target["ground_truth"] = GroundTruth.of(record)
        return torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1), target


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles with a generator seeded by (seed, epoch) and yields ``(index, epoch)`` pairs.

    Neither the order nor the augmentation then depends on the global RNG or on the number of
    workers, so a resumed run sees exactly the batches an uninterrupted one would. ``epoch_fn``
    is read when iteration starts (Lightning's current epoch, already restored on resume).

    With ``world_size`` > 1 (DDP) every rank draws the same permutation and takes every
    ``world_size``-th entry from ``rank``, cut to an equal length so no rank waits for another.
    """

    def __init__(self, size: int, seed: int, epoch_fn: Callable[[], int], shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.size = size
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.size // self.world_size if self.world_size > 1 else self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch_fn())
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(self.size)
        order = order[self.rank :: self.world_size][: len(self)]
        yield from [(int(i), epoch) for i in order]


class ShardSampler(Sampler[int]):
    """Evaluation order for one rank: indices ``rank, rank + world_size, ...`` with no padding.

    Lightning's default DistributedSampler repeats images to even out the shards, which counts
    them twice in mAP; the metrics sync shards of unequal size instead.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def collate_detection(batch: list[tuple[Tensor, dict] | None]) -> dict[str, Tensor]:
    """Stack images and pad targets to the batch's largest box count.

    Returns a dict of batch-first tensors (one host-to-device copy each):
        images (B, 3, H, W) uint8 (normalised on the device),
        boxes (B, M, 4) float32 xyxy, labels (B, M) int64 (-1 = padding), mask (B, M) bool,
        difficult (B, M) bool, iscrowd (B, M) bool, weights (B, M) float32 (0 = padding),
        image_ids (B,) int64, orig_sizes (B, 2) int64 (H0, W0),
        frames (B, 4) float32 (scale_x, scale_y, pad_left, pad_top): x_input = x_orig * scale_x + pad_left
            (y likewise), what evaluation inverts to map boxes back to the file's pixels,
        num_skipped () int64: samples of this batch dropped as unreadable,
        num_dropped_boxes () int64: boxes the augmentation dropped from this batch's images.
    With ground truth in the samples (evaluation), also the file's annotations in each image's own
    pixels, padded to the batch's largest count K:
        gt_boxes (B, K, 4) float64 xyxy, gt_labels (B, K) int64, gt_difficult, gt_iscrowd (B, K) bool,
        gt_area (B, K) float64, gt_counts (B,) int64 (rows 0..count-1 of each image are real).
    """
    samples = [s for s in batch if s is not None]
    num_skipped = len(batch) - len(samples)
    if not samples:
        raise BadSampleError("every sample of a batch was unreadable; check the dataset with the warnings above")
    images = torch.stack([s[0] for s in samples])
    targets = [s[1] for s in samples]
    size, max_boxes = len(targets), max(len(t["labels"]) for t in targets)
    out = {
        "images": images,
        "boxes": torch.zeros(size, max_boxes, 4),
        "labels": torch.full((size, max_boxes), -1, dtype=torch.long),
        "mask": torch.zeros(size, max_boxes, dtype=torch.bool),
        "difficult": torch.zeros(size, max_boxes, dtype=torch.bool),
        "iscrowd": torch.zeros(size, max_boxes, dtype=torch.bool),
        "weights": torch.zeros(size, max_boxes),
        "image_ids": torch.tensor([t["image_id"] for t in targets], dtype=torch.long),
        "orig_sizes": torch.tensor([t["orig_size"] for t in targets], dtype=torch.long),
        "frames": torch.tensor([t["frame"] for t in targets], dtype=torch.float32),
        "num_skipped": torch.tensor(num_skipped),
        "num_dropped_boxes": torch.tensor(sum(int(t.get("num_dropped", 0)) for t in targets)),
    }
    for i, t in enumerate(targets):
        n = len(t["labels"])
        out["boxes"][i, :n] = t["boxes"]
        out["labels"][i, :n] = t["labels"]
        out["mask"][i, :n] = True
        out["difficult"][i, :n] = t["difficult"]
        out["iscrowd"][i, :n] = t["iscrowd"]
        out["weights"][i, :n] = t["weights"]
    if all("ground_truth" in t for t in targets):
        out.update(_pad_ground_truth([t["ground_truth"] for t in targets]))
    return out


def _pad_ground_truth(gts: list[GroundTruth]) -> dict[str, Tensor]:
    """The ``gt_*`` tensors of ``collate_detection`` (float64: the metrics compare IoUs and areas as the
    reference tools do, and a file's area of exactly 32**2 must stay on its side of the bucket edge)."""
    counts = [len(g.labels) for g in gts]
    k = max(counts)
    out = {
        "gt_boxes": torch.zeros(len(gts), k, 4, dtype=torch.float64),
        "gt_labels": torch.full((len(gts), k), -1, dtype=torch.long),
        "gt_difficult": torch.zeros(len(gts), k, dtype=torch.bool),
        "gt_iscrowd": torch.zeros(len(gts), k, dtype=torch.bool),
        "gt_area": torch.zeros(len(gts), k, dtype=torch.float64),
        "gt_counts": torch.tensor(counts, dtype=torch.long),
    }
    for i, (g, n) in enumerate(zip(gts, counts)):
        out["gt_boxes"][i, :n] = torch.from_numpy(g.boxes)
        out["gt_labels"][i, :n] = torch.from_numpy(g.labels)
        out["gt_difficult"][i, :n] = torch.from_numpy(g.difficult)
        out["gt_iscrowd"][i, :n] = torch.from_numpy(g.iscrowd)
        out["gt_area"][i, :n] = torch.from_numpy(g.area)
    return out
