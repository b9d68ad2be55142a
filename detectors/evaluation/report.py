"""Human-readable evaluation output: the 12 COCO stats as pycocotools prints them, and a per-class table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

# (key, AP or AR, IoU, area, maxDets) in pycocotools' summarize() order
COCO_STATS: list[tuple[str, str, str, str, int]] = [
    ("map", "AP", "0.50:0.95", "all", 100),
    ("map_50", "AP", "0.50", "all", 100),
    ("map_75", "AP", "0.75", "all", 100),
    ("map_small", "AP", "0.50:0.95", "small", 100),
    ("map_medium", "AP", "0.50:0.95", "medium", 100),
    ("map_large", "AP", "0.50:0.95", "large", 100),
    ("mar_1", "AR", "0.50:0.95", "all", 1),
    ("mar_10", "AR", "0.50:0.95", "all", 10),
    ("mar_100", "AR", "0.50:0.95", "all", 100),
    ("mar_small", "AR", "0.50:0.95", "small", 100),
    ("mar_medium", "AR", "0.50:0.95", "medium", 100),
    ("mar_large", "AR", "0.50:0.95", "large", 100),
]


def format_coco_stats(stats: Mapping[str, float | Tensor]) -> str:
    """The 12 stats in pycocotools' COCOeval.summarize() line format."""
    lines = []
    for key, kind, iou, area, max_dets in COCO_STATS:
        name = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(
            f" {name:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {float(stats[key]):0.3f}"
        )
    return "\n".join(lines)


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
            v = float(metrics[key][i])
            cells.append(f"{int(v):>{max(len(h), 6)}d}" if key == "num_gt_per_class" else f"{v:>{max(len(h), 6)}.4f}")
        rows.append(f"{name:<{width}} | " + " | ".join(cells))
    return "\n".join(rows)


def format_report(metrics: Mapping[str, Tensor], class_names: Sequence[str], title: str = "") -> str:
    voc = {k: float(v) for k, v in metrics.items() if k.startswith("voc") and v.numel() == 1}
    parts = [f"== {title} ==" if title else "", "COCO bbox (pycocotools definitions):", format_coco_stats(metrics)]
    parts += [f"{k} = {v:.4f}" for k, v in voc.items()]
    parts += ["(-1: no ground truth in that bucket, as pycocotools prints it)", format_class_table(metrics, class_names)]
    return "\n".join(p for p in parts if p)
