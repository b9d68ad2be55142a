"""SSD's extra feature layers and the L2 normalisation of conv4_3."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detectors.layers import conv_block, init_kaiming


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet; SSD sec. 3.1:
    conv4_3 features have a different scale from the deeper layers, init 20)."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.float().pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=self.eps)
        return (x.float() / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


class SSDExtras(nn.Module):
    """Extra layers after conv7: each block is a 1x1 reduction then a 3x3 conv, stride 2 with
    padding 1 (halves the map) or stride 1 without padding (SSD300's last two: 3x3 -> 1x1).

    Args:
        in_channels: channels of the backbone's maps, e.g. (512, 1024) for VGG16 conv4_3, conv7.
        blocks: (mid_channels, out_channels, stride, padding) per extra block; the SSD300 default
            gives 10x10, 5x5, 3x3 and 1x1 maps from a 19x19 conv7.
        batch_norm: BatchNorm after every extra conv (from-scratch training).
        l2norm_scale: initial L2Norm scale applied to the first backbone map (None: no L2Norm).

    forward: backbone maps [conv4_3, conv7] -> [conv4_3 normalised, conv7, extra_1, ..., extra_n].
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024),
        blocks: Sequence[Sequence[int]] = ((256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)),
        batch_norm: bool = True,
        l2norm_scale: float | None = 20.0,
    ):
        super().__init__()
        self.l2norm = L2Norm(in_channels[0], l2norm_scale) if l2norm_scale else nn.Identity()
        layers = []
        ch = in_channels[-1]
        for mid, out, stride, padding in blocks:
            layers.append(
                nn.Sequential(
                    *conv_block(ch, mid, batch_norm, kernel_size=1),
                    *conv_block(mid, out, batch_norm, kernel_size=3, stride=stride, padding=padding),
                )
            )
            ch = out
        self.blocks = nn.ModuleList(layers)
        self.out_channels = (*in_channels, *(b[1] for b in blocks))
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = [self.l2norm(feats[0]), *feats[1:]]
        x = feats[-1]
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs
