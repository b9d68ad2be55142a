"""Precision, recall and F1 against the score threshold, per class and for all classes, and the
threshold of best F1.

A threshold ``t`` keeps the detections scored above it (``score > t``, as predict.py and the sample
pictures keep them). At IoU 0.5 with the metrics' matching
(:func:`~detectors.evaluation.scored_detections.match_at_iou50`), of the kept detections of a class
``tp`` are true positives and ``fp`` the others (a detection on a crowd or difficult GT counts as
neither), and with ``n`` scored GTs::

    precision = tp / (tp + fp)     (empty: nothing kept)
    recall    = tp / n             (empty: no GT)
    F1        = 2 tp / (tp + fp + n)

"All classes" pools every class's detections and GTs (precision of all kept boxes, recall of all
objects): the one number a single deployed threshold controls. The best-F1 threshold is exact: F1
only changes at a detection's score, so every distinct score is tried, and the threshold reported
lies halfway between the lowest score kept and the next lower one (0 below the lowest), so ``>`` and
``>=`` keep the same boxes and a score rounded on the way to another program does not flip a box.
On equal F1 the higher threshold wins (fewer boxes for the same F1).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from detectors.evaluation.plots import class_colors, save_figure
from detectors.evaluation.scored_detections import Matches

__all__ = ["ALL_CLASSES", "best_f1", "best_f1_table", "curves_on_grid", "format_best_f1", "plot_threshold_curves",
           "write_best_f1_csv", "write_threshold_curves_csv"]

ALL_CLASSES = "all"
CSV_GRID = torch.arange(100, dtype=torch.float64) / 100  # 0.00 .. 0.99 in the CSV
PLOT_GRID = torch.arange(1000, dtype=torch.float64) / 1000  # finer for the picture
# classes drawn in their own colour with a legend up to this many; more are thin grey lines
MAX_LEGEND_CLASSES = 10


def best_f1(scores: Tensor, tp: Tensor, num_gt: int) -> dict[str, float | int | None]:
    """The threshold of best F1 of one set of counted detections.

    Args:
        scores: ``(D,)`` the detections that count (TP or FP). tp: ``(D,)`` bool.
        num_gt: scored GTs.

    Returns:
        ``threshold`` (None when no threshold gives a TP, or there is no GT), ``f1``, ``precision``,
        ``recall``, ``tp``, ``fp``, ``num_gt`` at that threshold.
    """
    none = {"threshold": None, "f1": 0.0, "precision": None, "recall": 0.0 if num_gt else None, "tp": 0, "fp": 0,
            "num_gt": int(num_gt)}
    if num_gt == 0 or not bool(tp.any()):
        return none
    scores = scores.double().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], tp.cpu()[order].long()
    tp_cum = t.cumsum(0)
    kept = torch.arange(1, s.numel() + 1)
    last = torch.ones(s.numel(), dtype=torch.bool)  # a cut can only fall after the last of equal scores
    last[:-1] = s[1:] != s[:-1]
    f1 = torch.where(last, 2 * tp_cum.double() / (kept + num_gt), torch.full_like(s, -1.0))
    i = int(torch.argmax(f1))  # the first maximum: the highest threshold on ties
    below = float(s[i + 1]) if i + 1 < s.numel() else 0.0
    n_tp, n_kept = int(tp_cum[i]), int(kept[i])
    return {"threshold": (float(s[i]) + below) / 2, "f1": float(f1[i]), "precision": n_tp / n_kept,
            "recall": n_tp / num_gt, "tp": n_tp, "fp": n_kept - n_tp, "num_gt": int(num_gt)}


def _counted(s: dict[str, Tensor], matches: Matches, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores, TP flags and labels of the detections that count, and the scored GTs per class ``(C,)``."""
    counted = matches.tp | matches.fp
    num_gt = torch.bincount(s["gt_labels"][matches.gt_scored], minlength=num_classes)
    return s["det_scores"][counted].cpu(), matches.tp[counted].cpu(), s["det_labels"][counted].cpu(), num_gt.cpu()


def best_f1_table(s: dict[str, Tensor], matches: Matches, class_names: Sequence[str]) -> list[dict]:
    """:func:`best_f1` of each class (label order) and last of all classes pooled; each row has ``class``."""
    scores, tp, labels, num_gt = _counted(s, matches, len(class_names))
    rows = [{"class": name, **best_f1(scores[labels == c], tp[labels == c], int(num_gt[c]))}
            for c, name in enumerate(class_names)]
    return [*rows, {"class": ALL_CLASSES, **best_f1(scores, tp, int(num_gt.sum()))}]


