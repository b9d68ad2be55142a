"""Detector = backbone + neck + head, a plain nn.Module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class Detector(nn.Module):
    """Composes the three swappable parts; the head owns loss and decoding.

    Args:
        backbone: a ``Backbone`` (``out_channels``, ``strides``, input mean/std and sizes).
        neck: a module, or a callable (Hydra's ``_partial_: true``) called as
            ``neck(in_channels=backbone.out_channels, in_strides=backbone.strides)``.
        head: a module, or a callable called as ``head(in_channels=neck.out_channels, strides=neck.strides)``;
            so ``backbone=X`` is the one config line that changes with the backbone.

    forward: images (B, 3, H, W) normalised [, targets: padded batch targets, for two-stage heads that
    sample proposals in training] -> the head's raw outputs (batch-first).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | Callable[..., nn.Module],
                 head: nn.Module | Callable[..., nn.Module]):
        super().__init__()
        self.backbone = backbone
        if not isinstance(neck, nn.Module):
            neck = neck(in_channels=tuple(backbone.out_channels), in_strides=tuple(backbone.strides))
        self.neck = neck
        if not isinstance(head, nn.Module):
            channels = getattr(neck, "out_channels", None) or backbone.out_channels
            strides = getattr(neck, "strides", None) or backbone.strides
            head = head(in_channels=tuple(channels), strides=tuple(strides))
        self.head = head

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None) -> Any:
        return self.head(self.neck(self.backbone(images)), targets)

    def loss(self, raw: Any, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        return self.head.loss(raw, targets, image_size)

    def predict(self, raw: Any, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        return self.head.predict(raw, image_size)
