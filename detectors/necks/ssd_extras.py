"""SSD's neck: conv6/conv7 on the backbone's deepest map, L2Norm on its first, and the extra layers.

SSD (Liu et al. 2016, sec. 3) turns VGG16's pool5/fc6/fc7 into pool5 3x3/1, conv6 (3x3, dilation 6)
and conv7 (1x1), and adds extra blocks down to a 1x1 map. Here those are the neck's, for any
backbone (torchvision's SSD keeps them with its extra layers too): the backbone returns its maps at
the strides it is asked for, and the neck adds as many extra blocks as the head's levels need.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def extra_block(in_ch: int, mid: int, out: int, stride: int, padding: int, kernel_size: int, batch_norm: bool,
                depthwise: bool) -> nn.Sequential:
    """One extra level: 1x1 reduction to ``mid``, then a ``kernel_size`` conv to ``out`` (SSD), or
    SSDLite's depthwise separable form (1x1, depthwise 3x3, 1x1, each BN + ReLU6; torchvision's
    ``ssdlite`` extra block)."""
    if not depthwise:
        return nn.Sequential(
            *conv_block(in_ch, mid, batch_norm, kernel_size=1),
            *conv_block(mid, out, batch_norm, kernel_size=kernel_size, stride=stride, padding=padding),
        )

    def bn_relu6(conv: nn.Conv2d) -> list[nn.Module]:
        return [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU6(inplace=True)]

    return nn.Sequential(
        *bn_relu6(nn.Conv2d(in_ch, mid, 1, bias=False)),
        *bn_relu6(nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=padding, groups=mid, bias=False)),
        *bn_relu6(nn.Conv2d(mid, out, 1, bias=False)),
    )


class SSDExtras(nn.Module):
    """Levels for an SSD head from any backbone's maps.

    Args:
        in_channels, in_strides: the backbone's ``out_channels`` and ``strides`` (set by ``Detector``).
        num_levels: feature maps the head predicts on (SSD300: 6, SSD512: 7, SSDLite: 6; the configs take
            it from the head's ``priors.aspect_ratios``, one entry per level).
        fc7: {channels, dilation} of SSD's conv6/conv7 on the deepest backbone map (pool 3x3/1, 3x3 conv
            with that dilation, 1x1 conv), whose output replaces that map; None: the map goes on as it is.
        blocks: extra blocks (mid_channels, out_channels, stride, padding[, kernel_size]); the last
            ``num_levels - len(in_channels)`` are used, so a backbone returning more maps needs fewer
            extras (the SSD300 list turns a 19x19 map into 10, 5, 3 and 1; a 10x10 one takes the last three).
        batch_norm: BatchNorm after every conv (from-scratch training); None: as the backbone's convs
            (``in_batch_norm``).
        in_batch_norm: whether the backbone's convs are batch-normalised (its ``uses_batch_norm``; set by
            ``Detector``).
        l2norm_scale: initial L2Norm scale on the first map for 512 channels (SSD's 20; scaled by
            sqrt(C / 512) for a map of C channels); None: no L2Norm.
        depthwise: SSDLite's depthwise separable extra blocks.

    forward: backbone maps [f_1 .. f_n] -> num_levels maps [L2Norm(f_1), f_2, .., conv7(f_n), extra_1, ..].
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_levels: int = 6,
        fc7: Mapping[str, int] | None = None,
        blocks: Sequence[Sequence[int]] = ((256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)),
        batch_norm: bool | None = None,
        l2norm_scale: float | None = 20.0,
        depthwise: bool = False,
        in_batch_norm: bool = True,
    ):
        super().__init__()
        in_channels, in_strides = tuple(int(c) for c in in_channels), tuple(int(s) for s in in_strides)
        batch_norm = in_batch_norm if batch_norm is None else batch_norm
        num_extras = num_levels - len(in_channels)
        if num_extras < 0 or num_extras > len(blocks):
            raise ValueError(
                f"the SSD neck makes {num_levels} levels from {len(in_channels)} backbone maps (strides {in_strides}) "
                f"with at most {len(blocks)} extra blocks; choose backbone.out_strides with "
                f"{max(num_levels - len(blocks), 1)} to {num_levels} strides"
            )
        ch = in_channels[-1]
        self.fc7 = nn.Identity()
        if fc7:
            width, dilation = int(fc7["channels"]), int(fc7.get("dilation", 6))
            self.fc7 = nn.Sequential(
                nn.MaxPool2d(3, stride=1, padding=1),
                *conv_block(ch, width, batch_norm, kernel_size=3, padding=dilation, dilation=dilation),
                *conv_block(width, width, batch_norm, kernel_size=1),
            )
            ch = width
        # on the first level (conv4_3 in SSD300; with a single backbone map, conv7). The scale 20 is for
        # conv4_3's 512 channels: a per-element RMS of 20 / sqrt(512); other widths start at that RMS too
        # (20 on a 32-channel map would start 4x larger, and so would the logits)
        first = in_channels[0] if len(in_channels) > 1 else ch
        self.l2norm = L2Norm(first, l2norm_scale * math.sqrt(first / 512)) if l2norm_scale else nn.Identity()
        self.blocks = nn.ModuleList()
        strides, channels = list(in_strides), [*in_channels[:-1], ch]
        for spec in list(blocks)[len(blocks) - num_extras:]:
            mid, out, stride, padding = (int(v) for v in spec[:4])
            kernel = int(spec[4]) if len(spec) > 4 else 3
            self.blocks.append(extra_block(ch, mid, out, stride, padding, kernel, batch_norm, depthwise))
            ch = out
            channels.append(out)
            strides.append(strides[-1] * stride)  # nominal: a valid 3x3 conv shrinks the map without a stride
        self.out_channels = tuple(channels)
        self.strides = tuple(strides)
        init_kaiming(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = self.fc7(feats[-1])
        outs = [*feats[:-1], x]
        outs[0] = self.l2norm(outs[0])
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs
