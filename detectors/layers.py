"""Small building blocks shared by backbones, necks and heads (a neck or head never imports a backbone module)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def conv_block(in_ch: int, out_ch: int, batch_norm: bool, bias: bool | None = None, **conv_kwargs) -> list[nn.Module]:
    """Conv (+ BatchNorm) + ReLU as a list, to splice into an nn.Sequential (keeps torchvision's indices).

    ``bias`` defaults to ``not batch_norm`` (BN's shift makes it redundant); torchvision's vgg16_bn
    keeps it, so the VGG trunk passes True to load those weights exactly.
    """
    conv = nn.Conv2d(in_ch, out_ch, bias=not batch_norm if bias is None else bias, **conv_kwargs)
    if batch_norm:
        return [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return [conv, nn.ReLU(inplace=True)]


class DarknetBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose inference is darknet's: ``(x - mean) / (sqrt(var) + .000001)`` (blas.c's
    ``normalize_cpu``: the epsilon outside the root), then scale and shift, so weights imported from darknet give
    its numbers (``nn.BatchNorm2d`` divides by ``sqrt(var + 1e-5)``: a small variance makes the two differ).
    Training normalises by the batch's statistics as ``nn.BatchNorm2d`` does. Same state dict as BatchNorm2d.

    x (B, C, H, W) -> (B, C, H, W).
    """

    DARKNET_EPS = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.running_var is None:
            return super().forward(x)
        scale = self.weight / (self.running_var.sqrt() + self.DARKNET_EPS)
        shift = self.bias - self.running_mean * scale
        # x * scale + shift in one pass (not as a variance for F.batch_norm: (sqrt(var) + 1e-6)^2 - eps cancels
        # catastrophically for the tiny variances of dead channels)
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))


def make_batch_norm(channels: int, darknet_bn: bool = False) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d``, or with ``darknet_bn`` darknet's inference normalisation (:class:`DarknetBatchNorm2d`)."""
    return DarknetBatchNorm2d(channels) if darknet_bn else nn.BatchNorm2d(channels)


class ConvBN(nn.Sequential):
    """darknet's convolutional layer (``batch_normalize=1``): Conv2d (no bias) + BatchNorm2d + LeakyReLU(0.1),
    'same' padding. The DarkNet backbones, YOLO necks and the YOLOv1 head are made of it. ``darknet_bn``:
    darknet's own inference normalisation (:class:`DarknetBatchNorm2d`, for imported darknet weights).

    x (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, darknet_bn: bool = False):
        super().__init__(OrderedDict(
            # darknet pads size // 2 (pad=1 in its cfgs), so a stride-2 3x3 conv gives ceil(H / 2)
            conv=nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False),
            bn=make_batch_norm(out_ch, darknet_bn),
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
