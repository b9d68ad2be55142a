"""Small building blocks shared by backbones, necks and heads (a neck or head never imports a backbone module)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def conv_block(in_ch: int, out_ch: int, batch_norm: bool, bias: bool | None = None, **conv_kwargs) -> list[nn.Module]:
    """Conv (+ BatchNorm) + ReLU as a list, to splice into an nn.Sequential (keeps torchvision's indices).

    ``bias`` defaults to ``not batch_norm`` (BN's shift makes it redundant); torchvision's vgg16_bn
    keeps it, so the VGG trunk passes True to load those weights exactly.
    """
    conv = nn.Conv2d(in_ch, out_ch, bias=not batch_norm if bias is None else bias, **conv_kwargs)
    if batch_norm:
        return [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return [conv, nn.ReLU(inplace=True)]


class ConvBN(nn.Sequential):
    """darknet's convolutional layer (``batch_normalize=1``): Conv2d (no bias) + BatchNorm2d + LeakyReLU(0.1),
    'same' padding. The DarkNet backbones, YOLO necks and the YOLOv1 head are made of it.

    x (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1):
        super().__init__(OrderedDict(
            # darknet pads size // 2 (pad=1 in its cfgs), so a stride-2 3x3 conv gives ceil(H / 2)
            conv=nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_ch),
            act=nn.LeakyReLU(0.1, inplace=True),
        ))


def init_kaiming(module: nn.Module) -> None:
    """He init for the ReLU convs of ``module``, unit BatchNorm, zero biases (from-scratch training)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
