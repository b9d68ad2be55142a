"""YOLOv3's neck: the top-down path over three scales (Redmon and Farhadi 2018, sec. 2.3 "Predictions
Across Scales"; darknet's yolov3.cfg after DarkNet-53's 52nd conv).

On the deepest map a five-conv block (1x1, 3x3, 1x1, 3x3, 1x1 at widths c, 2c, c, 2c, c; c = 512 at
stride 32) whose output goes two ways: to that scale's head branch, one 3x3 conv at 2c (the conv before
each ``[yolo]`` layer's 1x1 predictor), and up: a 1x1 conv to c/2, 2x nearest upsample, concatenated
with the backbone's map at the next finer stride (darknet's ``[route] layers = -1, 61``: the upsampled
map first), then that scale's five-conv block at c/2, and so on down to stride 8 (c/4 = 128). Every
conv is darknet's BN + leaky ReLU 0.1 layer (``ConvBN``). With ``spp`` the deepest block is yolov3-spp.cfg's:
spatial pyramid pooling (max-pools 5, 9, 13 at stride 1, concatenated with their input) between its third
and fourth conv, and a sixth conv.

The maps come out finest first, strides ascending as the backbone's and as ``strides`` says: at 416,
52x52x256, 26x26x512, 13x13x1024 (the head's 1x1 convs make them 255 = 3 x (5 + 80) deep on COCO).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.layers import ConvBN, init_kaiming


def five_conv_block(in_channels: int, channels: int, darknet_bn: bool = False) -> nn.Sequential:
    """1x1 c, 3x3 2c, 1x1 c, 3x3 2c, 1x1 c: (B, in_channels, h, w) -> (B, c, h, w)."""
    return nn.Sequential(ConvBN(in_channels, channels, 1, darknet_bn=darknet_bn),
                         ConvBN(channels, 2 * channels, 3, darknet_bn=darknet_bn),
                         ConvBN(2 * channels, channels, 1, darknet_bn=darknet_bn),
                         ConvBN(channels, 2 * channels, 3, darknet_bn=darknet_bn),
                         ConvBN(2 * channels, channels, 1, darknet_bn=darknet_bn))


class SpatialPyramidPooling(nn.Module):
    """yolov3-spp.cfg's SPP: max-pools of sizes 5, 9, 13 at stride 1 ('same' padding: darknet pads size - 1 around,
    half before), concatenated largest first with the input (``[route] layers=-1,-3,-5,-6``).

    x (B, C, h, w) -> (B, 4 C, h, w).
    """

    def __init__(self, sizes: Sequence[int] = (5, 9, 13)):
        super().__init__()
        self.sizes = tuple(int(k) for k in sizes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in reversed(self.sizes)]
        return torch.cat([*pooled, x], 1)


def spp_conv_block(in_channels: int, channels: int, darknet_bn: bool = False) -> nn.Sequential:
    """yolov3-spp.cfg's deepest block: 1x1 c, 3x3 2c, 1x1 c, SPP (4c), 1x1 c, 3x3 2c, 1x1 c:
    (B, in_channels, h, w) -> (B, c, h, w)."""
    return nn.Sequential(ConvBN(in_channels, channels, 1, darknet_bn=darknet_bn),
                         ConvBN(channels, 2 * channels, 3, darknet_bn=darknet_bn),
                         ConvBN(2 * channels, channels, 1, darknet_bn=darknet_bn),
                         SpatialPyramidPooling(),
                         ConvBN(4 * channels, channels, 1, darknet_bn=darknet_bn),
                         ConvBN(channels, 2 * channels, 3, darknet_bn=darknet_bn),
                         ConvBN(2 * channels, channels, 1, darknet_bn=darknet_bn))


class YOLOv3FPN(nn.Module):
    """YOLOv3's top-down neck on a backbone's maps at strides s, 2s, 4s, ... (DarkNet-53's 8, 16, 32).

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``):
            one map or more, strides ascending, each twice the one before.
        channels: width c of the deepest level's five-conv block (512, the paper's); each finer level
            has half its coarser neighbour's (256, 128). The head branches are 2c wide.
        spp: the deepest block with spatial pyramid pooling (yolov3-spp.cfg's).
        tiny: yolov3-tiny.cfg's neck: the deepest level's block is one 1x1 conv to c, the finer levels have none
            (their branch's 3x3 conv reads the concatenation directly).
        darknet_bn: darknet's inference batch norm (``detectors.layers.DarknetBatchNorm2d``), for imported weights.

    forward: [(B, C_l, h_l, w_l)] finest first -> [(B, 2 c_l, h_l, w_l)] finest first, c_l = channels / 2^(L-1-l).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], channels: int = 512, spp: bool = False,
                 tiny: bool = False, darknet_bn: bool = False):
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
            block_in = in_channels[i] + upsampled
            if tiny:  # yolov3-tiny: a 1x1 conv on the deepest map, nothing on the concatenations
                block = ConvBN(block_in, widths[i], 1, darknet_bn=darknet_bn) if i == levels - 1 else nn.Identity()
            else:
                block = (spp_conv_block if spp and i == levels - 1 else five_conv_block)(block_in, widths[i], darknet_bn)
            blocks.append(block)
            branch_in = block_in if isinstance(block, nn.Identity) else widths[i]
            branches.append(ConvBN(branch_in, 2 * widths[i], 3, darknet_bn=darknet_bn))
            if i > 0:
                laterals.append(ConvBN(branch_in, widths[i] // 2, 1, darknet_bn=darknet_bn))
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
