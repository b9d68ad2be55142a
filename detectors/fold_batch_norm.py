"""Batch norms folded into the convolutions before them, for inference (predict.py).

In eval mode a batch norm is an affine map per channel, ``y = x * scale + shift``, so after a convolution it can be
carried by that convolution's weight and bias: one pass over each feature map instead of two. The folded network
computes the same function up to float rounding; its state dict is not the checkpoint's any more (no BN
tensors), so folding is for a model that only predicts, never for one that trains or is saved.

``DarknetBatchNorm2d`` folds with darknet's own scale, ``weight / (sqrt(var) + 1e-6)``.
"""

from __future__ import annotations

import torch
from torch import nn

from detectors.layers import DarknetBatchNorm2d

__all__ = ["fold_batch_norms"]


@torch.no_grad()
def fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Give ``conv`` the eval-mode ``bn`` after it: weight (C_out, C_in/g, k, k) scaled per output channel, bias
    shifted (computed in float64, stored in the conv's dtype)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    std = var.sqrt() + DarknetBatchNorm2d.DARKNET_EPS if isinstance(bn, DarknetBatchNorm2d) else (var + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    dtype = conv.weight.dtype
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=dtype, device=conv.weight.device))
    conv.bias.copy_(((bias - mean) * scale + beta).to(dtype))


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution inside an ``nn.Sequential`` (the backbones',
    necks' and heads' blocks: ``ConvBN``, VGG's and MobileNet's layers) into that convolution and put an
    ``nn.Identity`` in its place. Batch norms elsewhere stay as they are. ``model`` must be in eval mode (a
    training batch norm normalises by the batch, which no weight can carry). Returns how many were folded."""
    if model.training:
        raise ValueError("fold_batch_norms folds eval-mode batch norms: call model.eval() first")
    folded = 0
    for block in model.modules():
        if not isinstance(block, nn.Sequential):
            continue
        names = list(block._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = block._modules[first], block._modules[second]
            if (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
                    and conv.out_channels == bn.num_features):
                fold_into(conv, bn)
                block._modules[second] = nn.Identity()
                folded += 1
    return folded
