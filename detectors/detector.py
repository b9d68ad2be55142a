"""Detector = backbone + neck + head, a plain nn.Module."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Detector(nn.Module):
    """Composes the three swappable parts; the head owns loss and decoding.

    forward: images (B, 3, H, W) normalised -> the head's raw outputs (batch-first).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def forward(self, images: Tensor) -> Any:
        return self.head(self.neck(self.backbone(images)))

    def loss(self, raw: Any, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        return self.head.loss(raw, targets, image_size)

    def predict(self, raw: Any, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        return self.head.predict(raw, image_size)
