"""The confusion matrix of an evaluation at IoU 0.5 and one score threshold, with a background class.

Rows are ground truth, columns predictions; label ``C`` (the last row and column) is the background:

* ``[g, g]``: detections above the threshold that match a GT of their class (the metrics' true
  positives at IoU 0.5, pycocotools' greedy matching: :func:`~detectors.evaluation.scored_detections.match_at_iou50`).
* ``[g, p]``, ``p != g``: a GT of class g that no detection of its class found, taken by a detection
  of class p with IoU >= 0.5 (the leftover detections and GTs matched again, class-agnostic, by the
  same greedy rule).
* ``[g, C]``: a GT that no detection found at all.
* ``[C, p]``: a detection of class p that matches nothing (a duplicate, a box on the background, or
  one below IoU 0.5).

So row g sums to the scored GTs of class g, and column p to the detections of class p above the
threshold that the metrics count (a detection on a crowd or difficult GT is ignored here as there).
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from detectors.evaluation.plots import save_figure
from detectors.evaluation.scored_detections import Matches, match_groups

__all__ = ["BACKGROUND", "confusion_matrix", "plot_confusion_matrix", "row_normalized", "write_confusion_csv"]

BACKGROUND = "background"
# cells get their number written while they stay legible; beyond this only the colour shows the value
MAX_ANNOTATED_CLASSES = 30


def confusion_matrix(s: dict[str, Tensor], matches: Matches, num_classes: int, score_threshold: float) -> Tensor:
    """The ``(C + 1, C + 1)`` int64 matrix described in the module docstring.

    Args:
        s: ``ScoredDetections.gathered()``'s flat tensors.
        matches: ``match_at_iou50(s, num_classes)``.
        num_classes: C.
        score_threshold: detections scored above it are counted (as predict.py keeps them).
    """
    C = num_classes
    device = s["det_scores"].device
    out = torch.zeros(C + 1, C + 1, dtype=torch.int64, device=device)
    det_labels, gt_labels = s["det_labels"], s["gt_labels"]
    kept = s["det_scores"] > score_threshold
    tp = kept & matches.tp
    out[:C, :C] += torch.diag(torch.bincount(det_labels[tp], minlength=C))
    found = torch.zeros_like(matches.gt_scored)
    found[matches.gt_index[tp]] = True

    # the detections and scored GTs left over: matched again without regard to class
    dets = torch.nonzero(kept & matches.fp).squeeze(1)
    gts = torch.nonzero(matches.gt_scored & ~found).squeeze(1)
    no = torch.zeros(gts.numel(), dtype=torch.bool, device=device)
    confused, _, gt_row = match_groups(s["det_boxes"][dets], s["det_scores"][dets], s["det_image"][dets],
                                       s["gt_boxes"][gts], s["gt_image"][gts], no, no)
    gt_taken = gts[gt_row[confused]]
    pairs = gt_labels[gt_taken] * (C + 1) + det_labels[dets[confused]]
    out += torch.bincount(pairs, minlength=(C + 1) ** 2).view(C + 1, C + 1)
    found[gt_taken] = True
    out[C, :C] += torch.bincount(det_labels[dets[~confused]], minlength=C)
    out[:C, C] += torch.bincount(gt_labels[matches.gt_scored & ~found], minlength=C)
    return out.cpu()


def row_normalized(matrix: Tensor) -> Tensor:
    """Each row divided by its sum (float64; an empty row stays 0): for a GT row, where its objects
    went; for the background row, which classes the unmatched detections claimed."""
    m = matrix.double()
    return m / m.sum(1, keepdim=True).clamp(min=1)


def write_confusion_csv(matrix: Tensor, class_names: Sequence[str], path: str | Path) -> Path:
    """``confusion_matrix.csv``: a header of the predicted classes then ``background``; a row per GT class
    then the ``background`` row, each named in its first cell (the corner cell reads ``true\\predicted``)."""
    names = [*class_names, BACKGROUND]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *names])
        for name, row in zip(names, matrix.tolist()):
            w.writerow([name, *row])
    return path


def plot_confusion_matrix(matrix: Tensor, class_names: Sequence[str], path: str | Path, normalize: bool,
                          subtitle: str = "") -> Path:
    """The matrix as a PNG: colour is the row-normalised share either way (so a rare class's row reads as
    well as a frequent one's); the cells show counts, or shares with ``normalize``, up to
    ``MAX_ANNOTATED_CLASSES`` classes. The figure grows with the number of classes."""
    names = [*class_names, BACKGROUND]
    n = len(names)
    share = row_normalized(matrix)
    side = min(max(5.0, 0.3 * n + 2.5), 26.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # a square-root colour scale, so a confusion of a few percent shows next to a full diagonal
    image = ax.imshow(share.numpy(), cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row (square-root scale)")
    tick_size = min(10.0, max(5.0, 0.45 * side * 72 / n))  # about half a cell high, in points
    ax.set_xticks(range(n), names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(n), names, fontsize=tick_size)
    ax.set_xlabel("predicted", fontsize=10 + side / 4)
    ax.set_ylabel("true", fontsize=10 + side / 4)
    if n <= MAX_ANNOTATED_CLASSES + 1:
        size = 10 if n <= 8 else 7
        cells = torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist()
        for (i, j), v in zip(cells, matrix.reshape(-1).tolist()):
            if v == 0:
                continue
            text = f"{float(share[i, j]):.2f}" if normalize else str(v)
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if float(share[i, j]) > 0.5 else "black")
    kind = "row-normalised" if normalize else "counts"
    subtitle = textwrap.fill(subtitle, width=int(12 * side)) if subtitle else ""  # fits the figure's width
    ax.set_title(f"confusion matrix at IoU 0.5 ({kind})" + (f"\n{subtitle}" if subtitle else ""),
                 fontsize=10 + side / 4)
    return save_figure(fig, path)
