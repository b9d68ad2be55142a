"""Priors (default boxes) and RPN anchors computed from feature-map shapes at run time, and anchors clustered
from data.

Computing them from the shapes the network actually produced, instead of a
table for one input size, is what lets every head train at any input size
(multi-scale training, SSD512, non-square inputs).

``YOLOAnchors`` holds a YOLO head's anchors and lays out its prediction slots over one or several
grids (``AnchorGrid``). ``kmeans_anchors`` picks a YOLO head's anchor shapes from the training boxes
(YOLOv2's dimension clusters); ``python -m detectors.anchors kmeans ...`` runs it on a configured
dataset (``detectors.tasks.anchors``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detectors.assign import shape_iou

log = logging.getLogger(__name__)


class SSDPriors:
    """SSD default boxes (Liu et al. 2016, sec. 2.2 "Choosing scales and aspect ratios").

    Level ``k`` of ``m`` levels has scale ``s_k = s_min + (s_max - s_min) (k - 2) / (m - 2)`` for
    k = 2..m (linear from ``min_scale`` to ``max_scale``) and ``first_scale`` for the first level
    (conv4_3 in SSD300); with ``first_scale=None`` all m levels are linear (the paper's formula). At every cell centre ``((j + .5) / f_w, (i + .5) / f_h)`` it places one
    prior per aspect ratio ``a`` (``w = s sqrt(a)``, ``h = s / sqrt(a)``), ratio 1 first, plus the
    extra square prior of scale ``sqrt(s_k s_{k+1})``. Each entry of ``aspect_ratios`` lists the
    ratios > 1 of a level; their reciprocals are added, so [2] gives 4 priors and [2, 3] gives 6.

    Scales are fractions of the input size. Like the reference implementations, ``clip`` caps a
    prior's width and height at the image size. ``scales`` gives the m + 1 scales outright instead
    (torchvision's ``DefaultBoxGenerator``: SSD300-VGG16 has [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]).
    ``steps`` (pixels, one per level) puts the centres of level k at ``(j + .5) step_k / W`` (rows
    likewise), as torchvision's and the Caffe original's ``step``: at 300 px the stride-8 level's 38 cells
    then span 304 px, not 300 (None: the cells divide the image evenly).

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
        scales: Sequence[float] | None = None,
        steps: Sequence[float] | None = None,
    ):
        self.aspect_ratios = [list(map(float, r)) for r in aspect_ratios]
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.first_scale = first_scale
        self.clip = clip
        levels = len(self.aspect_ratios)
        if scales is not None and len(scales) != levels + 1:
            raise ValueError(f"priors.scales needs {levels + 1} scales (one per level and one past the last), "
                             f"got {len(scales)}")
        if steps is not None and len(steps) != levels:
            raise ValueError(f"priors.steps needs one step per level ({levels}), got {len(steps)}")
        self.fixed_scales = [float(x) for x in scales] if scales is not None else None
        self.steps = [float(x) for x in steps] if steps is not None else None
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_priors_per_cell(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def scales(self) -> list[float]:
        """The m + 1 scales: one per level plus the one past the last (for its extra prior)."""
        if self.fixed_scales is not None:
            return list(self.fixed_scales)
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
            # cells per image side: the map's own count, or the image over the level's step
            cells_y, cells_x = (fh, fw) if self.steps is None else (height / self.steps[k], width / self.steps[k])
            cy, cx = torch.meshgrid(
                (torch.arange(fh, dtype=torch.float64) + 0.5) / cells_y,
                (torch.arange(fw, dtype=torch.float64) + 0.5) / cells_x,
                indexing="ij",
            )
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
            sizes = wh_t.unsqueeze(0).expand(fh * fw, -1, 2)
            levels.append(torch.cat([centres, sizes], dim=-1).reshape(-1, 4))
        priors = torch.cat(levels) * torch.tensor([width, height, width, height], dtype=torch.float64)
        return priors.float()


class RPNAnchors:
    """Faster R-CNN's anchors (Ren et al. 2015, sec. 3.1.1 "Anchors"): at every cell of the stride-``s``
    map, one anchor per (aspect ratio, size) pair, of area ``size ** 2`` and ``h / w = ratio`` (the
    paper's 3 sizes 128, 256, 512 px and ratios 1:2, 1:1, 2:1: k = 9 per cell).

    The anchors of cell (i, j) are centred at ((j + 0.5) s, (i + 0.5) s): the centre of the cell's
    s x s pixels, as the paper's base anchor [0, 0, 15, 15] (inclusive pixels, centre 7.5 + 0.5 in
    continuous coordinates); torchvision puts them on the cell's top-left corner (j s, i s). Sizes
    are in pixels of the network input, not rounded (torchvision rounds the base anchors).

    Anchors come back as (h w k, 4) ``cxcywh`` in pixels, ordered row-major over cells, then by ratio,
    then by size within a cell (torchvision's ``AnchorGenerator`` order), the order ``RPNHead``
    flattens its outputs in; cached by (feature shape, stride, device, dtype).
    """

    def __init__(self, sizes: Sequence[float] = (128.0, 256.0, 512.0),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
        if not sizes or not aspect_ratios or min(sizes) <= 0 or min(aspect_ratios) <= 0:
            raise ValueError(f"anchor sizes and aspect ratios must be positive, got {sizes}, {aspect_ratios}")
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_cell(self) -> int:
        return len(self.sizes) * len(self.aspect_ratios)

    def cell_shapes(self) -> Tensor:
        """(k, 2) anchor widths and heights in pixels, ratio-major: w = size / sqrt(r), h = size sqrt(r)."""
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64).sqrt()[:, None]
        sizes = torch.tensor(self.sizes, dtype=torch.float64)[None, :]
        return torch.stack([(sizes / ratios).flatten(), (sizes * ratios).flatten()], dim=-1)

    def __call__(self, feature_shape: tuple[int, int], stride: float, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
        """feature_shape (h, w), stride in pixels -> (h w k, 4) cxcywh pixels."""
        key = (tuple(feature_shape), float(stride), str(device), dtype)
        if key not in self._cache:
            fh, fw = feature_shape
            cy, cx = torch.meshgrid((torch.arange(fh, dtype=torch.float64) + 0.5) * stride,
                                    (torch.arange(fw, dtype=torch.float64) + 0.5) * stride, indexing="ij")
            wh = self.cell_shapes()
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
            anchors = torch.cat([centres, wh.expand(fh * fw, -1, 2)], dim=-1).reshape(-1, 4)
            self._cache[key] = anchors.to(device=device, dtype=dtype)
        return self._cache[key]


# ---------------------------------------------------------------------------------------------------
# YOLO anchors: a few (w, h) per grid level, and every prediction slot of a head laid out flat.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorGrid:
    """Every prediction slot of a YOLO head, flattened: level by level (the neck's order, strides
    ascending), then the level's cells row-major, then its anchors. That is the order of the head's
    (B, h_l, w_l, A_l, ...) outputs flattened and concatenated over the levels: N = sum_l h_l w_l A_l.

    cells: (N, 2) column and row of each slot's cell; strides: (N, 2) its cell's width and height in
    pixels; anchors: (N, 2) its anchor's width and height in pixels of the input.
    shapes: (h_l, w_l) per level; starts: the first slot of each level, then N.
    """

    cells: Tensor
    strides: Tensor
    anchors: Tensor
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return self.starts[-1]


class YOLOAnchors:
    """A YOLO head's anchors: (K, 2) widths and heights in pixels of an input of ``input_size``, in
    ``num_levels`` equal groups taken in order, the first group on the first (finest) level: YOLOv3's
    9 anchors by area go 3 to stride 8, 3 to 16, 3 to 32 (darknet's ``mask = 0,1,2`` ... ``6,7,8``), and
    ``kmeans_anchors`` returns its clusters by area, so its output drops in as it is.

    At another input size the anchors scale with the image (``scaled``): darknet's YOLOv2 keeps them in
    grid cells, which scale so; its YOLOv3 keeps pixels of the network input, so its multi-scale
    training meets relatively larger anchors at the smaller sizes. Scaling keeps them the shape of the
    data's boxes at every size (the loader's letterbox scales the boxes with the input).
    """

    def __init__(self, anchors: Sequence[Sequence[float]], input_size: Sequence[int], num_levels: int = 1):
        anchors_t = torch.tensor(anchors, dtype=torch.float32)
        if anchors_t.ndim != 2 or anchors_t.shape[1] != 2 or len(anchors_t) == 0 or (anchors_t <= 0).any():
            raise ValueError(f"head.anchors must be a list of positive [w, h] pairs, got {anchors}")
        if num_levels < 1 or len(anchors_t) % num_levels:
            raise ValueError(f"{len(anchors_t)} anchors do not split into {num_levels} equal groups, one per level "
                             f"of the neck: give a multiple of {num_levels}")
        self.anchors = anchors_t
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.num_levels = num_levels
        self.per_level = len(anchors_t) // num_levels
        # which level each anchor serves, and its index within the level
        self.level_of = torch.arange(len(anchors_t)) // self.per_level
        self.index_in_level = torch.arange(len(anchors_t)) % self.per_level
        self._cache: dict[tuple, object] = {}

    def scaled(self, image_size: tuple[int, int], device: torch.device | str) -> Tensor:
        """(K, 2) anchor sizes in pixels of an input of ``image_size`` (H, W): scaled with the image."""
        key = ("scaled", tuple(image_size), str(device))
        if key not in self._cache:
            scale = torch.tensor([image_size[1] / self.input_size[1], image_size[0] / self.input_size[0]])
            self._cache[key] = (self.anchors * scale).to(device)
        return self._cache[key]

    def grid(self, shapes: Sequence[tuple[int, int]], image_size: tuple[int, int],
             device: torch.device | str) -> AnchorGrid:
        """The slots of maps of ``shapes`` (h_l, w_l), strides ascending, for an input of ``image_size``;
        made once per (shapes, size, device): a step builds no tensor on the host."""
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"the anchors are grouped for {self.num_levels} levels, the neck gives {len(shapes)}")
        key = ("grid", shapes, tuple(image_size), str(device))
        if key not in self._cache:
            anchors = self.scaled(image_size, "cpu").view(self.num_levels, self.per_level, 2)
            cells, strides, slot_anchors, starts = [], [], [], [0]
            for (h, w), level_anchors in zip(shapes, anchors):
                rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                cell = torch.stack([cols, rows], -1).view(h * w, 1, 2).expand(h * w, self.per_level, 2)
                cells.append(cell.reshape(-1, 2).float())
                strides.append(torch.tensor([image_size[1] / w, image_size[0] / h]).expand(h * w * self.per_level, 2))
                slot_anchors.append(level_anchors.expand(h * w, self.per_level, 2).reshape(-1, 2))
                starts.append(starts[-1] + h * w * self.per_level)
            self._cache[key] = AnchorGrid(torch.cat(cells).to(device), torch.cat(strides).to(device),
                                          torch.cat(slot_anchors).to(device), shapes, tuple(starts))
        return self._cache[key]


# ---------------------------------------------------------------------------------------------------
# Dimension clusters (Redmon & Farhadi 2017, YOLOv2 sec. 2 "Dimension Clusters"): anchors chosen by
# k-means over the training boxes' widths and heights with d(box, centroid) = 1 - IoU(box, centroid),
# the boxes' centres aligned, so a large box is not farther from its centroid than a small one for
# the same relative error (Euclidean k-means would spend the clusters on the large boxes).
# ---------------------------------------------------------------------------------------------------


def _check_boxes(wh: Tensor, k: int) -> None:
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh must be (N, 2) widths and heights, got shape {tuple(wh.shape)}")
    if not torch.isfinite(wh).all() or not (wh > 0).all():
        raise ValueError("wh must be finite and positive: drop degenerate boxes before clustering")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    distinct = torch.unique(wh, dim=0).shape[0]
    if k > distinct:
        raise ValueError(f"k={k} clusters need at least {k} distinct box shapes; the {wh.shape[0]} boxes "
                         f"have {distinct} distinct (w, h)")


def kmeans_plus_plus(wh: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) under d = 1 - shape IoU.

    The first centroid is a box drawn uniformly; each next one a box drawn with probability
    proportional to d^2 to its nearest centroid so far, which spreads the start over the shapes
    (plain random seeding, darknet's, puts several centroids in the densest cluster).

    wh: (N, 2) with at least ``k`` distinct rows (a box equal to a centroid has d = 0 and is never
    drawn again, so the k centroids are distinct) -> (k, 2) rows of ``wh``.
    """
    first = torch.randint(wh.shape[0], (1,), generator=generator)
    centroids = [wh[first]]
    nearest = 1 - shape_iou(wh, centroids[0])[:, 0]  # (N,) d to the nearest centroid
    for _ in range(1, k):
        pick = torch.multinomial(nearest.square(), 1, generator=generator)
        centroids.append(wh[pick])
        nearest = torch.minimum(nearest, 1 - shape_iou(wh, centroids[-1])[:, 0])
    return torch.cat(centroids)


def iou_kmeans(wh: Tensor, centroids: Tensor, iters: int = 300) -> tuple[Tensor, bool]:
    """Lloyd iterations under d = 1 - shape IoU from ``centroids``, until the assignment repeats.

    Each box joins the centroid of highest shape IoU (ties: the lower index); each centroid moves to
    the mean (w, h) of its members, as the paper's and darknet's ``gen_anchors.py`` do (the mean is
    not the minimiser of the summed 1 - IoU, so convergence is not guaranteed: ``iters`` caps it). A
    centroid left without members is moved onto the box farthest from its own centroid (highest
    d), the point the clustering explains worst, so k clusters stay in use; several empty ones take
    the farthest boxes in order.

    wh: (N, 2); centroids: (k, 2) start -> ((k, 2) centroids, whether the assignment stopped changing).
    """
    previous = None
    for _ in range(iters):
        iou = shape_iou(wh, centroids)  # (N, k)
        assign = iou.argmax(1)  # argmax documents first-index ties
        if previous is not None and torch.equal(assign, previous):
            return centroids, True
        previous = assign
        counts = torch.bincount(assign, minlength=len(centroids))
        sums = torch.zeros_like(centroids).index_add_(0, assign, wh)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(wh.dtype)
        empty = counts == 0
        if empty.any():
            own_distance = 1 - iou.gather(1, assign[:, None])[:, 0]
            centroids[empty] = wh[own_distance.topk(int(empty.sum())).indices]
    return centroids, False


def kmeans_anchors(wh: Tensor, k: int, seed: int = 0, iters: int = 300) -> Tensor:
    """YOLOv2's dimension clusters: k anchors (w, h) from the boxes' (w, h), sorted by area ascending.

    k-means with d = 1 - IoU of centre-aligned boxes (``detectors.assign.shape_iou``), k-means++
    seeding from ``torch.Generator().manual_seed(seed)``, Lloyd iterations until the assignment stops
    changing or ``iters`` rounds (see ``iou_kmeans``; a cap reached is logged as a warning).

    wh: (N, 2) widths and heights, positive, in any unit -> (k, 2) in that unit and wh's dtype.
    Raises ValueError when ``wh`` has fewer than ``k`` distinct rows (a cluster would have no box).
    """
    _check_boxes(wh, k)
    data = wh.double()  # the members' sums run over up to ~1e6 boxes (COCO): float32 would lose digits
    start = kmeans_plus_plus(data, k, torch.Generator().manual_seed(seed))
    centroids, converged = iou_kmeans(data, start, iters)
    if not converged:
        log.warning("k-means stopped after iters=%d rounds with assignments still changing", iters)
    return centroids[centroids.prod(1).argsort()].to(wh.dtype)


def mean_best_iou(wh: Tensor, anchors: Tensor | Sequence[Sequence[float]]) -> float:
    """YOLOv2's "Avg IOU" (Table 1): the mean over boxes of the best shape IoU with any anchor.

    wh: (N, 2); anchors: (K, 2) in the same unit (a tensor or a list of [w, h]) -> float in [0, 1].
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float64)
    return float(shape_iou(wh.double(), anchors).amax(1).mean())

