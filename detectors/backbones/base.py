"""The backbone contract every family keeps (DESIGN.md, "The parts and their contracts").

A backbone is a plain ``nn.Module`` whose forward returns the feature maps at the strides the config
asks for (``out_strides``), and says what it returns: ``out_channels`` and ``strides``. It also
carries what belongs to its weights: the input mean/std they expect and the smallest input and the
size divisor it accepts. Necks and heads are built from ``out_channels``/``strides``, so
``backbone=X`` is the one config line that changes when a backbone changes.

Most backbones are a flat ``nn.Sequential`` (``features``, torchvision's own layer names where
torchvision has the network, so its state dicts load by key) read at a few taps: the output of the
last layer at each stride. :class:`SequentialBackbone` does that reading, drops the layers past the
deepest requested map (no parameter without a gradient: DDP needs none unused) and applies the
optional attention blocks at the stage outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from detectors.backbones.attention import make_attention
from detectors.backbones.weights import load_matching, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# darknet's own weights see RGB in 0..1, not normalised
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)


class Backbone(nn.Module):
    """Base of every backbone: what it returns and what its inputs must be.

    Attributes:
        out_channels: channels of each returned map, in ``strides`` order.
        strides: input pixels per feature cell of each returned map, ascending.
        mean, std: per-channel input normalisation on the 0..1 scale (the module applies it).
        min_size: smallest input side the backbone takes (its deepest map must keep >= 1 cell).
        size_divisor: input sides must be multiples of this (default 1: every layer here rounds odd maps
            up, so any size works). What a neck or head needs of the input (a YOLO grid that must tile
            it) they declare themselves; ``Detector`` combines the three.
        uses_batch_norm: whether the backbone's own convs are batch-normalised (attention blocks aside).
        weights_source: where the weights came from, for the run log.
    """

    out_channels: tuple[int, ...]
    strides: tuple[int, ...]

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 min_size: int | None = None, size_divisor: int | None = None):
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._min_size = min_size
        self._size_divisor = size_divisor
        self.weights_source = "random init"

    @property
    def min_size(self) -> int:
        return int(self._min_size if self._min_size is not None else max(self.strides))

    @property
    def size_divisor(self) -> int:
        return int(self._size_divisor if self._size_divisor is not None else 1)

    @property
    def uses_batch_norm(self) -> bool:
        """Any BatchNorm among the backbone's own layers (not counting attention blocks): parts built on
        it follow suit (SSD's extra layers: none on plain VGG16, the paper's SSD for ImageNet weights)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and "attention" not in name.split(".")
                   for name, m in self.named_modules())


def check_out_strides(name: str, out_strides: Sequence[int], available: Mapping[int, int]) -> tuple[int, ...]:
    """Validate ``out_strides`` against the strides a network has; sorted, without repeats."""
    strides = tuple(sorted({int(s) for s in out_strides}))
    if not strides:
        raise ValueError(f"{name}: out_strides is empty; choose from {sorted(available)}")
    unknown = [s for s in strides if s not in available]
    if unknown:
        raise ValueError(f"{name} has no map at stride {unknown[0]}: out_strides must be among {sorted(available)}")
    return strides


def stack_with_pools(layout: Sequence, conv: Callable[[int, object], nn.Module | list[nn.Module]]
                     ) -> tuple[nn.Sequential, dict[int, tuple[int, int]]]:
    """A plain conv stack (VGG16, DarkNet-19) from its layout: "M" is a 2x2/2 max-pool in ceil mode (the
    paper's SSD300 sizes, 300 -> 150 -> 75 -> 38 -> 19, and darknet's own pooling of odd maps); any other
    entry is a conv, made by ``conv(in_channels, entry)``, which returns a module or a list of modules
    whose last conv's ``out_channels`` is the new width.

    Returns the layers and the taps: stride -> (index of the last layer at that stride, its channels).
    """
    layers: list[nn.Module] = []
    taps: dict[int, tuple[int, int]] = {}
    in_ch, stride = 3, 1
    for entry in layout:
        if entry == "M":
            taps[stride] = (len(layers) - 1, in_ch)
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            stride *= 2
            continue
        made = conv(in_ch, entry)
        made = made if isinstance(made, list) else [made]
        layers += made
        in_ch = [m for block in made for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    taps[stride] = (len(layers) - 1, in_ch)
    return nn.Sequential(*layers), taps


class SequentialBackbone(Backbone):
    """A backbone made of one ``nn.Sequential`` read at taps.

    Args:
        name: for messages and the log (``vgg16_bn``, ``mobilenet_v2``, ...).
        features: the layers in order.
        taps: stride -> (index of the last layer at that stride in ``features``, its channels).
        out_strides: which taps to return.
        attention: 'se', 'cbam' or None: a block on each stage output (every tap, also those not
            returned, and each entry of ``extra_attention_points``).
        extra_attention_points: more (index, channels) stage ends that get an attention block.
        mean, std, min_size, size_divisor: see :class:`Backbone`.
    """

    def __init__(self, name: str, features: nn.Sequential, taps: Mapping[int, tuple[int, int]],
                 out_strides: Sequence[int], attention: str | None = None,
                 extra_attention_points: Sequence[tuple[int, int]] = (), **input_spec):
        super().__init__(**input_spec)
        self.name = name
        strides = check_out_strides(name, out_strides, taps)
        self.strides = strides
        self.out_channels = tuple(taps[s][1] for s in strides)
        self._tap_index = {taps[s][0]: i for i, s in enumerate(strides)}
        last = max(self._tap_index)
        # the layers past the deepest returned map would get no gradient: not built into the model
        self.features = features[: last + 1]
        points = {idx: ch for idx, ch in [*taps.values(), *extra_attention_points] if idx <= last}
        self.attention = nn.ModuleDict(
            {str(idx): make_attention(attention, ch) for idx, ch in sorted(points.items())} if attention else {}
        )

    def load_state_dict_weights(self, weights: str, torchvision_enum: Callable[[], type] | None = None) -> None:
        """Weights from a state-dict file or, given ``torchvision_enum`` (a callable returning the enum
        class, imported late), a torchvision weights name. Every tensor of the built layers must be
        there, except the attention blocks' (a plain network's weights have none: they keep their init)."""
        state, source = resolve_weights(str(weights), torchvision_enum, self.name)
        self.weights_source = load_matching(self, state, source, self.name, required=lambda key: "attention" not in key)

    def log_weights_source(self) -> None:
        """The run log names where every backbone's weights came from."""
        logging.getLogger(type(self).__module__).info("backbone %s: weights from %s", self.name, self.weights_source)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) normalised -> one map (B, C_k, H / s_k, W / s_k) per stride s_k
        (sizes rounded as the layers round)."""
        outs: list[Tensor] = [images] * len(self.strides)
        x = images
        for i, layer in enumerate(self.features):
            x = layer(x)
            key = str(i)
            if key in self.attention:
                x = self.attention[key](x)
            if i in self._tap_index:
                outs[self._tap_index[i]] = x
        return outs
