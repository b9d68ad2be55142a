"""Small building blocks shared by backbones and necks."""

from __future__ import annotations

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
