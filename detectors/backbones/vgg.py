"""VGG16 as SSD uses it (Liu et al. 2016, sec. 3): conv1_1 .. conv5_3, then pool5 3x3/1,
conv6 3x3 dilation 6 and conv7 1x1 in place of fc6/fc7.

Outputs conv4_3 (stride 8) and conv7 (stride 16 with ceil-mode pooling: 38x38 and 19x19 at 300).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from detectors.layers import conv_block, init_kaiming

log = logging.getLogger(__name__)

# torchvision's vgg16 "D" configuration; "M" is a 2x2 max-pool
VGG16_LAYERS: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGG16(nn.Module):
    """VGG16 trunk with SSD's changes.

    Args:
        batch_norm: BatchNorm after every conv (``vgg16_bn``); trains far better from scratch.
        weights: None (random init), a torchvision weights name such as 'IMAGENET1K_V1'
            (``VGG16_Weights`` / ``VGG16_BN_Weights``; downloads unless torch's cache has it), or
            the path of a local file holding a torchvision VGG16 state dict or one of this module.
            Only the conv trunk is loaded; conv6/conv7 start random, as in torchvision's SSD.

    forward: images (B, 3, H, W) normalised -> [conv4_3 (B, 512, H/8, W/8), conv7 (B, 1024, H/16, W/16)]
    (sizes rounded up by the ceil-mode pools).
    """

    out_channels = (512, 1024)

    def __init__(self, batch_norm: bool = True, weights: str | None = None):
        super().__init__()
        self.batch_norm = batch_norm
        layers: list[nn.Module] = []
        in_ch = 3
        self.conv4_3_end = 0
        for i, v in enumerate(VGG16_LAYERS):
            if v == "M":
                # ceil_mode on every pool, so 300 -> 150 -> 75 -> 38 -> 19 as in the paper's SSD300
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += conv_block(in_ch, int(v), batch_norm, bias=True, kernel_size=3, padding=1)
                in_ch = int(v)
            if i == 12:  # conv4_3 (+ BN) + ReLU
                self.conv4_3_end = len(layers)
        # torchvision's layer indices, so its state dicts load by key
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            *conv_block(512, 1024, batch_norm, kernel_size=3, padding=6, dilation=6),
            *conv_block(1024, 1024, batch_norm, kernel_size=1),
        )
        init_kaiming(self)
        self.weights_source = "random init"
        if weights:
            self.load_weights(weights)
        log.info("backbone vgg16%s: weights from %s", "_bn" if batch_norm else "", self.weights_source)

    def load_weights(self, weights: str) -> None:
        path = Path(weights).expanduser()
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            source = f"file {path}"
        else:
            from torchvision.models import VGG16_BN_Weights, VGG16_Weights

            enum = VGG16_BN_Weights if self.batch_norm else VGG16_Weights
            try:
                w = enum[weights] if weights in enum.__members__ else enum.verify(weights)
            except (KeyError, ValueError):
                raise ValueError(
                    f"backbone weights {weights!r} is neither a file nor a {enum.__name__} name "
                    f"({', '.join(enum.__members__)})"
                ) from None
            state = w.get_state_dict(progress=True)
            source = f"torchvision {enum.__name__}.{w.name}"
        own = self.state_dict()
        loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        trunk = [k for k in own if k.startswith("features.")]
        missing = [k for k in trunk if k not in loaded]
        if missing:
            raise ValueError(
                f"backbone weights from {source} do not fit vgg16{'_bn' if self.batch_norm else ''}: "
                f"{len(missing)} of {len(trunk)} trunk tensors missing or of another shape (first: {missing[0]})"
            )
        self.load_state_dict(loaded, strict=False)
        self.weights_source = f"{source} ({len(loaded)} tensors)"

    def forward(self, images: Tensor) -> list[Tensor]:
        x = images
        conv4_3 = x
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.conv4_3_end - 1:
                conv4_3 = x
        return [conv4_3, self.fc(x)]
