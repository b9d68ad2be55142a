"""The neck that changes nothing: for heads that predict on the backbone's maps as they are."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class IdentityNeck(nn.Module):
    """Passes the backbone's maps on; says what they are, as every neck does.

    forward: [(B, C_k, H_k, W_k)] -> the same list.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int]):
        super().__init__()
        self.out_channels = tuple(int(c) for c in in_channels)
        self.strides = tuple(int(s) for s in in_strides)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return feats
