"""The error breakdown's files and lines (:mod:`detectors.evaluation.tide`): ``error_breakdown.csv``,
``error_breakdown.png`` and a few printed lines. Command line, on the files evaluate.py writes::

    python -m detectors.evaluation.tide_report coco_ground_truth.json coco_results.json [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detectors.evaluation.plots import save_figure
from detectors.evaluation.tide import ERROR_TYPES, TideBreakdown, tide_errors

log = logging.getLogger(__name__)

__all__ = ["breakdown_rows", "plot_breakdown", "summary_lines", "write_error_breakdown"]

# TIDE's own colours for its six error types, so the chart reads like the paper's
_COLORS = {"classification": "#f26e65", "localisation": "#95b8e5", "both": "#c29ad0", "duplicate": "#8ad1a1",
           "background": "#f7b05e", "missed": "#d3d3d3"}


def breakdown_rows(result: TideBreakdown) -> list[list]:
    """The CSV table: a header, an ``all`` row (mAP, dAP, error counts), then a row per class."""
    header = ["class", "category_id", "gt", "ap50", *(f"dap_{n}" for n in ERROR_TYPES),
              *(f"count_{n}" for n in ERROR_TYPES)]
    rows = [header, ["all", "", sum(result.class_gt), f"{result.ap:.6f}",
                     *(f"{result.dap[n]:.6f}" for n in ERROR_TYPES), *(result.counts[n] for n in ERROR_TYPES)]]
    for i, name in enumerate(result.class_names):
        ap = result.class_ap[i]
        rows.append([name, result.class_ids[i], result.class_gt[i], "nan" if math.isnan(ap) else f"{ap:.6f}",
                     *(f"{result.class_dap[i][n]:.6f}" for n in ERROR_TYPES),
                     *(result.class_counts[i][n] for n in ERROR_TYPES)])
    return rows


def summary_lines(result: TideBreakdown, top: int = 3) -> list[str]:
    """Printed lines: the overall dAP (and count) of each type, and the ``top`` largest dAPs of single classes."""
    lines = [f"error breakdown (TIDE, IoU 0.5; mAP {result.ap:.2f}): the AP@0.5 that fixing each error type adds",
             "  " + " | ".join(f"{n} {result.dap[n]:.2f} ({result.counts[n]})" for n in ERROR_TYPES)]
    worst = sorted(((d[n], name, n) for name, d in zip(result.class_names, result.class_dap) for n in ERROR_TYPES),
                   reverse=True)[:top]
    if worst and worst[0][0] > 0:
        lines.append("  largest per class: " + ", ".join(f"{name} {n} +{v:.2f}" for v, name, n in worst if v > 0))
    return lines


def plot_breakdown(result: TideBreakdown, path: str | Path) -> Path:
    """Overall dAP per error type as bars, then a class x error-type grid of the per-class dAP; its
    height grows with the number of classes so that 80 classes stay legible."""
    names = [f"{n} (AP {a:.1f})" if not math.isnan(a) else f"{n} (not scored)"
             for n, a in zip(result.class_names, result.class_ap)]
    rows = max(1, len(names))
    grid_h = 0.6 + 0.22 * rows
    fig = Figure(figsize=(8, 2.6 + grid_h), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global figure state
    bars, grid = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2.2, grid_h]})
    values = [result.dap[n] for n in ERROR_TYPES]
    ypos = range(len(ERROR_TYPES))
    bars.barh(ypos, values, color=[_COLORS[n] for n in ERROR_TYPES])
    bars.set_yticks(list(ypos), [f"{n} ({result.counts[n]})" for n in ERROR_TYPES])
    bars.invert_yaxis()
    top = max(values + [1e-9])
    for y, v in zip(ypos, values):
        bars.text(v + top * 0.01, y, f"{v:.2f}", va="center", fontsize=8)
    bars.set_xlim(0, top * 1.15)
    bars.set_xlabel("dAP@0.5: AP points added by fixing every error of the type (error count)")
    bars.set_title(f"Error breakdown (TIDE), all classes: mAP@0.5 {result.ap:.2f}", fontsize=10)
    table = [[d[n] for n in ERROR_TYPES] for d in result.class_dap] or [[0.0] * len(ERROR_TYPES)]
    image = grid.imshow(table, aspect="auto", cmap="Reds", vmin=0, vmax=max(max(map(max, table)), 1e-9))
    grid.set_xticks(range(len(ERROR_TYPES)), list(ERROR_TYPES), fontsize=8)
    grid.xaxis.tick_top()
    grid.set_yticks(range(len(names)), names, fontsize=8 if rows <= 30 else 6)
    limit = image.get_clim()[1]
    for r, row in enumerate(table if result.class_dap else []):
        for c, v in enumerate(row):
            grid.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7 if rows <= 30 else 5,
                      color="white" if v > 0.6 * limit else "black")
    grid.set_xlabel("dAP@0.5 of each class (its AP after the fix minus its AP)", fontsize=8)
    return save_figure(fig, path)


def write_error_breakdown(ground_truth: Mapping, detections: Sequence[Mapping], out_dir: str | Path,
                          stem: str = "error_breakdown") -> tuple[TideBreakdown, dict[str, Path]]:
    """Compute the breakdown of ``detections`` (COCO results) against ``ground_truth`` (a COCO dataset), write
    ``<stem>.csv`` and ``<stem>.png`` into ``out_dir`` and log the summary lines; returns the breakdown and
    the paths (``error_breakdown``: the CSV, ``error_plot``: the PNG)."""
    result = tide_errors(ground_truth, detections)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(breakdown_rows(result))
    png_path = plot_breakdown(result, out / f"{stem}.png")
    for line in summary_lines(result):
        log.info(line)
    return result, {"error_breakdown": csv_path, "error_plot": png_path}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TIDE error breakdown (dAP@0.5 per error type) of COCO files")
    parser.add_argument("ground_truth", help="COCO ground truth (evaluate.py's coco_ground_truth.json)")
    parser.add_argument("results", help="COCO results (evaluate.py's coco_results.json)")
    parser.add_argument("--out", default=".", help="folder of error_breakdown.csv and .png (default: here)")
    args = parser.parse_args(argv)
    try:
        with open(args.ground_truth) as f:
            ground_truth = json.load(f)
        with open(args.results) as f:
            detections = json.load(f)
        result, paths = write_error_breakdown(ground_truth, detections, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print("\n".join(summary_lines(result)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
