"""DarkNet-19 (YOLOv2, Redmon and Farhadi 2017, Table 6) and DarkNet-53 (YOLOv3, Redmon and Farhadi
2018, Table 1) without their classifiers, as backbones.

Every conv is darknet's ``batch_normalize=1`` convolutional layer: Conv2d without bias (BN's shift
is the bias), BatchNorm2d, LeakyReLU(0.1). Both nets load darknet's own ``.weights`` files
(``darknet19_448.conv.23``, ``darknet53.conv.74``, the front of ``yolov3.weights`` ...) as well as
state dicts of this module. darknet's weights see RGB in 0..1: the default mean/std are 0 and 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from detectors.backbones.attention import make_attention
from detectors.backbones.base import UNIT_MEAN, UNIT_STD, SequentialBackbone, stack_with_pools
from detectors.backbones.weights import load_darknet_weights
from detectors.layers import ConvBN

# YOLOv2 Table 6 up to its last 3x3 conv: (filters, kernel) or "M", a 2x2/2 max-pool
DARKNET19_LAYERS: list[tuple[int, int] | str] = [
    (32, 3), "M", (64, 3), "M", (128, 3), (64, 1), (128, 3), "M", (256, 3), (128, 1), (256, 3), "M",
    (512, 3), (256, 1), (512, 3), (256, 1), (512, 3), "M",
    (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3),
]
# YOLOv3 Table 1: (channels after the stage's stride-2 conv, residual blocks) for strides 2 .. 32
DARKNET53_STAGES: list[tuple[int, int]] = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]
# the trunk of yolov2-tiny.cfg and yolov3-tiny.cfg: 3x3 convs, "M" a 2x2/2 max-pool, "S" darknet's 2x2/1 max-pool
DARKNET_TINY_LAYERS: list[tuple[int, int] | str] = [
    (16, 3), "M", (32, 3), "M", (64, 3), "M", (128, 3), "M", (256, 3), "M", (512, 3), "S", (1024, 3),
]


class DarknetMaxPool2d(nn.MaxPool2d):
    """darknet's ``[maxpool]`` of stride 1 (tiny cfgs: size 2): its padding is size - 1, all of it after the map
    (maxpool_layer.c: offset -pad/2 = 0 for size 2), so the map keeps its size and the last row and column see
    only themselves. x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, kernel_size: int = 2):
        super().__init__(kernel_size, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        before = (self.kernel_size - 1) // 2  # darknet's -pad/2 with pad = size - 1 (integer division)
        after = self.kernel_size - 1 - before
        return super().forward(F.pad(x, (before, after, before, after), value=float("-inf")))


class Residual(nn.Module):
    """DarkNet-53's residual block: 1x1 conv to C/2, 3x3 conv back to C, optional attention on that
    branch (before the addition, as SE-ResNet and CBAM-ResNet place it), then x + branch (darknet's
    ``shortcut`` layer, linear activation).

    x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, attention: str | None = None, darknet_bn: bool = False):
        super().__init__()
        self.reduce = ConvBN(channels, channels // 2, 1, darknet_bn=darknet_bn)
        self.expand = ConvBN(channels // 2, channels, 3, darknet_bn=darknet_bn)
        self.attention = make_attention(attention, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.expand(self.reduce(x)))


def darknet19_features(darknet_bn: bool = False) -> tuple[nn.Sequential, dict[int, tuple[int, int]]]:
    """DarkNet-19's layers and taps: stride -> (index of the last layer at that stride, channels):
    1 conv 32, 2 conv 64, 4 conv 128, 8 conv 256, 16 the 13th conv (512; YOLOv2's passthrough
    reads it), 32 the 18th conv (1024). darknet's maxpool covers the last row/column of an odd map
    (its output is ceil(H / 2)), as the ceil-mode pools here do."""
    return stack_with_pools(DARKNET19_LAYERS, lambda in_ch, spec: ConvBN(in_ch, spec[0], spec[1], darknet_bn=darknet_bn))


def darknet_tiny_features(darknet_bn: bool = False) -> tuple[nn.Sequential, dict[int, tuple[int, int]]]:
    """The tiny trunk's layers and taps: stride -> (index of the last layer at that stride, channels): 16 the
    256-wide conv (yolov3-tiny's route to its finer scale), 32 the 1024-wide conv after the 2x2/1 pool."""
    layers: list[nn.Module] = []
    taps: dict[int, tuple[int, int]] = {}
    in_ch, stride = 3, 1
    for entry in DARKNET_TINY_LAYERS:
        if entry == "M":
            taps[stride] = (len(layers) - 1, in_ch)
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # darknet's 2x2/2 pool: ceil(H / 2), as VGG's here
            stride *= 2
        elif entry == "S":
            layers.append(DarknetMaxPool2d(2))
        else:
            layers.append(ConvBN(in_ch, entry[0], entry[1], darknet_bn=darknet_bn))
            in_ch = entry[0]
    taps[stride] = (len(layers) - 1, in_ch)
    return nn.Sequential(*layers), taps


def darknet53_features(attention: str | None, darknet_bn: bool = False
                       ) -> tuple[nn.Sequential, dict[int, tuple[int, int]]]:
    """DarkNet-53's layers: the 3x3 stem conv (index 0), then one ``nn.Sequential`` per stage (stride-2
    3x3 conv, residual blocks), and its taps: stride 2 ** i -> (i, the stage's channels)."""
    layers: list[nn.Module] = [ConvBN(3, 32, 3, darknet_bn=darknet_bn)]
    taps: dict[int, tuple[int, int]] = {}
    in_ch = 32
    for i, (ch, blocks) in enumerate(DARKNET53_STAGES, start=1):
        layers.append(nn.Sequential(ConvBN(in_ch, ch, 3, stride=2, darknet_bn=darknet_bn),
                                    *[Residual(ch, attention, darknet_bn) for _ in range(blocks)]))
        taps[2 ** i] = (i, ch)
        in_ch = ch
    return nn.Sequential(*layers), taps


def is_darknet_file(weights: str) -> bool:
    """darknet's own files: ``*.weights`` and the partial ``*.conv.N`` files of ``darknet partial``."""
    name = Path(weights).name
    return name.endswith(".weights") or ".conv." in name


class _DarkNet(SequentialBackbone):
    """What both nets share: random init, weight loading, darknet's layer order."""

    def _init_and_load(self, weights: str | None, truncated: bool) -> None:
        # He init for leaky ReLU(0.1) on the backbone's own convs; attention blocks keep theirs
        for m in self.modules():
            if isinstance(m, ConvBN):
                nn.init.kaiming_normal_(m.conv.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.ones_(m.bn.weight)
                nn.init.zeros_(m.bn.bias)
        if weights:
            self.load_weights(str(weights), truncated)
        self.log_weights_source()

    def darknet_layers(self) -> Iterator[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """(conv, bn) of every conv in darknet's cfg order (the order of its ``.weights`` files): the
        modules' registration order (stage conv, then each block's 1x1 and 3x3). Only built layers."""
        for m in self.features.modules():
            if isinstance(m, ConvBN):
                yield m.conv, m.bn

    def load_weights(self, weights: str, truncated: bool = False) -> None:
        """``weights``: a darknet file (``*.weights``, ``*.conv.N``) or a state-dict file.

        A backbone cut short of stride 32 reads only the front of a darknet file, so the floats of
        the layers it lacks are not an error then."""
        if is_darknet_file(weights):
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ValueError(f"backbone weights {weights!r} for {self.name}: no such darknet file")
            loaded, total = load_darknet_weights(path, self.darknet_layers(), allow_extra=truncated)
            self.weights_source = f"darknet file {path} ({loaded} of {total} convs)"
            return
        self.load_state_dict_weights(weights)


class DarkNet19(_DarkNet):
    """DarkNet-19 (YOLOv2 Table 6) without its classifier: 18 convs, 5 max-pools.

    Args:
        out_strides: maps to return, among 1, 2, 4, 8, 16 (the 13th conv, 512 ch), 32 (1024 ch).
        weights: None (random init), a darknet file (``darknet19_448.conv.23``, ``*.weights``: the
            first N convs in darknet's order; a full file must be DarkNet-19's), or a state-dict file
            of this module (``.pth``/``.ckpt``).
        attention: 'se' | 'cbam' | None, on the output of every stage (each tap up to the deepest).
        mean, std, min_size, size_divisor: see ``Backbone`` (darknet's weights: RGB in 0..1).
        darknet_bn: darknet's inference batch norm, ``(x - mean) / (sqrt(var) + 1e-6)``
            (``detectors.layers.DarknetBatchNorm2d``), for whole darknet models imported with their weights.

    forward: images (B, 3, H, W) -> [(B, C_k, ceil(H / s_k), ceil(W / s_k))] per stride s_k.
    """

    def __init__(self, out_strides: Sequence[int] = (8, 16, 32), weights: str | None = None,
                 attention: str | None = None, mean: Sequence[float] = UNIT_MEAN, std: Sequence[float] = UNIT_STD,
                 min_size: int | None = None, size_divisor: int | None = None, darknet_bn: bool = False):
        features, taps = darknet19_features(darknet_bn)
        super().__init__("darknet19", features, taps, out_strides, attention, mean=mean, std=std,
                         min_size=min_size, size_divisor=size_divisor)
        self._init_and_load(weights, truncated=len(self.features) < len(features))


class DarkNet53(_DarkNet):
    """DarkNet-53 (YOLOv3 Table 1) without its classifier: 52 convs, 23 residual blocks.

    Args:
        out_strides: maps to return, among 2 (64 ch), 4 (128), 8 (256), 16 (512), 32 (1024).
        weights: None (random init), a darknet file (``darknet53.conv.74``, the front of
            ``yolov3.weights`` as ``*.conv.N``, ``*.weights``), or a state-dict file of this module.
        attention: 'se' | 'cbam' | None, inside every residual block, on its branch before the add.
        mean, std, min_size, size_divisor: see ``Backbone`` (darknet's weights: RGB in 0..1).
        darknet_bn: darknet's inference batch norm (as DarkNet19's).

    forward: images (B, 3, H, W) -> [(B, C_k, ceil(H / s_k), ceil(W / s_k))] per stride s_k.
    """

    def __init__(self, out_strides: Sequence[int] = (8, 16, 32), weights: str | None = None,
                 attention: str | None = None, mean: Sequence[float] = UNIT_MEAN, std: Sequence[float] = UNIT_STD,
                 min_size: int | None = None, size_divisor: int | None = None, darknet_bn: bool = False):
        make_attention(attention, 1)  # an unknown kind fails here, before 40M parameters are built
        features, taps = darknet53_features(attention, darknet_bn)
        # attention lives in the residual blocks, not on the stage outputs: None to the base
        super().__init__("darknet53", features, taps, out_strides, None, mean=mean, std=std,
                         min_size=min_size, size_divisor=size_divisor)
        self._init_and_load(weights, truncated=len(self.features) < len(features))


class DarkNetTiny(_DarkNet):
    """The trunk of darknet's tiny YOLOs (yolov2-tiny.cfg, yolov3-tiny.cfg): six 3x3 convs (16 .. 512) each
    followed by a 2x2 max-pool (stride 2 for the first five, darknet's size-keeping stride 1 for the sixth), then a
    3x3 conv of 1024.

    Args:
        out_strides: maps to return, among 1, 2, 4, 8, 16 (256 ch), 32 (1024 ch).
        weights: None (random init), a darknet file (the first N convs of a tiny cfg's ``*.weights`` /
            ``*.conv.N``), or a state-dict file of this module.
        attention: 'se' | 'cbam' | None, on the output of every stage (each tap up to the deepest).
        mean, std, min_size, size_divisor: see ``Backbone`` (darknet's weights: RGB in 0..1).
        darknet_bn: darknet's inference batch norm (as DarkNet19's).

    forward: images (B, 3, H, W) -> [(B, C_k, ceil(H / s_k), ceil(W / s_k))] per stride s_k.
    """

    def __init__(self, out_strides: Sequence[int] = (8, 16, 32), weights: str | None = None,
                 attention: str | None = None, mean: Sequence[float] = UNIT_MEAN, std: Sequence[float] = UNIT_STD,
                 min_size: int | None = None, size_divisor: int | None = None, darknet_bn: bool = False):
        features, taps = darknet_tiny_features(darknet_bn)
        super().__init__("darknet_tiny", features, taps, out_strides, attention, mean=mean, std=std,
                         min_size=min_size, size_divisor=size_divisor)
        self._init_and_load(weights, truncated=len(self.features) < len(features))
