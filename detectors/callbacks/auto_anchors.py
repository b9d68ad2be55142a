"""``head.anchors=auto``: the anchors fitted to the training boxes before the first step.

At the start of fit (after Lightning restored a checkpoint, before the first step), for a YOLO head built
with ``anchors: auto`` (``detectors.heads.yolo_grid``): the training split's boxes at the input size, placed
as the training resize places them (``detectors.data.training_boxes``: the annotations only, no image is
decoded unless the source generates its boxes with the images), then ``detectors.anchors.auto.choose_anchors``
(the configured fit, k-means when it is under the head's ``auto_anchors.threshold``, the better of the two),
one log line with both fits, and the chosen anchors into the head (``set_anchors``: a state-dict buffer, so
predict, export and a resume use them). A resumed run takes them from its checkpoint and computes nothing.
Under DDP the global-zero process computes and broadcasts.

For SSD's priors and the RPN's anchors there is no k-means: with ``report_priors`` the callback logs their
fit (``detectors.anchors.fit.detector_fit``) when the source has its boxes without the images.

Checkpoints also carry what was chosen, for people: ``checkpoint["auto_anchors"]`` = {anchors, used
("k-means" or "configured"), configured: {share, mean_iou}, kmeans: {share, mean_iou} or None, num_boxes}.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from detectors.anchors.auto import AnchorChoice, choose_anchors
from detectors.anchors.fit import detector_fit
from detectors.data.training_boxes import (
    boxes_at_input,
    training_records,
    training_resize,
)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_KEY", "AutoAnchors", "checkpoint_entry"]

CHECKPOINT_KEY = "auto_anchors"


def checkpoint_entry(choice: AnchorChoice) -> dict[str, Any]:
    """What a checkpoint's ``auto_anchors`` entry holds (plain Python: loadable with weights_only)."""
    def fit(f):
        return None if f is None else {"share": f.share, "mean_iou": f.mean_iou}
    return {"anchors": [[float(w), float(h)] for w, h in choice.anchors.tolist()],
            "used": "k-means" if choice.used_kmeans else "configured", "num_boxes": choice.configured.num_boxes,
            "configured": fit(choice.configured), "kmeans": fit(choice.kmeans)}


class AutoAnchors(L.Callback):
    """Fits an ``anchors: auto`` YOLO head's anchors to the training boxes before the first step (see the
    module docstring); a no-op for other heads unless ``report_priors`` (SSD, RPN: the fit is logged)."""

    def __init__(self, report_priors: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.report_priors = report_priors
        self.seed = seed
        self.entry: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        head = pl_module.detector.head
        auto = getattr(head, "auto_anchors", None)
        if auto is not None:
            if trainer.ckpt_path is not None:  # resuming: the state dict brought the run's anchors back
                log.info("anchors: restored from %s: %s", trainer.ckpt_path, head.anchors.tolist())
                return
            anchors = None
            if trainer.is_global_zero:
                choice = choose_anchors(self._box_sizes(trainer, head.input_size), head.anchors,
                                        auto["threshold"], auto["iou"], self.seed)
                log.info("%s", choice.describe())
                anchors, self.entry = choice.anchors.tolist(), checkpoint_entry(choice)
            anchors, self.entry = trainer.strategy.broadcast((anchors, self.entry), src=0)
            head.set_anchors(anchors)
        elif self.report_priors and (hasattr(head, "priors") or hasattr(head, "make_anchors")) \
                and trainer.is_global_zero:
            self._report(trainer, pl_module)

    def _training_boxes(self, trainer: L.Trainer, input_size, allow_generated: bool = True):
        datamodule = trainer.datamodule
        if getattr(datamodule, "source", None) is None:  # fit() given plain loaders (benchmarks): no boxes to read
            return None
        records, generated = training_records(datamodule.source)
        if generated and not allow_generated:
            return None
        _, letterbox, min_box_size = training_resize(datamodule)
        return boxes_at_input(records, input_size, letterbox, min_box_size)[0]

    def _box_sizes(self, trainer: L.Trainer, input_size):
        """(N, 2) the training boxes' widths and heights in pixels of an input of ``input_size``."""
        boxes = self._training_boxes(trainer, input_size)
        if boxes is None:
            raise RuntimeError("head.anchors=auto fits the anchors to the training boxes of the run's datamodule "
                               "(DetectionDataModule), and this fit has none: list the anchors instead")
        return boxes[:, 2:] - boxes[:, :2]

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        input_size = pl_module.input_size
        boxes = self._training_boxes(trainer, input_size, allow_generated=False)
        if boxes is None:  # the shapes: their boxes come only with the images, not worth generating for a line
            return
        noun = "priors" if hasattr(pl_module.detector.head, "priors") else "anchors"
        fit = detector_fit(pl_module.detector, boxes, input_size)
        if fit is not None and fit.num_boxes:
            log.info("%s: fit %.4f of %d boxes >= %g IoU where the grid places them (mean %.4f); not refitted: "
                     "their sizes are set in the head config", noun, fit.share, fit.num_boxes, fit.threshold,
                     fit.mean_iou)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.entry is not None:
            checkpoint[CHECKPOINT_KEY] = self.entry

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.entry = checkpoint.get(CHECKPOINT_KEY, self.entry)