def curves_on_grid(s: dict[str, Tensor], matches: Matches, num_classes: int, grid: Tensor) -> dict[str, Tensor]:
    """TP/FP counts and P, R, F1 at each threshold of ``grid`` ``(T,)``, per class and pooled.

    Returns:
        ``tp``, ``fp`` ``(C + 1, T)`` int64, ``num_gt`` ``(C + 1,)``, ``precision``, ``recall``, ``f1``
        ``(C + 1, T)`` float64 (NaN where undefined: nothing kept, no GT); row C is all classes.
    """
    scores, tp, labels, num_gt = _counted(s, matches, num_classes)
    T = grid.numel()
    # a detection is kept at the thresholds below its score: the first `above` entries of the grid
    above = torch.searchsorted(grid.double(), scores.double(), side="left")

    def kept_counts(mask: Tensor) -> Tensor:
        hist = torch.bincount(labels[mask] * (T + 1) + above[mask], minlength=num_classes * (T + 1))
        hist = hist.view(num_classes, T + 1)
        per_class = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # detections with `above` > j, for j = 0..T-1
        return torch.cat([per_class, per_class.sum(0, keepdim=True)])

    n_tp, n_fp = kept_counts(tp), kept_counts(~tp)
    gt = torch.cat([num_gt, num_gt.sum(0, keepdim=True)]).double()[:, None]
    kept = (n_tp + n_fp).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    precision = torch.where(kept > 0, n_tp / kept.clamp(min=1), nan)
    recall = torch.where(gt > 0, n_tp / gt.clamp(min=1), nan)
    denominator = kept + gt
    f1 = torch.where(denominator > 0, 2 * n_tp / denominator.clamp(min=1), nan)
    return {"tp": n_tp, "fp": n_fp, "num_gt": gt[:, 0].long(), "precision": precision, "recall": recall, "f1": f1}


def _cell(v: float) -> str:
    return "" if v != v else f"{v:.6g}"  # NaN -> empty


def write_threshold_curves_csv(curves: dict[str, Tensor], grid: Tensor, class_names: Sequence[str],
                               path: str | Path) -> Path:
    """``threshold_curves.csv``, one row per (class, threshold): ``class, threshold, precision, recall, f1,
    tp, fp, num_gt`` (``all`` last; an empty cell: undefined)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "threshold", "precision", "recall", "f1", "tp", "fp", "num_gt"])
        for k, name in enumerate([*class_names, ALL_CLASSES]):
            for j, t in enumerate(grid.tolist()):
                w.writerow([name, f"{t:.3f}", _cell(float(curves["precision"][k, j])),
                            _cell(float(curves["recall"][k, j])), _cell(float(curves["f1"][k, j])),
                            int(curves["tp"][k, j]), int(curves["fp"][k, j]), int(curves["num_gt"][k])])
    return path


def write_best_f1_csv(table: Sequence[dict], path: str | Path) -> Path:
    """``best_f1_thresholds.csv``: ``class, threshold, f1, precision, recall, tp, fp, num_gt`` per class, then
    ``all`` (an empty threshold: no threshold gives a true positive)."""
    keys = ["threshold", "f1", "precision", "recall", "tp", "fp", "num_gt"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *keys])
        for row in table:
            w.writerow([row["class"], *("" if row[k] is None else f"{row[k]:.6g}" for k in keys)])
    return path


def format_best_f1(table: Sequence[dict]) -> str:
    """The best-F1 table as printed text, one line per class and ``all`` last."""
    width = max(len("class"), *(len(r["class"]) for r in table))
    lines = [f"{'class':<{width}} | threshold |     F1 | precision | recall |    GT"]
    lines.append("-" * len(lines[0]))
    for r in table:
        thr = f"{r['threshold']:9.4f}" if r["threshold"] is not None else f"{'-':>9}"
        prec = f"{r['precision']:9.4f}" if r["precision"] is not None else f"{'-':>9}"
        rec = f"{r['recall']:6.4f}" if r["recall"] is not None else f"{'-':>6}"
        lines.append(f"{r['class']:<{width}} | {thr} | {r['f1']:6.4f} | {prec} | {rec} | {r['num_gt']:5d}")
    return "\n".join(lines)


def plot_threshold_curves(curves: dict[str, Tensor], grid: Tensor, class_names: Sequence[str], best: dict,
                          path: str | Path) -> Path:
    """Precision, recall and F1 against the threshold side by side: every class (own colour and a legend up
    to ``MAX_LEGEND_CLASSES`` classes, thin grey beyond) and all classes pooled (thick), with the best-F1
    point of all classes (``best``, its :func:`best_f1` row) marked."""
    fig = Figure(figsize=(16, 5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    x = grid.numpy()
    many = len(class_names) > MAX_LEGEND_CLASSES
    colors = class_colors(len(class_names))
    for ax, key, label in zip(axes, ("precision", "recall", "f1"), ("precision", "recall", "F1")):
        for c, name in enumerate(class_names):
            style = {"color": "0.7", "linewidth": 0.6} if many else {"color": [v / 255 for v in colors[c]],
                                                                       "linewidth": 1.2, "label": name}
            ax.plot(x, curves[key][c].numpy(), **style)
        ax.plot(x, curves[key][-1].numpy(), color="C0", linewidth=2.5, label=f"all classes ({len(class_names)})")
        if best.get("threshold") is not None:
            ax.axvline(best["threshold"], color="k", linestyle="--", linewidth=0.8)
        if key == "f1" and best.get("threshold") is not None:
            ax.plot([best["threshold"]], [best["f1"]], "o", color="k",
                    label=f"best F1 {best['f1']:.3f} at {best['threshold']:.3f}")
        ax.set_xlabel("score threshold (boxes scored above it)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{label} against the score threshold, IoU 0.5", fontsize=10)
    axes[2].legend(loc="lower left", fontsize=8)
    if many:
        axes[0].text(0.02, 0.02, f"grey: each of the {len(class_names)} classes", transform=axes[0].transAxes,
                     fontsize=8)
    return save_figure(fig, path)
