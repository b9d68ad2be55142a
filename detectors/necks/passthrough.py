"""YOLOv2's neck: two 3x3 convs on the deep map, the passthrough from the finer map, one 3x3 conv.

YOLOv2 (Redmon and Farhadi 2017, "Fine-Grained Features"; darknet's yolov2-voc.cfg after DarkNet-19's
last conv): the 26x26x512 map goes through a 1x1 conv to 64 channels and a space-to-depth to
13x13x256, which is concatenated in front of the deep map (after its two 3x3x1024 convs), then a
3x3x1024 conv. Every conv is darknet's BN + leaky ReLU 0.1 layer.

Space-to-depth is ``torch.nn.functional.pixel_unshuffle``: output channel ``4 c + 2 dy + dx`` is
input channel ``c`` at pixel ``(2 y + dy, 2 x + dx)``. darknet's ``reorg`` layer orders the same
values differently, and its CPU/GPU code reads them misaligned (pjreddie/darknet#344: it fills the
output as if reorganising the other way, so it is not the space-to-depth the paper describes); the
order only matters to weights trained through that layer: the plain, documented op is the default, and
``reorg='darknet'`` reproduces darknet's layer exactly (:func:`darknet_reorg`) for whole YOLOv2 models imported
with their weights (``python -m detectors.weights darknet``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.layers import ConvBN, init_kaiming

REORGS = ("pixel_unshuffle", "darknet")


class PassthroughNeck(nn.Module):
    """YOLOv2's passthrough neck on a backbone's maps at strides (s, 2 s), e.g. DarkNet-19's 16 and 32.

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``):
            exactly two maps, the second at twice the stride of the first.
        channels: width of the 3x3 convs (1024).
        passthrough_channels: the 1x1 conv's width on the fine map before space-to-depth (64).
        reorg: 'pixel_unshuffle' (the space-to-depth the paper describes) or 'darknet' (darknet's reorg layer's
            own channel order, for weights trained by darknet).
        darknet_bn: darknet's inference batch norm (``detectors.layers.DarknetBatchNorm2d``), for imported weights.

    forward: [fine (B, C_f, 2h, 2w), deep (B, C_d, h, w)] -> [(B, channels, h, w)].
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], channels: int = 1024,
                 passthrough_channels: int = 64, reorg: str = "pixel_unshuffle", darknet_bn: bool = False):
        super().__init__()
        if reorg not in REORGS:
            raise ValueError(f"neck.reorg must be one of {', '.join(REORGS)}, got {reorg!r}")
        self.reorg = reorg
        in_channels, in_strides = tuple(int(c) for c in in_channels), tuple(int(s) for s in in_strides)
        if len(in_channels) != 2 or in_strides[1] != 2 * in_strides[0]:
            raise ValueError(f"the passthrough neck takes two backbone maps at strides (s, 2s), got strides "
                             f"{in_strides}: set backbone.out_strides=[16,32]")
        fine, deep = in_channels
        self.deep = nn.Sequential(ConvBN(deep, channels, 3, darknet_bn=darknet_bn),
                                  ConvBN(channels, channels, 3, darknet_bn=darknet_bn))
        self.reduce = ConvBN(fine, passthrough_channels, 1, darknet_bn=darknet_bn)
        self.fuse = ConvBN(4 * passthrough_channels + channels, channels, 3, darknet_bn=darknet_bn)
        self.out_channels = (channels,)
        self.strides = (in_strides[1],)
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        fine, deep = feats
        passthrough = space_to_depth(self.reduce(fine), deep.shape[-2:], darknet_order=self.reorg == "darknet")
        # darknet's route -1,-4: the reorganised fine map first, then the deep one
        return [self.fuse(torch.cat([passthrough, self.deep(deep)], 1))]


def space_to_depth(x: Tensor, size: Sequence[int], darknet_order: bool = False) -> Tensor:
    """(B, C, 2h, 2w) -> (B, 4C, h, w) by ``pixel_unshuffle(x, 2)`` (or, ``darknet_order``, :func:`darknet_reorg`);
    a map of odd side (a backbone that rounds up: 2h - 1) is padded by one row/column of zeros at the
    bottom/right to reach ``size`` (h, w)."""
    h, w = int(size[0]), int(size[1])
    pad_h, pad_w = 2 * h - x.shape[-2], 2 * w - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"the fine map {tuple(x.shape[-2:])} is larger than twice the deep map {(h, w)}")
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return darknet_reorg(x) if darknet_order else F.pixel_unshuffle(x, 2)


def darknet_reorg(x: Tensor) -> Tensor:
    """darknet's ``[reorg] stride=2`` layer as it runs (reorg_layer.c: ``reorg_cpu(..., forward=0, ...)``):
    it reads the (C, 2h, 2w) input's memory as if it were (C / 4, 4h, 4w) and writes output channel
    ``(2 dy + dx) C / 4 + c`` from that view's pixel ``(2 y + dy, 2 x + dx)`` of channel ``c``, with the output
    itself laid out as (C, 2h, 2w) in memory and read as (4C, h, w) (pjreddie/darknet#344). OpenCV's importer
    does the same. (B, C, 2h, 2w) -> (B, 4C, h, w); C a multiple of 4."""
    batch, channels, height, width = x.shape
    if channels % 4:
        raise ValueError(f"darknet's reorg takes a multiple of 4 channels, got {channels}")
    # the misread input: (C / 4, 4h, 4w) = (C / 4, 2h, dy, 2w, dx) in the memory of (C, 2h, 2w)
    view = x.reshape(batch, channels // 4, height, 2, width, 2)
    return view.permute(0, 3, 5, 1, 2, 4).reshape(batch, 4 * channels, height // 2, width // 2)
