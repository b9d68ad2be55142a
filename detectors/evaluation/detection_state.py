"""The detections/ground-truth store that :mod:`~detectors.evaluation.coco` and
:mod:`~detectors.evaluation.voc` share.

``DetectionStateMetric`` keeps every box of every image passed to ``update`` as
flat "cat" list states on the metric's device, plus per-image row counts, and
hands them back concatenated (and DDP-gathered) to a subclass's ``compute``.
A subclass only adds its own per-GT fields (COCO's crowd flag and area, VOC's
difficult flag) and the evaluation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["DetectionStateMetric"]

# name -> (trailing shape, dtype) of a "cat" list state.
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _cat(state: list[Tensor] | Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Concatenate a list state; after a DDP sync it already is one tensor.

    ``reshape`` restores the trailing shape that torchmetrics loses when it
    stands in an empty 1-D tensor for a rank that saw no data.
    """
    if isinstance(state, Tensor):
        t = state
    elif len(state) == 0:
        t = torch.zeros(0, dtype=dtype, device=device)
    else:
        t = torch.cat([s.reshape(-1, *shape) for s in state])
    return t.reshape(-1, *shape).to(dtype=dtype, device=device)


class DetectionStateMetric(Metric):
    """Base for box metrics that need all detections and ground truth at once.

    ``update(preds, targets)`` takes one dict per image:

    * preds: ``boxes`` ``(N, 4)`` xyxy absolute pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` int64.
    * targets: ``boxes`` ``(M, 4)``, ``labels`` ``(M,)``, plus whatever per-GT
      fields the subclass reads in :meth:`_gt_fields`.

    Subclasses set ``num_classes`` (and ``class_names``) through ``__init__``,
    declare their per-GT states in ``_GT_STATES`` and fill them in
    :meth:`_gt_fields`; ``compute`` reads everything back with :meth:`_concatenated`.
    Boxes and scores are kept in float64 so IoUs equal the reference tools' ones.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # name -> (trailing shape, dtype) of each "cat" list state every subclass has.
    _STATES: ClassVar[StateSpec] = {
        "det_boxes": ((4,), torch.float64),
        "det_scores": ((), torch.float64),
        "det_labels": ((), torch.int64),
        "det_counts": ((), torch.int64),
        "gt_boxes": ((4,), torch.float64),
        "gt_labels": ((), torch.int64),
        "gt_counts": ((), torch.int64),
    }
    # The subclass's extra per-GT states, one row per GT box like gt_boxes. Flags
    # are uint8 because gloo cannot all_gather bool tensors; _concatenated gives
    # them back as bool.
    _GT_STATES: ClassVar[StateSpec] = {}

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        # Flat per-row states; per-image row counts keep images grouped. Unlike a
        # per-row image index, counts need no rank offset: torchmetrics gathers
        # every state in the same rank order, so the counts stay aligned with rows.
        for name in self._all_states():
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @classmethod
    def _all_states(cls) -> StateSpec:
        """The shared states followed by the subclass's per-GT ones."""
        return {**cls._STATES, **cls._GT_STATES}

    def _gt_fields(self, targets: Sequence[dict[str, Tensor]], gt_boxes: Tensor) -> dict[str, Tensor]:
        """The subclass's per-GT rows of one batch, one entry per name in ``_GT_STATES``.

        Args:
            targets: the batch's target dicts, as given to ``update``.
            gt_boxes: ``(M_total, 4)`` float64 on the metric's device, the batch's GT
                boxes in row order (for defaults derived from the box).

        Returns:
            name -> ``(M_total, *shape)`` tensor of the state's dtype on the metric's device.
        """
        return {}

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        """Store one batch; see the class docstring for the dict keys and shapes."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        if len(preds) == 0:
            return
        dev, f64, i64 = self.device, torch.float64, torch.int64
        gt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(dev, f64)
        rows = {
            "det_boxes": torch.cat([p["boxes"].reshape(-1, 4) for p in preds]).to(dev, f64),
            "det_scores": torch.cat([p["scores"].reshape(-1) for p in preds]).to(dev, f64),
            "det_labels": torch.cat([p["labels"].reshape(-1) for p in preds]).to(dev, i64),
            "det_counts": torch.tensor([p["boxes"].shape[0] for p in preds], dtype=i64, device=dev),
            "gt_boxes": gt_boxes,
            "gt_labels": torch.cat([t["labels"].reshape(-1) for t in targets]).to(dev, i64),
            "gt_counts": torch.tensor([t["boxes"].shape[0] for t in targets], dtype=i64, device=dev),
            **self._gt_fields(targets, gt_boxes),
        }
        # Append only once the whole batch converted, so a bad batch leaves the rows
        # and counts aligned.
        for name in self._all_states():
            getattr(self, name).append(rows[name])

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        """Give empty list states a typed empty tensor before torchmetrics gathers them.

        On a rank that saw no update torchmetrics would gather a 1-D float32
        stand-in, which cannot be gathered with the other ranks' (N, 4) float64 rows.
        """
        for name, (shape, dtype) in self._all_states().items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                state.append(torch.zeros(0, *shape, dtype=dtype, device=self.device))
        super()._sync_dist(*args, **kwargs)

    def _concatenated(self) -> dict[str, Tensor]:
        """All stored rows as flat tensors on the metric's device, labels checked.

        Images are numbered in the order they were passed to ``update`` (after a
        DDP sync: rank 0's images, then rank 1's, ...).

        Returns:
            ``det_boxes`` ``(N, 4)`` float64, ``det_scores`` ``(N,)`` float64,
            ``det_labels`` ``(N,)`` int64, ``det_image`` ``(N,)`` int64,
            ``gt_boxes`` ``(M, 4)`` float64, ``gt_labels`` ``(M,)`` int64,
            ``gt_image`` ``(M,)`` int64, and each ``_GT_STATES`` entry as
            ``(M, *shape)`` of its dtype (uint8 flags as bool).

        Raises:
            ValueError: a label outside ``[0, num_classes)``.
        """
        dev = self.device
        s = {name: _cat(getattr(self, name), shape, dtype, dev) for name, (shape, dtype) in self._all_states().items()}
        for name, (_, dtype) in self._GT_STATES.items():
            if dtype == torch.uint8:
                s[name] = s[name].bool()
        det_counts, gt_counts = s.pop("det_counts"), s.pop("gt_counts")
        images = torch.arange(det_counts.numel(), device=dev)
        s["det_image"] = torch.repeat_interleave(images, det_counts)
        s["gt_image"] = torch.repeat_interleave(images, gt_counts)
        for labels in (s["det_labels"], s["gt_labels"]):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.unique().tolist()}")
        return s
