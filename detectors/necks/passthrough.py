"""YOLOv2's neck: two 3x3 convs on the deep map, the passthrough from the finer map, one 3x3 conv.

YOLOv2 (Redmon and Farhadi 2017, "Fine-Grained Features"; darknet's yolov2-voc.cfg after DarkNet-19's
last conv): the 26x26x512 map goes through a 1x1 conv to 64 channels and a space-to-depth to
13x13x256, which is concatenated in front of the deep map (after its two 3x3x1024 convs), then a
3x3x1024 conv. Every conv is darknet's BN + leaky ReLU 0.1 layer.

Space-to-depth is ``torch.nn.functional.pixel_unshuffle``: output channel ``4 c + 2 dy + dx`` is
input channel ``c`` at pixel ``(2 y + dy, 2 x + dx)``. darknet's ``reorg`` layer orders the same
values differently, and its CPU/GPU code reads them misaligned (pjreddie/darknet#344: it fills the
output as if reorganising the other way, so it is not the space-to-depth the paper describes); the
order only matters to weights trained through that layer, and the darknet files this project reads
are backbone files (``darknet19_448.conv.23``), which end before it. So the plain, documented op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.layers import ConvBN, init_kaiming


class PassthroughNeck(nn.Module):
    """YOLOv2's passthrough neck on a backbone's maps at strides (s, 2 s), e.g. DarkNet-19's 16 and 32.

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``):
            exactly two maps, the second at twice the stride of the first.
        channels: width of the 3x3 convs (1024).
        passthrough_channels: the 1x1 conv's width on the fine map before space-to-depth (64).

    forward: [fine (B, C_f, 2h, 2w), deep (B, C_d, h, w)] -> [(B, channels, h, w)].
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], channels: int = 1024,
                 passthrough_channels: int = 64):
        super().__init__()
        in_channels, in_strides = tuple(int(c) for c in in_channels), tuple(int(s) for s in in_strides)
        if len(in_channels) != 2 or in_strides[1] != 2 * in_strides[0]:
            raise ValueError(f"the passthrough neck takes two backbone maps at strides (s, 2s), got strides "
                             f"{in_strides}: set backbone.out_strides=[16,32]")
        fine, deep = in_channels
        self.deep = nn.Sequential(ConvBN(deep, channels, 3), ConvBN(channels, channels, 3))
        self.reduce = ConvBN(fine, passthrough_channels, 1)
        self.fuse = ConvBN(4 * passthrough_channels + channels, channels, 3)
        self.out_channels = (channels,)
        self.strides = (in_strides[1],)
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        fine, deep = feats
        passthrough = space_to_depth(self.reduce(fine), deep.shape[-2:])
        # darknet's route -1,-4: the reorganised fine map first, then the deep one
        return [self.fuse(torch.cat([passthrough, self.deep(deep)], 1))]


def space_to_depth(x: Tensor, size: Sequence[int]) -> Tensor:
    """(B, C, 2h, 2w) -> (B, 4C, h, w) by ``pixel_unshuffle(x, 2)``; a map of odd side (a backbone that
    rounds up: 2h - 1) is padded by one row/column of zeros at the bottom/right to reach ``size`` (h, w)."""
    h, w = int(size[0]), int(size[1])
    pad_h, pad_w = 2 * h - x.shape[-2], 2 * w - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"the fine map {tuple(x.shape[-2:])} is larger than twice the deep map {(h, w)}")
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return F.pixel_unshuffle(x, 2)
