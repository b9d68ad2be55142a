"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018) as :class:`SequentialBackbone` s.

Both are flat stacks read at the last layer of each stride (2, 4, 8, 16, 32). v2 is torchvision's
own ``mobilenet_v2(...).features`` (inverted residuals, linear bottlenecks, ReLU6), so
``MobileNet_V2_Weights`` state dicts load by key (``features.N....``). v1 has no torchvision model:
it is built here from the paper's Table 1 and trains from scratch or from a local state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from detectors.backbones.base import IMAGENET_MEAN, IMAGENET_STD, SequentialBackbone
from detectors.layers import init_kaiming

# MobileNet v1, Table 1 after the first conv (3x3/2, 32 ch): (out channels, stride) of each
# depthwise separable block
V1_FIRST_CHANNELS = 32
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)


def stride_taps(features: nn.Sequential) -> dict[int, tuple[int, int]]:
    """stride -> (index of the last layer at that stride, its output channels), read off the built
    layers: a layer's stride is the product of its convs' strides, its channels those of its last
    conv (the width multiplier changes both the channels and, in v2, the rounding)."""
    taps: dict[int, tuple[int, int]] = {}
    stride = 1
    for i, layer in enumerate(features):
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            stride *= int(conv.stride[0])
        if convs:
            taps[stride] = (i, int(convs[-1].out_channels))
    return taps


def depthwise_separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv - BN - ReLU - 1x1 pointwise conv - BN - ReLU (Howard et al., Fig. 3);
    convs without bias, BN's shift does that. (B, in_ch, H, W) -> (B, out_ch, H / stride, W / stride)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def v1_channels(channels: int, width_mult: float) -> int:
    """Width multiplier alpha on a channel count: ``max(8, int(channels * alpha))`` (rounded down,
    at least 8, as TF-slim's ``mobilenet_v1`` with ``min_depth=8``; the paper gives no rule)."""
    return max(8, int(channels * width_mult))


class MobileNetV1(SequentialBackbone):
    """MobileNet v1 (Howard et al. 2017, Table 1) without the average pool and classifier.

    ``features`` = [conv 3x3/2 (32 alpha) - BN - ReLU, then 13 depthwise separable blocks], one
    entry each; taps at strides 2, 4, 8, 16, 32 with 64, 128, 256, 512, 1024 channels at width 1
    (each times alpha, see :func:`v1_channels`). Layers past the deepest ``out_strides`` are not built.

    Args:
        out_strides: strides to return, among (2, 4, 8, 16, 32).
        width_mult: the paper's alpha, on every channel count.
        weights: None (He init) or a local state-dict file of this module (or a checkpoint of this
            framework holding one); torchvision has no MobileNet v1.
        attention: 'se', 'cbam' or None: a block on the output of every tap that is built.
        mean, std, min_size, size_divisor: see :class:`~detectors.backbones.base.Backbone`.

    forward: images (B, 3, H, W) normalised -> [(B, C_s, ceil(H / s), ceil(W / s)) for s in strides].
    """

    def __init__(self, out_strides: Sequence[int] = (8, 16, 32), width_mult: float = 1.0,
                 weights: str | None = None, attention: str | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 min_size: int | None = None, size_divisor: int | None = None):
        if width_mult <= 0:
            raise ValueError(f"mobilenet_v1: width_mult must be > 0, got {width_mult}")
        in_ch = v1_channels(V1_FIRST_CHANNELS, width_mult)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, in_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)
        )]
        for out, stride in V1_BLOCKS:
            out_ch = v1_channels(out, width_mult)
            layers.append(depthwise_separable(in_ch, out_ch, stride))
            in_ch = out_ch
        features = nn.Sequential(*layers)
        super().__init__("mobilenet_v1", features, stride_taps(features), out_strides, attention,
                         mean=mean, std=std, min_size=min_size, size_divisor=size_divisor)
        self.width_mult = float(width_mult)
        init_kaiming(self.features)
        self.weights_source = "random init (He)"
        if weights:
            self.load_state_dict_weights(weights)
        self.log_weights_source()


def _mobilenet_v2_weights() -> type:
    from torchvision.models import MobileNet_V2_Weights

    return MobileNet_V2_Weights


