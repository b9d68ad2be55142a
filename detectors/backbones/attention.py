"""Attention plug-ins for any backbone: squeeze-and-excitation and CBAM.

``backbone.attention=se|cbam|null`` puts one block where the papers put them: inside each residual
block before the addition (DarkNet-53, as SE-ResNet and CBAM-ResNet do) and on each stage output of
the plain stacks (VGG16, DarkNet-19, MobileNet).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al. 2018): global average pool -> FC C/r -> ReLU -> FC C -> sigmoid, which
    scales each channel. The FCs are 1x1 convs with biases (the same parameters as the paper's FCs):
    2 C (C / r) + C / r + C parameters.

    x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(w)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel attention, then spatial.

    Channel: average- and max-pooled descriptors through one shared MLP (C -> C/r -> C, ReLU),
    summed, sigmoid. Spatial: the channel-wise mean and max (2 maps) through a 7x7 conv and BatchNorm
    (the authors' code), sigmoid. Parameters: 2 C (C / r) + C / r + C (MLP) + 98 (conv) + 2 (BN).

    x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(1)
        )

    def forward(self, x: Tensor) -> Tensor:
        channel = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(channel)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


ATTENTION = {"se": SqueezeExcitation, "cbam": CBAM}


def make_attention(kind: str | None, channels: int) -> nn.Module:
    """'se' | 'cbam' | None (identity) for a map of ``channels``; anything else is a clear error."""
    if kind is None or kind in ("none", "null"):
        return nn.Identity()
    if kind not in ATTENTION:
        raise ValueError(f"backbone.attention={kind!r} is not one of {sorted(ATTENTION)} or null")
    return ATTENTION[kind](channels)
