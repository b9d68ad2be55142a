"""Priors (default boxes) computed from feature-map shapes at run time.

Computing them from the shapes the network actually produced, instead of a
table for one input size, is what lets every head train at any input size
(multi-scale training, SSD512, non-square inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class SSDPriors:
    """SSD default boxes (Liu et al. 2016, sec. 2.2 "Choosing scales and aspect ratios").

    Level ``k`` of ``m`` levels has scale ``s_k = s_min + (s_max - s_min) (k - 2) / (m - 2)`` for
    k = 2..m (linear from ``min_scale`` to ``max_scale``) and ``first_scale`` for the first level
    (conv4_3 in SSD300); with ``first_scale=None`` all m levels are linear (the paper's formula). At every cell centre ``((j + .5) / f_w, (i + .5) / f_h)`` it places one
    prior per aspect ratio ``a`` (``w = s sqrt(a)``, ``h = s / sqrt(a)``), ratio 1 first, plus the
    extra square prior of scale ``sqrt(s_k s_{k+1})``. Each entry of ``aspect_ratios`` lists the
    ratios > 1 of a level; their reciprocals are added, so [2] gives 4 priors and [2, 3] gives 6.

    Scales are fractions of the input size. Like the reference implementations, ``clip`` caps a
    prior's width and height at the image size.

    Priors come back as (A, 4) ``cxcywh`` in pixels of the input, ordered level by level, then
    row-major over cells, then by prior within a cell, which is the order SSDHead flattens its
    outputs in. They are cached by (feature shapes, image size, device, dtype).
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
        min_scale: float = 0.2,
        max_scale: float = 0.9,
        first_scale: float | None = 0.1,
        clip: bool = True,
    ):
        self.aspect_ratios = [list(map(float, r)) for r in aspect_ratios]
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.first_scale = first_scale
        self.clip = clip
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_priors_per_cell(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def scales(self) -> list[float]:
        """The m + 1 scales: one per level plus the one past the last (for its extra prior)."""
        m = len(self.aspect_ratios)
        linear_levels = m - 1 if self.first_scale is not None else m
        step = (self.max_scale - self.min_scale) / max(linear_levels - 1, 1)
        linear = [self.min_scale + step * k for k in range(linear_levels + 1)]
        return ([self.first_scale] if self.first_scale is not None else []) + linear

    def __call__(
        self,
        feature_shapes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """feature_shapes: (h_k, w_k) per level; image_size: (H, W) -> (A, 4) cxcywh pixels."""
        if len(feature_shapes) != len(self.aspect_ratios):
            raise ValueError(
                f"SSDPriors has aspect ratios for {len(self.aspect_ratios)} levels, "
                f"the network produced {len(feature_shapes)} feature maps"
            )
        key = (tuple(map(tuple, feature_shapes)), tuple(image_size), str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._make(feature_shapes, image_size).to(device=device, dtype=dtype)
        return self._cache[key]

    def _make(self, feature_shapes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> Tensor:
        height, width = image_size
        scales = self.scales()
        levels = []
        for k, ((fh, fw), ratios) in enumerate(zip(feature_shapes, self.aspect_ratios)):
            s, s_next = scales[k], scales[k + 1]
            wh = [(s, s), (math.sqrt(s * s_next),) * 2]
            for r in ratios:
                wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
            wh_t = torch.tensor(wh, dtype=torch.float64)  # (P, 2) fractions of the image
            if self.clip:
                wh_t = wh_t.clamp(max=1.0)
            cy, cx = torch.meshgrid(
                (torch.arange(fh, dtype=torch.float64) + 0.5) / fh,
                (torch.arange(fw, dtype=torch.float64) + 0.5) / fw,
                indexing="ij",
            )
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
            sizes = wh_t.unsqueeze(0).expand(fh * fw, -1, 2)
            levels.append(torch.cat([centres, sizes], dim=-1).reshape(-1, 4))
        priors = torch.cat(levels) * torch.tensor([width, height, width, height], dtype=torch.float64)
        return priors.float()
