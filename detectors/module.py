"""DetectionModule: the Lightning loop around a Detector (steps, optimisation, metrics)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call

from detectors.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from detectors.boxes import boxes_to_original, stretch_frames
from detectors.data.batch_ops import BatchMixup, MultiScale
from detectors.detector import Detector
from detectors.evaluation.coco import COCOMeanAP
from detectors.evaluation.voc import VOCMeanAP
from detectors.rng import collect_rng_state, restore_rng_state
from detectors.schedules import StepPlan, WarmupSchedule

log = logging.getLogger(__name__)


class DetectionModule(L.LightningModule):
    """Trains and evaluates any Detector.

    Args:
        detector: backbone + neck + head.
        optimizer: a callable taking parameter groups, e.g. ``functools.partial(torch.optim.SGD, lr=...)``
            (Hydra's ``_partial_: true``). BatchNorm, bias and scale parameters get no weight decay.
        scheduler: per-step learning-rate schedule (warm-up + decay), or None.
        class_names: names of labels 0..C-1 (printed tables, logged per-class AP).
        input_size: (H, W) of the network input; evaluation maps boxes back to each image's own size.
        mean, std: input normalisation (0..1 scale); None: the backbone's (``backbone.mean``/``std``, which
            belong with its weights: ImageNet's for torchvision's, none for darknet's).
        channels_last: NHWC memory format, faster convolutions on tensor cores and oneDNN.
        run_config: the run's resolved configuration as YAML (a string: Hydra would instantiate a dict),
            stored in checkpoints so evaluate.py can rebuild the model.
        mixup: ``BatchMixup`` arguments {prob, alpha, seed}; None or prob 0: off.
        multiscale: ``MultiScale`` arguments {sizes, every_n_batches, seed}; None or no sizes: off.
            Training batches must then come at the largest of the sizes (the data module's
            ``train_input_size``): they are only ever shrunk to their drawn size, never enlarged.
            Both act on training batches only, on the device (see ``on_after_batch_transfer``);
            plain mappings, so the checkpoint's hyperparameters stay loadable with weights_only.
        compile: ``torch.compile`` the network's forward (backbone, neck, head convolutions; in place,
            so parameter names and checkpoints do not change): True, or ``torch.compile`` keyword
            arguments (e.g. {mode: max-autotune}). Matching, loss and NMS stay eager (their shapes
            change with every batch's box count). Compiling takes a minute or two at the start and
            once more per new input size (multi-scale) and for evaluation; BENCHMARKS.md has what
            it gains.
    """

    def __init__(
        self,
        detector: Detector,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: WarmupSchedule | None = None,
        class_names: Sequence[str] = (),
        input_size: Sequence[int] = (300, 300),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = True,
        run_config: str | None = None,
        mixup: Mapping[str, Any] | None = None,
        multiscale: Mapping[str, Any] | None = None,
        compile: bool | Mapping[str, Any] = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["detector", "optimizer", "scheduler"])
        self.detector = detector
        self.optimizer_factory = optimizer
        self.schedule = scheduler
        self.step_plan = StepPlan()
        self.class_names = list(class_names)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channels_last = channels_last
        backbone = getattr(detector, "backbone", None)
        mean = getattr(backbone, "mean", IMAGENET_MEAN) if mean is None else mean
        std = getattr(backbone, "std", IMAGENET_STD) if std is None else std
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        num_classes = detector.head.num_classes
        if self.class_names and len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a head of {num_classes} classes")
        self.coco_map = COCOMeanAP(num_classes=num_classes)
        self.voc_map = VOCMeanAP(num_classes=num_classes, iou_threshold=0.5, use_07_metric=False)
        if channels_last:
            self.detector.to(memory_format=torch.channels_last)
        self._rng_to_restore: dict | None = None
        self.mixup = BatchMixup(**mixup) if mixup and mixup.get("prob", 0) > 0 else None
        self.multiscale = MultiScale(**multiscale) if multiscale and multiscale.get("sizes") else None
        for size in [self.input_size, *(self.multiscale.sizes if self.multiscale is not None else [])]:
            self._check_input_size(size)
        if compile:
            self.detector.compile(**(dict(compile) if isinstance(compile, Mapping) else {}))
        self._batches_seen = 0  # the batch counter when no trainer runs the module
        self._epoch_counts: dict[str, Tensor] = {}  # train/skipped_samples, train/dropped_boxes of this epoch
        self.last_loss_terms: dict[str, Tensor] = {}

    def _check_input_size(self, size: tuple[int, int], label: str | None = None) -> None:
        """Fail now, with the reason, if the network cannot take inputs of ``size`` (input_size and
        every multi-scale size), instead of with a shape error in the middle of an epoch.

        The parts say their smallest side and size divisor (``Detector.size_requirements``: the backbone's
        config, a head's grid); then the forward runs on the meta device (shapes only, no arithmetic, about
        0.05 s), which finds what the rest of the network needs (SSD300's extras: >= 257 px). Only a map
        that becomes empty, or a kernel larger than its map, is called "too small"; any other failure is
        reported as it is. ``label`` names the size in the message (default: input_size or multiscale size)."""
        label = label or ("input_size" if tuple(size) == self.input_size else "multiscale size")
        if hasattr(self.detector, "size_requirements"):
            requirements = self.detector.size_requirements()
        else:
            backbone = getattr(self.detector, "backbone", None)
            requirements = {"backbone": (getattr(backbone, "min_size", 1), getattr(backbone, "size_divisor", 1))}
        part, (smallest, _) = max(requirements.items(), key=lambda item: item[1][0])
        if min(size) < smallest:
            raise ValueError(f"{label} {tuple(size)} is too small: the {part} needs sides of at least {smallest} px")
        divisor = math.lcm(*(d for _, d in requirements.values()))
        if size[0] % divisor or size[1] % divisor:
            reasons = "; ".join(f"backbone.size_divisor {d}" if part == "backbone" else
                                f"the {part} {type(getattr(self.detector, part)).__name__} takes multiples of {d}"
                                for part, (_, d) in requirements.items() if d > 1)
            raise ValueError(f"{label} {tuple(size)} is not a multiple of {divisor} ({reasons})")
        tensors = {**dict(self.detector.named_parameters()), **dict(self.detector.named_buffers())}
        meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
        was_training = self.detector.training

        class EmptyMap(RuntimeError):
            pass

        def refuse_empty(module: torch.nn.Module, args: Any, output: Any) -> None:
            # torch 2.4's meta conv returns a 0x0 map where a real conv (and newer torch's meta one) raises
            if isinstance(output, Tensor) and 0 in output.shape:
                raise EmptyMap(f"{type(module).__name__} gives an empty map {tuple(output.shape)}")

        hooks = [m.register_forward_hook(refuse_empty) for m in self.detector.modules()]
        try:
            self.detector.eval()  # BatchNorm in training mode refuses a batch of one 1x1 map
            functional_call(self.detector, meta, (torch.empty(1, 3, *size, device="meta"),))
        except NotImplementedError:
            log.debug("an op of the detector has no meta kernel; input size %s not checked", size)
        except EmptyMap as e:
            raise ValueError(f"{label} {tuple(size)} is too small for this detector ({e})") from None
        except RuntimeError as e:
            message = str(e).splitlines()[0]
            # a kernel larger than its input map means the input is too small; anything else (a channel
            # mismatch of a misconfigured part, say) is not, and is reported as it is
            too_small = "kernel size" in message.lower() and ("greater" in message or "smaller" in message)
            reason = "too small for this detector" if too_small else "not accepted by this detector"
            raise ValueError(f"{label} {tuple(size)} is {reason} ({message})") from None
        finally:
            for hook in hooks:
                hook.remove()
            self.detector.train(was_training)

    # ---- data on the device -------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """uint8 images travel (4x fewer bytes than float); normalise here, on the device. Training
        batches then get the multi-scale resize (a shrink from the loader's largest size, boxes and
        frames with it) and mixup; evaluation batches stay at ``input_size``."""
        batch = {**batch, "images": (batch["images"].float() - self.mean) / self.std}
        if (self.mixup is not None or self.multiscale is not None) and self._is_training_batch():
            step = self._batch_counter()
            # shrink first: mixup is linear, as the resize is, so the order changes nothing but the
            # number of pixels mixup blends
            if self.multiscale is not None:
                batch = self.multiscale(batch, step)
            if self.mixup is not None:
                batch = self.mixup(batch, step)
        if self.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return batch

    def _is_training_batch(self) -> bool:
        trainer = self._trainer
        return bool(trainer.training) if trainer is not None else self.training

    def _batch_counter(self) -> int:
        """Index of this training batch over the whole run, which seeds the batch-level draws. Under a
        trainer: Lightning's count of batches fetched so far (restored from checkpoints, so exact
        resume holds); without one (tests, benchmarks): calls so far."""
        trainer = self._trainer
        if trainer is not None:
            return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        self._batches_seen += 1
        return self._batches_seen - 1

    def forward(self, images: Tensor) -> Any:
        return self.detector(images)

    # ---- training ------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self._rng_to_restore is not None:
            # here, not at load time: the sanity check between the two draws from the RNG too
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["images"]
        raw = self.detector(images, batch)  # targets reach two-stage heads (proposal sampling)
        losses = self.detector.loss(raw, batch, tuple(images.shape[-2:]))
        # this step's terms for callbacks that report on the step itself (DivergenceGuard), logged or not
        self.last_loss_terms = {f"train/{k}": v.detach() for k, v in losses.items()}
        # per-epoch counts of what the data path dropped (unreadable images, boxes lost to augmentation),
        # summed on the device and logged once at the epoch's end
        for name, key in (("train/skipped_samples", "num_skipped"), ("train/dropped_boxes", "num_dropped_boxes")):
            if key in batch:
                self._epoch_counts[name] = self._epoch_counts.get(name, 0) + batch[key].float()
        if self._loggers_read_this_step():
            # not prog_bar=True: Lightning would read it to the host after every batch (a GPU sync per step);
            # the project's progress bar shows it, read every log_every_n_steps (callbacks/progress.py)
            self.log("train/loss", losses["loss"])
            self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"})
        return losses["loss"]

    def _loggers_read_this_step(self) -> bool:
        """Whether this step's per-step values reach the loggers: Lightning writes them every
        ``log_every_n_steps`` (and the progress bar reads them at the same steps, the first one and an
        epoch's last), so a ``self.log`` at the other steps costs host time and nothing else (each call
        walks Lightning's result object: BENCHMARKS.md, "Training loop vs isolated step")."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if trainer is None or connector is None:
            return True
        return bool(connector.should_update_logs or trainer.fast_dev_run or trainer.is_last_batch
                    or trainer.global_step == 0)

    def on_train_epoch_end(self) -> None:
        for name, count in self._epoch_counts.items():
            self.log(name, count, reduce_fx="sum", on_step=False, on_epoch=True)
        self._epoch_counts = {}

    # ---- evaluation ----------------------------------------------------------------------
    def predictions_in_original_frame(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """The detector's predictions for a batch, boxes in each image's original pixel frame.

        ``batch`` holds ``images`` ``(B, 3, H, W)`` (normalised, at network size), ``orig_sizes``
        ``(B, 2)`` (H0, W0) and optionally ``frames`` ``(B, 4)``: where each original lies in its input
        (absent: a plain resize from ``orig_sizes``). Boxes go back through the inverse of each image's
        frame (stretch or letterbox alike) and are clipped to the original image. Returns per image
        ``boxes`` ``(N, 4)`` float32 xyxy, ``scores`` ``(N,)``, ``labels`` ``(N,)``."""
        images = batch["images"]
        size = tuple(images.shape[-2:])
        preds = self.detector.predict(self.detector(images), size)
        orig = batch["orig_sizes"]
        frames = batch.get("frames")
        if frames is None:
            frames = stretch_frames(orig, size)
        for i, p in enumerate(preds):
            # float32 before the map: under bf16 autocast a head's boxes may come out in bf16, whose 8-bit
            # mantissa would misplace a box in a large original by pixels
            p["boxes"] = boxes_to_original(p["boxes"].float(), frames[i], orig[i])
        return preds

    def predict_original_frame(self, batch: dict[str, Tensor]) -> tuple[list[dict], list[dict]]:
        """Predictions and ground truth of a batch in each image's original pixel frame.

        Predictions: :meth:`predictions_in_original_frame`. The ground truth is the file's own
        annotations (``gt_*`` of an evaluation loader's batch: every box as written, with its COCO area
        and crowd flag, so the stats equal pycocotools' on the dataset's file); a batch without them
        (made by hand) has its training boxes mapped back, resized plainly from ``orig_sizes`` if it
        has no ``frames``. One host read per batch (the box counts), none per image."""
        preds = self.predictions_in_original_frame(batch)
        if "gt_boxes" in batch:
            columns = {"boxes": batch["gt_boxes"], "labels": batch["gt_labels"], "difficult": batch["gt_difficult"],
                       "iscrowd": batch["gt_iscrowd"], "area": batch["gt_area"]}
            counts = batch["gt_counts"].tolist()
        else:
            orig = batch["orig_sizes"]
            frames = batch.get("frames")
            if frames is None:
                frames = stretch_frames(orig, tuple(batch["images"].shape[-2:]))
            gt_boxes = boxes_to_original(batch["boxes"], frames[:, None], orig[:, None])  # (B, M, 4), whole batch
            columns = {"boxes": gt_boxes, "labels": batch["labels"], "difficult": batch["difficult"],
                       "iscrowd": batch["iscrowd"]}
            counts = batch["mask"].sum(1).tolist()  # padding is at the end of each row (collate_detection)
        targets = [{k: v[i, :n] for k, v in columns.items()} for i, n in enumerate(counts)]
        return preds, targets

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, list[dict]]:
        """Returns predictions and ground truth in the original image frame, for callbacks
        (sample pictures, result files)."""
        preds, targets = self.predict_original_frame(batch)
        self.coco_map.update(preds, targets)
        self.voc_map.update(preds, targets)
        return {"preds": preds, "targets": targets}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, list[dict]]:
        return self.validation_step(batch, batch_idx)

    def compute_metrics(self) -> dict[str, Tensor]:
        metrics = {**self.coco_map.compute(), **self.voc_map.compute()}
        self.coco_map.reset()
        self.voc_map.reset()
        return metrics

    def _log_metrics(self, stage: str) -> None:
        metrics = self.compute_metrics()
        self.last_metrics = metrics
        scalars = {f"{stage}/{k}": v.float() for k, v in metrics.items() if v.numel() == 1}
        for name, values in metrics.items():
            if values.numel() > 1 and values.numel() == len(self.class_names):
                scalars.update({f"{stage}/{name}/{c}": v.float() for c, v in zip(self.class_names, values)})
        self.log(f"{stage}/map_50", scalars.pop(f"{stage}/map_50"), prog_bar=True)
        self.log_dict(scalars)  # metric states are synced across processes already, the values agree

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_state"] = collect_rng_state()
        if self.step_plan.warmup_steps is not None:  # a time budget planned the run's length: it resumes as planned
            checkpoint["step_plan"] = self.step_plan.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")
        if "step_plan" in checkpoint:
            self.step_plan.load_state(checkpoint["step_plan"])

    # ---- optimisation --------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.detector.named_parameters():
            if not p.requires_grad:
                continue
            # BN affine, biases and the L2Norm scale are 1-D: decaying them only hurts
            (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.schedule is None:
            return optimizer
        scheduler = self.schedule.build(optimizer, self.step_plan)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """The schedule learns the run's length here, after Lightning made the training loader and
        restored the checkpoint (see ``StepPlan``), and the current step's learning rate is set."""
        if self.schedule is None:
            return
        trainer = self.trainer
        if self.step_plan.warmup_steps is None:  # else a time budget's plan, restored from the checkpoint
            estimated = trainer.estimated_stepping_batches  # inf with max_epochs=-1: a time budget plans it
            self.step_plan.total_steps = int(estimated) if math.isfinite(estimated) else None
        self.step_plan.steps_per_epoch = max(math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches), 1)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler  # the LambdaLR of WarmupSchedule.build: its lambdas read the plan
            for group, base_lr, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                                  scheduler.lr_lambdas):
                group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
