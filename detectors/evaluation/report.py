"""Human-readable evaluation output: the 12 COCO stats as pycocotools prints them, and a per-class table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from detectors.evaluation.coco import format_coco_stats


def format_class_table(metrics: Mapping[str, Tensor], class_names: Sequence[str]) -> str:
    """Per-class table; each column header names its metric (VOC area AP vs COCO AP)."""
    voc_key = next((k for k in metrics if k.startswith("voc") and k.endswith("per_class")), None)
    columns = [(k, h) for k, h in [
        ("num_gt_per_class", "GT"),
        (voc_key, "VOC AP@0.5 (area)" if voc_key and "07" not in voc_key else "VOC07 AP@0.5 (11-pt)"),
        ("map_50_per_class", "COCO AP@0.5"),
        ("map_per_class", "COCO AP@[.5:.95]"),
    ] if k in metrics]
    width = max([len("class"), *map(len, class_names)])
    header = f"{'class':<{width}} | " + " | ".join(f"{h:>{max(len(h), 6)}}" for _, h in columns)
    rows = [header, "-" * len(header)]
    for i, name in enumerate(class_names):
        cells = []
        for key, h in columns:
            v = float(metrics[key].reshape(-1)[i])  # torchmetrics squeezes one-class outputs to 0-d
            cells.append(f"{int(v):>{max(len(h), 6)}d}" if key == "num_gt_per_class" else f"{v:>{max(len(h), 6)}.4f}")
        rows.append(f"{name:<{width}} | " + " | ".join(cells))
    return "\n".join(rows)


def format_report(metrics: Mapping[str, Tensor], class_names: Sequence[str], title: str = "") -> str:
    voc = {k: float(v) for k, v in metrics.items() if k.startswith("voc") and v.numel() == 1}
    parts = [f"== {title} ==" if title else "", "COCO bbox (pycocotools definitions):", *format_coco_stats(metrics)]
    parts += [f"{k} = {v:.4f}" for k, v in voc.items()]
    parts += ["(-1: no ground truth in that bucket, as pycocotools prints it)", format_class_table(metrics, class_names)]
    return "\n".join(p for p in parts if p)
