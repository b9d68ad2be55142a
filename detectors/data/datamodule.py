"""LightningDataModule: a source (VOC folder, shapes, ...) + augmentation presets -> loaders."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, SequentialSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from detectors.data.cache import RAMCache
from detectors.data.dataset import DetectionDataset, EpochSampler, ShardSampler, collate_detection
from detectors.data.records import Source
from detectors.data.transforms import EVAL_PRESETS, build_eval_transform, build_transform

log = logging.getLogger(__name__)


class DetectionDataModule(L.LightningDataModule):
    """Builds train/val/test loaders over one source.

    Args:
        source: a dataset format object with ``classes``, ``records(split)``, ``load(record)``.
        input_size: (H, W) the network sees: evaluation loaders resize to it.
        train_input_size: (H, W) the training loader resizes to; None: ``input_size``. Under multi-scale
            training the largest of the sizes (per side; configs/data/*.yaml derive it with the
            ``train_input_size`` resolver), which the module shrinks each batch from to its drawn
            size: an image of a large drawn size then holds what the file shows at that size, not an
            enlarged small one. Every batch then costs the loader the largest size's resize,
            augmentation and transfer (decoding is unchanged; BENCHMARKS.md, "Multi-scale training");
            ``MultiScale`` says why this is preferred to a loader that knows each batch's size.
        augment: keyword arguments of ``build_transform`` for training (``preset`` = 'ssd', ...),
            plus ``eval_resize``: how evaluation resizes, 'stretch' (default: to ``input_size``,
            aspect ignored) or 'letterbox' (aspect kept, padded with the augment's ``fill``, for
            models trained letterboxed); see ``build_eval_transform``.
        batch_size, num_workers: loader settings (eval loaders use ``eval_batch_size``).
        on_bad_sample: 'skip' (count and warn) or 'raise'.
        cache: 'none' (decode every image from disk when it is used) or 'ram' (decode each split
            once, when its loader is first made, and serve the decoded images from memory to every
            worker and epoch; for small datasets such as BCCD, see ``RAMCache``).
        root, splits, classes: the source's settings, repeated here so users set them as
            ``data.root=...``; ``classes``, when given, must equal the source's.
        val_split: the split validation reads (with the evaluation transform). 'train' for the
            overfit preset: then validation scores the very images the model is fitting.
    """

    def __init__(
        self,
        source: Source,
        root: str | None = None,
        splits: Mapping[str, str] | None = None,
        classes: Sequence[str] | None = None,
        input_size: Sequence[int] = (300, 300),
        train_input_size: Sequence[int] | None = None,
        augment: Mapping | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,  # only where a GPU is present
        on_bad_sample: str = "skip",
        seed: int = 0,
        cache: str = "none",
        val_split: str = "val",
    ):
        super().__init__()
        if cache not in ("none", "ram"):
            raise ValueError(f"data.cache must be 'none' or 'ram', got {cache!r}")
        self.source = source
        if classes is not None and list(classes) != list(source.classes):
            raise ValueError(f"data.classes {list(classes)} differ from the source's {source.classes}")
        self.root = root
        self.splits = dict(splits) if splits else None
        self.input_size = tuple(int(s) for s in input_size)
        self.train_input_size = self.input_size if train_input_size is None else tuple(int(s) for s in train_input_size)
        self.augment = dict(augment or {"preset": "none"})
        # not a training option: it picks the evaluation transform (and the frame predictions map back from)
        self.eval_resize = self.augment.pop("eval_resize", "stretch")
        if self.eval_resize not in EVAL_PRESETS:
            raise ValueError(f"augment.eval_resize must be one of {', '.join(EVAL_PRESETS)}, "
                             f"got {self.eval_resize!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.cache = cache
        self.val_split = val_split
        self._datasets: dict[str, DetectionDataset] = {}

    @property
    def classes(self) -> list[str]:
        return list(self.source.classes)

    def dataset(self, split: str) -> DetectionDataset:
        if split not in self._datasets:
            if split == "train":
                transform = build_transform(size=self.train_input_size, seed=self.seed, **self.augment)
                resize = "stretch"  # the random geometry has no frame; targets carry the plain one, unread
            else:
                fill = {"fill": self.augment["fill"]} if "fill" in self.augment else {}
                transform = build_eval_transform(self.eval_resize, self.input_size, seed=self.seed, **fill)
                resize = self.eval_resize
            records = self.source.records(self.val_split if split == "val" else split)
            log.info("%s split: %d images%s", split, len(records),
                     f" (of the {self.val_split!r} split)" if split == "val" and self.val_split != "val" else "")
            source = RAMCache(self.source, records) if self.cache == "ram" else self.source
            # evaluation loaders carry each file's own annotations, which the metrics score
            self._datasets[split] = DetectionDataset(source, records, transform, self.on_bad_sample, self.seed,
                                                     resize=resize, ground_truth=split != "train")
        return self._datasets[split]

    def _current_epoch(self) -> int:
        """The epoch a training iteration that starts now belongs to: Lightning's count of processed
        epochs, which it also gives ``set_epoch``. Not ``trainer.current_epoch`` (completed epochs):
        resuming from a checkpoint written after an epoch's last batch, the loader (and its workers'
        prefetch) starts before Lightning counts that epoch as completed, and would replay it."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def _sampler(self, size: int, shuffle: bool) -> EpochSampler | ShardSampler | SequentialSampler:
        """Our own samplers shard across DDP ranks (the trainer runs with use_distributed_sampler=False).
        Under ``trainer.overfit_batches`` every split is read in file order, so the same first batches
        come back every epoch (Lightning would otherwise swap our samplers out, with a warning)."""
        if self.trainer is not None and self.trainer.overfit_batches > 0:
            return SequentialSampler(range(size))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if shuffle:
            return EpochSampler(size, self.seed, self._current_epoch, rank=rank, world_size=world)
        return ShardSampler(size, rank, world)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        """The training loader is a ``StatefulDataLoader``: Lightning stores its position in every
        checkpoint and restores it, so a run resumed from a mid-epoch ``last.ckpt`` goes on with the
        next batch of that epoch (a plain DataLoader restarts the epoch's order and Lightning cuts the
        epoch short). The position is a count of batches: the order itself is a function of
        (seed, epoch), see ``EpochSampler``, so skipping ahead costs no image decoding."""
        dataset = self.dataset(split)
        sampler = self._sampler(len(dataset), shuffle)
        loader_class = StatefulDataLoader if shuffle else DataLoader
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=shuffle and len(sampler) > batch_size,
            persistent_workers=self.num_workers > 0,
            # the loader's own generator for the seed it draws when an iterator starts (every epoch
            # without workers): from the global RNG, that draw would come after the epoch-start
            # restore of a resumed run's RNG state in later epochs and before it in a process's first,
            # so a model that draws from the global RNG in training (dropout) would resume with other draws
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