class MobileNetV2(SequentialBackbone):
    """MobileNet v2 (Sandler et al. 2018): torchvision's ``mobilenet_v2(width_mult=...).features``.

    Taps (last layer at each stride; channels at width 1): 2 -> features.1 (16), 4 -> features.3
    (24), 8 -> features.6 (32), 16 -> features.13 (96), 32 -> features.18 (1280, the final 1x1 conv;
    torchvision keeps it at 1280 for width_mult <= 1). Channels are read from the built layers.
    Layers past the deepest ``out_strides`` are not built.

    Args:
        out_strides: strides to return, among (2, 4, 8, 16, 32).
        width_mult: torchvision's width multiplier (channels rounded to multiples of 8).
        weights: None (torchvision's init), a ``torchvision.models.MobileNet_V2_Weights`` name
            ('IMAGENET1K_V1', 'IMAGENET1K_V2', 'DEFAULT'; downloads unless torch's cache has it;
            only for width_mult 1), or a local file: a torchvision mobilenet_v2 state dict or one of
            this module. The ``features.*`` tensors of the built layers must all be there; the
            classifier is ignored; attention blocks load when the file has them.
        attention: 'se', 'cbam' or None: a block on the output of every tap that is built.
        expansion_taps: read each returned stride but the deepest at the 1x1 expansion (ReLU6 output)
            of the next stride's first block instead of at its last block: SSDLite's choice (the
            paper's sec. 6.2 attaches its first layer to "the expansion of layer 15", and torchvision's
            ssdlite320 does the same on MobileNetV3), a 6x wider map (576 channels at stride 16
            instead of 96) at the same resolution, for the same layers and weights.
        mean, std, min_size, size_divisor: see :class:`~detectors.backbones.base.Backbone`.

    forward: images (B, 3, H, W) normalised -> [(B, C_s, ceil(H / s), ceil(W / s)) for s in strides].
    """

    def __init__(self, out_strides: Sequence[int] = (8, 16, 32), width_mult: float = 1.0,
                 weights: str | None = None, attention: str | None = None, expansion_taps: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 min_size: int | None = None, size_divisor: int | None = None):
        from torchvision.models import mobilenet_v2

        if width_mult <= 0:
            raise ValueError(f"mobilenet_v2: width_mult must be > 0, got {width_mult}")
        # checked before anything is built or downloaded: torchvision's weights are width 1 only
        if weights and not Path(str(weights)).expanduser().is_file() and width_mult != 1.0:
            raise ValueError(f"mobilenet_v2: weights {weights!r} is no file, and torchvision's MobileNet_V2_Weights "
                             f"are for width_mult 1.0 only, not {width_mult}; use weights=null or a file of a "
                             f"width-{width_mult} model")
        features = mobilenet_v2(weights=None, width_mult=width_mult).features
        taps = stride_taps(features)
        super().__init__("mobilenet_v2", features, taps, out_strides, attention,
                         mean=mean, std=std, min_size=min_size, size_divisor=size_divisor)
        self.width_mult = float(width_mult)
        # index of a block whose expansion output is returned -> its place in the outputs
        self._expansion_index: dict[int, int] = {}
        if expansion_taps:
            channels = list(self.out_channels)
            for k, stride in enumerate(self.strides[:-1]):  # the deepest map has no built block after it
                index = taps[stride][0] + 1
                block = self.features[index]
                # the first block of every stride has an expansion and no residual (it changes the stride)
                assert not block.use_res_connect and len(block.conv) == 4, f"features.{index} has no expansion"
                channels[k] = int(block.conv[0].out_channels)
                self._expansion_index[index] = k
            self.out_channels = tuple(channels)
        self.weights_source = "random init (torchvision's)"
        if weights:
            self.load_state_dict_weights(weights, _mobilenet_v2_weights)
        self.log_weights_source()

    def forward(self, images: Tensor) -> list[Tensor]:
        if not self._expansion_index:
            return super().forward(images)
        outs: list[Tensor] = [images] * len(self.strides)
        x = images
        for i, layer in enumerate(self.features):
            if i in self._expansion_index:  # block = expansion -> depthwise -> projection (no residual)
                expanded = layer.conv[0](x)
                outs[self._expansion_index[i]] = expanded
                for part in layer.conv[1:]:
                    expanded = part(expanded)
                x = expanded
            else:
                x = layer(x)
            if str(i) in self.attention:
                x = self.attention[str(i)](x)
            if i in self._tap_index and self._tap_index[i] not in self._expansion_index.values():
                outs[self._tap_index[i]] = x
        return outs
