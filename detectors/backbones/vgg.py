"""VGG16 (Simonyan and Zisserman 2015, configuration D), plain or with BatchNorm, as a backbone.

The trunk is torchvision's ``vgg16``/``vgg16_bn`` ``features`` (same layer indices, so its state dicts
load by key), with ceil-mode pools so SSD300's 300 px input gives 38x38 conv4_3 maps as in the paper.
SSD's changes (pool5 3x3/1, dilated conv6, conv7) are SSD's, not VGG's: they live in SSD's neck
(``detectors.necks.ssd_extras``, as torchvision's SSD keeps them with its extra layers), so the same
``backbone=vgg16_bn`` gives SSD conv4_3 + conv5_3 (strides 8, 16) and Faster R-CNN conv5_3 (stride 16).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from detectors.backbones.base import IMAGENET_MEAN, IMAGENET_STD, SequentialBackbone, stack_with_pools
from detectors.layers import conv_block, init_kaiming

# torchvision's vgg16 "D" configuration; "M" is a 2x2 max-pool
VGG16_LAYERS: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                 512, 512, 512, "M"]


def vgg16_features(batch_norm: bool) -> tuple[nn.Sequential, dict[int, tuple[int, int]]]:
    """torchvision's VGG16 ``features`` with ceil-mode pools, and its taps: stride -> (index of the
    last layer at that stride, channels): 1 conv1_2, 2 conv2_2, 4 conv3_3, 8 conv4_3, 16 conv5_3
    (after their ReLU), 32 pool5."""
    # torchvision's vgg16_bn keeps the conv bias before BN: kept, so its weights load exactly
    return stack_with_pools(VGG16_LAYERS, lambda in_ch, width: conv_block(in_ch, int(width), batch_norm, bias=True,
                                                                           kernel_size=3, padding=1))


class VGG16(SequentialBackbone):
    """VGG16 trunk read at the strides asked for.

    Args:
        batch_norm: BatchNorm after every conv (``vgg16_bn``); trains far better from scratch.
        out_strides: maps to return, among 1, 2, 4, 8 (conv4_3), 16 (conv5_3), 32 (pool5).
        weights: None (random init), a torchvision weights name such as 'IMAGENET1K_V1'
            (``VGG16_Weights`` / ``VGG16_BN_Weights``; downloads unless torch's cache has it), or
            the path of a local file holding a torchvision VGG16 state dict or one of this module.
            The conv trunk must be complete in it; the classifier is ignored.
        attention: 'se' | 'cbam' | None, on every stage output (conv1_2 .. conv5_3).
        mean, std, min_size, size_divisor: see ``Backbone`` (ImageNet statistics: torchvision's weights).

    forward: images (B, 3, H, W) normalised -> [(B, C_k, ceil(H / s_k), ceil(W / s_k))] per stride.
    """

    def __init__(self, batch_norm: bool = True, out_strides: Sequence[int] = (8, 16), weights: str | None = None,
                 attention: str | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, min_size: int | None = None, size_divisor: int | None = None):
        self.batch_norm = batch_norm
        name = "vgg16_bn" if batch_norm else "vgg16"
        features, taps = vgg16_features(batch_norm)
        super().__init__(name, features, taps, out_strides, attention, mean=mean, std=std, min_size=min_size,
                         size_divisor=size_divisor)
        init_kaiming(self)
        if weights:
            self.load_state_dict_weights(weights, self._torchvision_enum)
        self.log_weights_source()

    def _torchvision_enum(self) -> type:
        from torchvision.models import VGG16_BN_Weights, VGG16_Weights

        return VGG16_BN_Weights if self.batch_norm else VGG16_Weights
