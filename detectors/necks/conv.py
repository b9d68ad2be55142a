"""A neck of plain 3x3 convs on the backbone's deepest map: yolov2-tiny.cfg's (one 3x3 conv of 512 between the
trunk and the region layer's predictor). Every conv is darknet's BN + leaky ReLU 0.1 layer (``ConvBN``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detectors.layers import ConvBN, init_kaiming


class ConvNeck(nn.Module):
    """3x3 convs of ``channels`` (one width per conv) on the backbone's deepest map.

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``); the
            deepest map is used.
        channels: the widths of the convs in order, e.g. [512] (yolov2-tiny.cfg).
        darknet_bn: darknet's inference batch norm (``detectors.layers.DarknetBatchNorm2d``), for imported weights.

    forward: [..., (B, C, h, w)] -> [(B, channels[-1], h, w)].
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], channels: Sequence[int] = (512,),
                 darknet_bn: bool = False):
        super().__init__()
        widths = [int(c) for c in ([channels] if isinstance(channels, int) else channels)]
        if not widths:
            raise ValueError("neck.channels: give one width per conv, e.g. [512]")
        ins = [int(in_channels[-1]), *widths[:-1]]
        self.convs = nn.Sequential(*(ConvBN(i, o, 3, darknet_bn=darknet_bn) for i, o in zip(ins, widths)))
        self.out_channels = (widths[-1],)
        self.strides = (int(in_strides[-1]),)
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [self.convs(feats[-1])]
