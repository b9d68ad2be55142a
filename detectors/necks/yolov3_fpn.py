"""YOLOv3's neck: the top-down path over three scales (Redmon and Farhadi 2018, sec. 2.3 "Predictions
Across Scales"; darknet's yolov3.cfg after DarkNet-53's 52nd conv).

On the deepest map a five-conv block (1x1, 3x3, 1x1, 3x3, 1x1 at widths c, 2c, c, 2c, c; c = 512 at
stride 32) whose output goes two ways: to that scale's head branch, one 3x3 conv at 2c (the conv before
each ``[yolo]`` layer's 1x1 predictor), and up: a 1x1 conv to c/2, 2x nearest upsample, concatenated
with the backbone's map at the next finer stride (darknet's ``[route] layers = -1, 61``: the upsampled
map first), then that scale's five-conv block at c/2, and so on down to stride 8 (c/4 = 128). Every
conv is darknet's BN + leaky ReLU 0.1 layer (``ConvBN``).

The maps come out finest first, strides ascending as the backbone's and as ``strides`` says: at 416,
52x52x256, 26x26x512, 13x13x1024 (the head's 1x1 convs make them 255 = 3 x (5 + 80) deep on COCO).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.layers import ConvBN, init_kaiming


def five_conv_block(in_channels: int, channels: int) -> nn.Sequential:
    """1x1 c, 3x3 2c, 1x1 c, 3x3 2c, 1x1 c: (B, in_channels, h, w) -> (B, c, h, w)."""
    return nn.Sequential(ConvBN(in_channels, channels, 1), ConvBN(channels, 2 * channels, 3),
                         ConvBN(2 * channels, channels, 1), ConvBN(channels, 2 * channels, 3),
                         ConvBN(2 * channels, channels, 1))


class YOLOv3FPN(nn.Module):
    """YOLOv3's top-down neck on a backbone's maps at strides s, 2s, 4s, ... (DarkNet-53's 8, 16, 32).

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``):
            one map or more, strides ascending, each twice the one before.
        channels: width c of the deepest level's five-conv block (512, the paper's); each finer level
            has half its coarser neighbour's (256, 128). The head branches are 2c wide.

    forward: [(B, C_l, h_l, w_l)] finest first -> [(B, 2 c_l, h_l, w_l)] finest first, c_l = channels / 2^(L-1-l).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], channels: int = 512):
        super().__init__()
        in_channels, in_strides = tuple(int(c) for c in in_channels), tuple(int(s) for s in in_strides)
        if not in_channels or any(b != 2 * a for a, b in zip(in_strides, in_strides[1:])):
            raise ValueError(f"the YOLOv3 neck takes backbone maps at strides s, 2s, 4s, ..., got {in_strides}: "
                             f"set backbone.out_strides=[8,16,32]")
        levels = len(in_channels)
        widths = [channels // 2 ** (levels - 1 - i) for i in range(levels)]  # finest first: 128, 256, 512
        if min(widths) < 1:
            raise ValueError(f"neck.channels={channels} is too narrow for {levels} levels")
        blocks, branches, laterals = [], [], []
        for i in reversed(range(levels)):  # coarsest first, as the data flows
            upsampled = widths[i + 1] // 2 if i + 1 < levels else 0
            blocks.append(five_conv_block(in_channels[i] + upsampled, widths[i]))
            branches.append(ConvBN(widths[i], 2 * widths[i], 3))
            if i > 0:
                laterals.append(ConvBN(widths[i], widths[i] // 2, 1))
        # indexed coarsest first, the order the data flows in
        self.blocks, self.branches, self.laterals = nn.ModuleList(blocks), nn.ModuleList(branches), nn.ModuleList(laterals)
        self.out_channels = tuple(2 * w for w in widths)
        self.strides = in_strides
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs = []
        x = None
        for k, feat in enumerate(reversed(feats)):  # coarsest first
            if x is not None:
                # nearest to the finer map's size: exactly 2x, or one less where the backbone rounded up
                # an odd side (the 2x map then covers it)
                up = F.interpolate(self.laterals[k - 1](x), scale_factor=2.0, mode="nearest")
                feat = torch.cat([up[..., :feat.shape[-2], :feat.shape[-1]], feat], 1)
            x = self.blocks[k](feat)
            outs.append(self.branches[k](x))
        return outs[::-1]
