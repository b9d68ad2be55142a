"""The pictures of ``python -m detectors.compare``: validation mAP@0.5 over the steps of every run, and
the precision-recall curves at IoU 0.5 of every run side by side per class.

The PR curves come from the project's VOC AP machinery (``VOCMeanAP.pr_curves``), either from an
evaluation of the run's best checkpoint run here the way evaluate.py runs it (``evaluate_run``), or from
the two files a previous evaluate.py wrote (``curves_from_files``: ``coco_ground_truth.json`` and
``coco_results.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, open_dict

from detectors.evaluation.plots import pr_envelope, save_figure
from detectors.evaluation.voc import VOCMeanAP

__all__ = ["RunCurves", "curves_from_files", "evaluate_run", "evaluation_split", "plot_pr_grid", "plot_val_curves"]

RESULTS_FILE, GROUND_TRUTH_FILE = "coco_results.json", "coco_ground_truth.json"


@dataclass
class RunCurves:
    """A run's PR curves: class name -> ``VOCMeanAP.pr_curves()`` entry (recall, precision, ap, num_gt),
    and where they came from (``evaluated best.ckpt on test``, or the folder of the files read)."""

    curves: dict[str, dict]
    source: str


def evaluation_split(config: DictConfig) -> str:
    """``test`` when the run's data has a test split (``data.splits.test`` of a file source, a test size of
    the shapes source), else ``val``."""
    data = config.get("data") or {}
    splits = data.get("splits")
    if splits is not None:
        return "test" if splits.get("test") else "val"
    sizes = (data.get("source") or {}).get("sizes")
    if sizes is not None:
        return "test" if sizes.get("test") else "val"
    return "test"


def evaluate_run(checkpoint: Path, split: str, out_dir: Path, accelerator: str = "auto", batch_size: int = 32,
                 num_workers: int = 2) -> RunCurves:
    """Evaluate ``checkpoint`` on ``split`` as ``python evaluate.py ckpt_path=... split=...`` does (its config,
    ``configs/evaluate.yaml``, and its code, ``run_evaluation``), on ``accelerator`` (auto: the GPU if there is
    one, in bf16 as evaluate.py), writing evaluate.py's files into ``out_dir``. Raises what evaluation raises."""
    from hydra import compose, initialize_config_dir

    from detectors.data.check import CONFIGS
    from detectors.tasks.evaluate import run_evaluation

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="compare"):
        cfg = compose("evaluate")
    with open_dict(cfg):  # set here, not as overrides: any path is a value, quotes and '=' included
        cfg.ckpt_path, cfg.split = str(checkpoint), split
        cfg.paths.output_dir = str(out_dir)
        cfg.trainer.accelerator = accelerator
        cfg.batch_size, cfg.num_workers = batch_size, num_workers
    _, writer = run_evaluation(cfg, verbose=False)
    curves = dict(zip(writer.class_names, writer.curves))
    return RunCurves(curves, f"evaluated {checkpoint.parent.parent.name}/checkpoints/{checkpoint.name} on {split}")


def curves_from_files(folder: Path) -> RunCurves | None:
    """The PR curves of the evaluation whose ``coco_ground_truth.json`` and ``coco_results.json`` (what
    evaluate.py writes) are in ``folder``, or None when either is missing. The ground truth's categories
    are the labels in order; images are scored in the file's order and detections in the results' order,
    as evaluate.py scored them. VOC's ``difficult`` flag is not in the ground-truth file: a difficult box
    counts as any other here (evaluate.py ignores it)."""
    gt_path, results_path = folder / GROUND_TRUTH_FILE, folder / RESULTS_FILE
    if not (gt_path.is_file() and results_path.is_file()):
        return None
    gt, results = json.loads(gt_path.read_text()), json.loads(results_path.read_text())
    label_of = {int(c["id"]): i for i, c in enumerate(gt["categories"])}
    names = [str(c["name"]) for c in gt["categories"]]

    def grouped(entries: Sequence[Mapping]) -> dict[int, tuple[list, list, list]]:
        out: dict[int, tuple[list, list, list]] = {}
        for e in entries:
            boxes, labels, scores = out.setdefault(int(e["image_id"]), ([], [], []))
            x, y, w, h = e["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[int(e["category_id"])])
            scores.append(float(e.get("score", 1.0)))
        return out

    def tensors(entry: tuple[list, list, list] | None) -> dict[str, torch.Tensor]:
        boxes, labels, scores = entry or ([], [], [])
        return {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float64)}

    truth, detections = grouped(gt["annotations"]), grouped(results)
    metric = VOCMeanAP(num_classes=len(names), iou_threshold=0.5, use_07_metric=False)
    for image in gt["images"]:
        image_id = int(image["id"])
        target = tensors(truth.get(image_id))
        metric.update([tensors(detections.get(image_id))], [{"boxes": target["boxes"], "labels": target["labels"]}])
    return RunCurves(dict(zip(names, metric.pr_curves())), f"files in {folder}")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no window, no global figure state
    return fig


def plot_val_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """Validation mAP@0.5 against the training step, one line per run (legend: the run's name); a run
    without validation points is left out, and an empty plot says so."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    drawn = 0
    for name, points in curves.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", markersize=3, label=name)
            drawn += 1
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step (metrics.csv)")
    ax.set_ylabel("val mAP@0.5")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title("validation mAP@0.5 (COCO AP at IoU 0.5)")
    return save_figure(fig, path)


def plot_pr_grid(runs: Mapping[str, RunCurves], path: Path, columns: int = 3) -> Path:
    """One subplot per class (every class any run has), one PR curve per run in it: the monotone envelope
    at IoU 0.5 whose area is the VOC AP in the legend."""
    classes: list[str] = []
    for run in runs.values():
        classes += [c for c in run.curves if c not in classes]
    columns = max(1, min(columns, len(classes)))
    rows = max(1, math.ceil(len(classes) / columns))
    fig = _figure(4.5 * columns, 4 * rows)
    for i, name in enumerate(classes):
        ax = fig.add_subplot(rows, columns, i + 1)
        for j, (run, found) in enumerate(runs.items()):
            curve = found.curves.get(name)
            if curve is None or float(curve["ap"]) < 0:  # the run's data has no such ground truth
                continue
            if len(curve["recall"]):
                ax.step(*pr_envelope(curve["recall"], curve["precision"]), where="pre", color=f"C{j % 10}",
                        label=f"{run} (AP {float(curve['ap']):.3f})")
            else:
                ax.plot([], [], color=f"C{j % 10}", label=f"{run} (no detections)")
        ax.set_title(f"{name}: VOC AP@0.5")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize="small")
    return save_figure(fig, path)
