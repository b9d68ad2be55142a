"""Detector = backbone + neck + head, a plain nn.Module."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class Detector(nn.Module):
    """Composes the three swappable parts; the head owns loss and decoding.

    Args:
        backbone: a ``Backbone`` (``out_channels``, ``strides``, input mean/std and sizes).
        neck: a module, or a callable (Hydra's ``_partial_: true``) called as
            ``neck(in_channels=backbone.out_channels, in_strides=backbone.strides)``, plus
            ``in_batch_norm=backbone.uses_batch_norm`` where the neck takes that argument.
        head: a module, or a callable called as ``head(in_channels=neck.out_channels, strides=neck.strides)``;
            so ``backbone=X`` is the one config line that changes with the backbone.

    What the input must be (``min_size``, ``size_divisor``) combines what each part declares: the
    backbone's (from its config) and a neck's or head's own ``min_size``/``size_divisor`` attributes
    (e.g. a head whose grid must tile the input); ``DetectionModule`` checks sizes against them.

    forward: images (B, 3, H, W) normalised [, targets: padded batch targets, for two-stage heads that
    sample proposals in training] -> the head's raw outputs (batch-first).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | Callable[..., nn.Module],
                 head: nn.Module | Callable[..., nn.Module]):
        super().__init__()
        self.backbone = backbone
        if not isinstance(neck, nn.Module):
            from_backbone: dict[str, Any] = {"in_channels": tuple(backbone.out_channels),
                                             "in_strides": tuple(backbone.strides)}
            if "in_batch_norm" in inspect.signature(neck).parameters and hasattr(backbone, "uses_batch_norm"):
                from_backbone["in_batch_norm"] = bool(backbone.uses_batch_norm)
            neck = neck(**from_backbone)
        self.neck = neck
        if not isinstance(head, nn.Module):
            channels = getattr(neck, "out_channels", None) or backbone.out_channels
            strides = getattr(neck, "strides", None) or backbone.strides
            head = head(in_channels=tuple(channels), strides=tuple(strides))
        self.head = head

    def size_requirements(self) -> dict[str, tuple[int, int]]:
        """{part: (smallest input side, size divisor)} for the backbone, neck and head (1, 1 where a part
        declares nothing)."""
        parts = {"backbone": self.backbone, "neck": self.neck, "head": self.head}
        return {name: (int(getattr(part, "min_size", 1)), int(getattr(part, "size_divisor", 1)))
                for name, part in parts.items()}

    @property
    def min_size(self) -> int:
        """The smallest input side every part takes."""
        return max(smallest for smallest, _ in self.size_requirements().values())

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this: the least common multiple of the parts' divisors."""
        return math.lcm(*(divisor for _, divisor in self.size_requirements().values()))

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None) -> Any:
        return self.head(self.neck(self.backbone(images)), targets)

    def loss(self, raw: Any, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        return self.head.loss(raw, targets, image_size)

    def predict(self, raw: Any, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        return self.head.predict(raw, image_size)
