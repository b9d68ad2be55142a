"""Pictures of a dataset's training boxes as the network sees them (``python -m detectors.data.check``).

Each function draws one PNG (matplotlib's Agg canvas, no window, no pyplot state) from boxes already
mapped to the network input (``detectors.tasks.anchors.boxes_at_input``): class counts, box widths,
heights and aspect ratios, a heat map of box centres over the input, and boxes per image. Built to stay
readable from 3 classes to COCO's 80 (bars sideways, one row per class, the figure grows with them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

from detectors.evaluation.plots import save_figure

__all__ = ["plot_box_centres", "plot_box_shapes", "plot_boxes_per_image", "plot_class_counts", "write_views"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global figure state
    return fig


def plot_class_counts(labels: Tensor, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Boxes per class, one horizontal bar each with its count: labels (N,) in 0..C-1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))[: len(class_names)]
    rows = len(class_names)
    fig = _figure(7, max(2.5, 0.6 + 0.22 * rows))
    ax = fig.add_subplot()
    y = np.arange(rows)
    ax.barh(y, counts, color="C0")
    ax.set_yticks(y, labels=list(class_names), fontsize=10 if rows <= 30 else 8)
    ax.invert_yaxis()  # label order from the top
    ax.set_ylim(rows - 0.5, -0.5)
    peak = max(int(counts.max(initial=0)), 1)
    for i, n in enumerate(counts):
        ax.text(n + peak * 0.01, i, str(int(n)), va="center", fontsize=8 if rows > 30 else 9)
    ax.set_xlim(0, peak * 1.15)
    ax.set_xlabel("boxes")
    ax.set_title(title or f"boxes per class ({int(counts.sum())} boxes)")
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_box_shapes(boxes: Tensor, input_size: Sequence[int], path: str | Path,
                    anchors: Tensor | None = None, title: str = "") -> Path:
    """Widths, heights and aspect ratios (w / h, log scale) of boxes (N, 4) xyxy in pixels of an input of
    ``input_size`` (H, W), and the (w, h) density with the YOLO anchors (K, 2) marked where given."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    wh = (boxes[:, 2:] - boxes[:, :2]).numpy()
    height, width = int(input_size[0]), int(input_size[1])
    fig = _figure(10, 7.5)
    (ax_w, ax_h), (ax_a, ax_wh) = fig.subplots(2, 2)
    side = max(height, width)
    bins = np.linspace(0, side, 41)
    ax_w.hist(wh[:, 0], bins=bins, color="C0")
    ax_w.set_xlabel(f"box width (px of the {width}x{height} input)")
    ax_h.hist(wh[:, 1], bins=bins, color="C1")
    ax_h.set_xlabel(f"box height (px of the {width}x{height} input)")
    for ax in (ax_w, ax_h):
        ax.set_ylabel("boxes")
    aspect = wh[:, 0] / np.maximum(wh[:, 1], 1e-9)
    ax_a.hist(aspect, bins=np.geomspace(1 / 16, 16, 41), color="C2")
    ax_a.set_xscale("log", base=2)
    ax_a.set_xlabel("aspect ratio w / h (log scale)")
    ax_a.set_ylabel("boxes")
    if len(wh):
        ax_wh.hist2d(wh[:, 0], wh[:, 1], bins=[np.linspace(0, width, 41), np.linspace(0, height, 41)],
                     cmap="Blues", norm=LogNorm(), cmin=1)
    if anchors is not None and len(anchors):
        a = torch.as_tensor(anchors, dtype=torch.float64).numpy()
        ax_wh.scatter(a[:, 0], a[:, 1], marker="x", s=60, color="C3", label=f"anchors ({len(a)})")
        ax_wh.legend(loc="upper left")
    ax_wh.set_xlim(0, width)
    ax_wh.set_ylim(0, height)
    ax_wh.set_xlabel("width (px)")
    ax_wh.set_ylabel("height (px)")
    ax_wh.set_title("boxes by width and height (log colour)", fontsize=10)
    for ax in (ax_w, ax_h, ax_a):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or f"{len(wh)} boxes at the network input")
    return save_figure(fig, path)


def plot_box_centres(boxes: Tensor, input_size: Sequence[int], path: str | Path, title: str = "",
                     bins: int = 32) -> Path:
    """Where the box centres lie in the input (H, W): a heat map, the image's top at the top."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).numpy()
    height, width = int(input_size[0]), int(input_size[1])
    counts, _, _ = np.histogram2d(centres[:, 1], centres[:, 0], bins=[bins, bins],
                                  range=[[0, height], [0, width]])
    fig = _figure(6.5, 4.9 * height / width + 1.0)
    ax = fig.add_subplot()
    shown = ax.imshow(counts, extent=(0, width, height, 0), cmap="magma", interpolation="nearest",
                      aspect="equal")
    fig.colorbar(shown, ax=ax, label="box centres per cell", fraction=0.046, pad=0.04)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax.set_title(title or f"box centres over the {width}x{height} input ({len(centres)} boxes)")
    return save_figure(fig, path)


def plot_boxes_per_image(per_image: Sequence[int], path: str | Path, title: str = "") -> Path:
    """How many images have 0, 1, 2, ... boxes (per_image: one count per image)."""
    counts = np.asarray(per_image, dtype=np.int64)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    top = int(counts.max(initial=0))
    ax.hist(counts, bins=np.arange(top + 2) - 0.5 if top <= 60 else 60, color="C0", rwidth=0.9)
    ax.set_xlabel("boxes in the image")
    ax.set_ylabel("images")
    mean = float(counts.mean()) if len(counts) else 0.0
    ax.set_title(title or f"boxes per image: {len(counts)} images, mean {mean:.1f}, max {top}")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def write_views(out_dir: str | Path, boxes: Tensor, labels: Tensor, image_index: Tensor, num_images: int,
                class_names: Sequence[str], input_size: Sequence[int], anchors: Tensor | None = None,
                split: str = "train") -> list[Path]:
    """The four pictures of a split's boxes into ``out_dir``: ``class_counts.png``, ``box_shapes.png``,
    ``box_centres.png``, ``boxes_per_image.png``.

    boxes: (N, 4) xyxy at the input (H, W) = ``input_size``; labels: (N,); image_index: (N,) each box's
    image in 0..num_images-1; anchors: (K, 2) YOLO anchor sizes to mark on the shapes, or None.
    """
    out = Path(out_dir)
    height, width = int(input_size[0]), int(input_size[1])
    per_image = np.bincount(np.asarray(image_index, dtype=np.int64), minlength=num_images)
    return [
        plot_class_counts(labels, class_names, out / "class_counts.png",
                          f"{split}: boxes per class ({len(labels)} boxes, {len(class_names)} classes)"),
        plot_box_shapes(boxes, input_size, out / "box_shapes.png", anchors,
                        f"{split}: {len(boxes)} boxes at the {width}x{height} input, as the training resize maps them"),
        plot_box_centres(boxes, input_size, out / "box_centres.png"),
        plot_boxes_per_image(per_image, out / "boxes_per_image.png"),
    ]
