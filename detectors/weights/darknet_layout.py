"""The framework model's layers in darknet's cfg order, checked against a cfg layer by layer, and darknet's
``.weights`` read into them.

A cfg's ``[convolutional]`` sections hold the weights in file order; the framework keeps the same convs in its
backbone, neck and head, whose module order differs where darknet interleaves them (YOLOv3's predictor of the
coarsest scale comes before the finer scales' neck convs). :func:`expected_layers` lists the model's layers as
darknet's cfg would, and :func:`check_layout` compares them with the cfg's, so that a cfg that is not the
framework's architecture is refused at its first differing line instead of loading weights into the wrong convs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detectors.backbones.weights import read_darknet_header
from detectors.layers import ConvBN
from detectors.necks.yolov3_fpn import SpatialPyramidPooling
from detectors.weights import ImportError_
from detectors.weights.darknet_cfg import Section


@dataclass
class Layer:
    """One darknet layer as the framework has it: kind (a cfg section name); for a conv its Conv2d and
    BatchNorm (None: a linear predictor with a bias); for a maxpool its size and stride."""

    kind: str
    conv: nn.Conv2d | None = None
    bn: nn.BatchNorm2d | None = None
    size: int = 0
    stride: int = 0


def _convs(module: nn.Module) -> list[Layer]:
    """Every ConvBN of ``module`` in registration order (darknet's order inside a backbone or a neck block),
    with a ``[maxpool]`` for each max-pool and SPP's pools and routes between."""
    out: list[Layer] = []
    for m in module.modules():
        if isinstance(m, ConvBN):
            out.append(Layer("convolutional", m.conv, m.bn))
        elif isinstance(m, nn.MaxPool2d):
            k, s = m.kernel_size, m.stride
            out.append(Layer("maxpool", size=k if isinstance(k, int) else k[0], stride=s if isinstance(s, int) else s[0]))
        elif isinstance(m, SpatialPyramidPooling):
            # yolov3-spp.cfg: maxpool 5, route -2, maxpool 9, route -4, maxpool 13, route -1,-3,-5,-6
            for k in m.sizes:
                out += [Layer("maxpool", size=k, stride=1), Layer("route")]
    return out


def _predictor(conv: nn.Conv2d) -> Layer:
    return Layer("convolutional", conv, None)


def expected_layers(detector: nn.Module, model: str) -> list[Layer]:
    """The detector's layers in darknet's cfg order (after ``[net]``)."""
    backbone, neck, head = detector.backbone, detector.neck, detector.head
    layers: list[Layer] = []
    if model in ("yolov3", "yolov3_tiny"):
        if model == "yolov3":
            stem, *stages = backbone.features
            layers += _convs(stem)
            for stage in stages:
                down, *blocks = stage
                layers += _convs(down)
                for block in blocks:
                    layers += [*_convs(block), Layer("shortcut")]
        else:  # the tiny trunk: convs and max-pools
            layers += _convs(backbone.features)
        levels = len(neck.blocks)
        for k in range(levels):  # coarsest first, as darknet's cfg goes
            if k > 0:  # the path up from the coarser level: route -4, 1x1, upsample, route -1, <backbone map>
                layers += [Layer("route"), *_convs(neck.laterals[k - 1]), Layer("upsample"), Layer("route")]
            layers += [*_convs(neck.blocks[k]), *_convs(neck.branches[k]),
                       _predictor(head.predictors[levels - 1 - k]), Layer("yolo")]
    elif model == "yolov2":
        layers += _convs(backbone.features)
        layers += [*_convs(neck.deep), Layer("route"), *_convs(neck.reduce), Layer("reorg"), Layer("route"),
                   *_convs(neck.fuse), _predictor(head.predictor), Layer("region")]
    elif model == "yolov2_tiny":
        layers += [*_convs(backbone.features), *_convs(neck.convs), _predictor(head.predictor), Layer("region")]
    else:
        raise ValueError(f"no darknet layout for model {model!r}")
    return layers


def check_layout(sections: list[Section], expected: list[Layer], name: str, model: str) -> list[Layer]:
    """Compare the cfg's layers (``sections`` after ``[net]``) with the framework model's; ImportError_ at the
    first difference, naming the cfg line. Returns the convs in file order."""
    layers = sections[1:]
    for i, (s, e) in enumerate(zip(layers, expected)):
        where = f"{name} line {s.line}: [{s.kind}]"
        if s.kind != e.kind:
            raise ImportError_(f"{where} where the framework's {model} has [{e.kind}] (layer {i}): not the "
                               f"{model} architecture")
        if e.conv is not None:
            conv = e.conv
            got = (s.int("filters", 1), s.int("size", 1), s.int("stride", 1), bool(s.int("batch_normalize", 0)),
                   (s.int("size", 1) // 2) if s.int("pad", 0) else s.int("padding", 0))
            want = (conv.out_channels, conv.kernel_size[0], conv.stride[0], e.bn is not None, conv.padding[0])
            if got != want:
                raise ImportError_(f"{where} filters={got[0]} size={got[1]} stride={got[2]} batch_normalize="
                                   f"{int(got[3])} padding={got[4]} where the framework's {model} has "
                                   f"{want[0]}, {want[1]}, {want[2]}, {int(want[3])}, {want[4]} (layer {i})")
        if e.kind == "maxpool" and (s.int("size", s.int("stride", 1)), s.int("stride", 1)) != (e.size, e.stride):
            raise ImportError_(f"{where} size={s.get('size')} stride={s.get('stride')} where the framework's {model} "
                               f"pools {e.size}/{e.stride} (layer {i})")
    if len(layers) != len(expected):
        extra = layers[len(expected)] if len(layers) > len(expected) else None
        raise ImportError_(f"{name}: {len(layers)} layers where the framework's {model} has {len(expected)}"
                           + (f" (line {extra.line}: [{extra.kind}] is past its end)" if extra else ""))
    return [e for e in expected if e.conv is not None]


def conv_floats(layer: Layer) -> int:
    """Floats a conv takes in a darknet file: biases (and with BN scales, means, variances), then the kernel."""
    n = layer.conv.out_channels
    return (4 * n if layer.bn is not None else n) + layer.conv.weight.numel()


def check_float_count(path: Path, need: int, cfg_name: str) -> tuple[tuple[int, int, int], int, int]:
    """The header of darknet's ``.weights`` at ``path`` (``seen`` 32 or 64 bits by version: ``read_darknet_header``)
    and a body of exactly ``need`` float32, or ImportError_ saying both counts. Returns (version, seen, offset)."""
    if not path.is_file():
        raise ImportError_(f"darknet weights {path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(20)
    try:
        version, seen, offset = read_darknet_header(head)
    except ValueError as e:
        raise ImportError_(f"{path.name}: {e}") from None
    if (size - offset) % 4:
        raise ImportError_(f"{path.name}: {size - offset} bytes after its header are not whole float32s "
                           f"({cfg_name} takes {need} floats)")
    if (size - offset) // 4 != need:
        raise ImportError_(f"{path.name} holds {(size - offset) // 4} floats after its header (version "
                           f"{'.'.join(map(str, version))}), {cfg_name} takes {need}: not the weights of this cfg")
    return version, seen, offset


def load_weights_file(path: str | Path, convs: list[Layer], cfg_name: str) -> tuple[tuple[int, int, int], int]:
    """Fill ``convs`` (file order) from darknet's ``.weights`` at ``path``: after the header, per conv with BN:
    biases, scales, rolling mean, rolling variance, kernel; without: biases, kernel (parser.c's
    ``load_convolutional_weights``). A file whose float count is not the convs' is refused, saying both counts.
    Returns (version, images seen)."""
    path = Path(path)
    version, seen, offset = check_float_count(path, sum(conv_floats(c) for c in convs), cfg_name)
    floats = np.fromfile(path, dtype="<f4", offset=offset)
    pos = 0
    with torch.no_grad():
        for layer in convs:
            conv, bn = layer.conv, layer.bn
            targets = [bn.bias, bn.weight, bn.running_mean, bn.running_var] if bn is not None else [conv.bias]
            for tensor in [*targets, conv.weight]:
                size = tensor.numel()
                tensor.copy_(torch.from_numpy(floats[pos:pos + size]).view_as(tensor))
                pos += size
    return version, seen
