"""The table of ``python -m detectors.compare``: a row per run, as Markdown (``compare.md``, for reading) and CSV
(``compare.csv``, every number at full precision, keyed as ``CSV_KEYS``), sorted by a key, and a line per run
for the terminal. Blank where a run has no value."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["CLASS_PREFIX", "CSV_KEYS", "Row", "class_names_of", "markdown", "sort_rows", "summary_line", "write_csv"]

CSV_KEYS = ["run", "model", "backbone", "loss_terms", "input_size", "epochs", "max_epochs", "steps", "params_m",
            "gflops", "train_img_s", "wall_time_s", "time_budget_s", "budget_used_s", "best_val_map_50", "best_val_step", "best_val_epoch", "val_map",
            "test_map_50", "test_map", "class_ap_from"]
CLASS_PREFIX = "ap50/"


@dataclass
class Row:
    """One run of the table: ``values`` by CSV key (None: blank), its validation curve (step, val mAP@0.5),
    notes for the reader, the run config read (None: none found) and whether its model could be built."""

    name: str
    path: Path
    values: dict[str, object] = field(default_factory=dict)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: DictConfig | None = None
    buildable: bool = False


def _fmt(value: object, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _duration(seconds: object) -> str:
    if seconds is None:
        return ""
    s = int(round(float(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _class_ap(value: object) -> str:
    return "no GT" if isinstance(value, float) and value < 0 else _fmt(value, 4)  # -1: pycocotools' "no GT"


def _epochs(v: dict) -> str:
    if v.get("epochs") is None:
        return ""
    return f"{v['epochs']}/{v['max_epochs']}" if v.get("max_epochs") else str(v["epochs"])


def _budget(v: dict) -> str:
    """``12:00 (97%)``: a time-budgeted run's budget and the share of it the run used (train.py's clock, from the
    start to the end of the last validation); blank for a run without one."""
    if not v.get("time_budget_s"):
        return ""
    used = f" ({100 * v['budget_used_s'] / v['time_budget_s']:.0f}%)" if v.get("budget_used_s") is not None else ""
    return _duration(v["time_budget_s"]) + used


def _best_step(v: dict) -> str:
    if v.get("best_val_step") is None:
        return ""
    return f"{v['best_val_step']}" + (f" (epoch {v['best_val_epoch']})" if v.get("best_val_epoch") else "")


MARKDOWN_COLUMNS = [
    ("run", lambda v: _fmt(v.get("run"), 0)),
    ("model", lambda v: _fmt(v.get("model"), 0)),
    ("backbone", lambda v: _fmt(v.get("backbone"), 0)),
    ("loss terms", lambda v: _fmt(v.get("loss_terms"), 0)),
    ("input (HxW)", lambda v: _fmt(v.get("input_size"), 0)),
    ("epochs", _epochs),
    ("steps", lambda v: _fmt(v.get("steps"), 0)),
    ("params (M)", lambda v: _fmt(v.get("params_m"), 2)),
    ("GFLOPs", lambda v: _fmt(v.get("gflops"), 2)),
    ("train img/s", lambda v: _fmt(v.get("train_img_s"), 1)),
    ("wall time", lambda v: _duration(v.get("wall_time_s"))),
    ("time budget (used)", lambda v: _budget(v)),
    ("best val mAP@0.5", lambda v: _fmt(v.get("best_val_map_50"), 4)),
    ("at step", _best_step),
    ("val mAP@[.5:.95]", lambda v: _fmt(v.get("val_map"), 4)),
    ("test mAP@0.5", lambda v: _fmt(v.get("test_map_50"), 4)),
    ("test mAP@[.5:.95]", lambda v: _fmt(v.get("test_map"), 4)),
    ("class AP from", lambda v: _fmt(v.get("class_ap_from"), 0)),
]


def class_names_of(rows: Sequence[Row]) -> list[str]:
    """Every class with a per-class AP column, in the order the rows first name them."""
    names: list[str] = []
    for row in rows:
        names += [k[len(CLASS_PREFIX):] for k in row.values if k.startswith(CLASS_PREFIX)
                  and k[len(CLASS_PREFIX):] not in names]
    return names


def sort_rows(rows: list[Row], key: str, ascending: bool = False) -> list[Row]:
    """Rows ordered by ``values[key]`` (numbers as numbers, else as text), blanks last."""
    present = [r for r in rows if r.values.get(key) is not None]
    blank = [r for r in rows if r.values.get(key) is None]
    numeric = all(isinstance(r.values[key], (int, float)) for r in present)
    present.sort(key=lambda r: r.values[key] if numeric else str(r.values[key]), reverse=not ascending)
    return present + blank


def markdown(rows: Sequence[Row], skipped: Sequence[tuple[str, str]], pictures: Sequence[str], command: str) -> str:
    classes = class_names_of(rows)
    columns = MARKDOWN_COLUMNS + [(f"AP@0.5 {c}", lambda v, c=c: _class_ap(v.get(CLASS_PREFIX + c))) for c in classes]

    def cells(texts: Sequence[str]) -> str:
        return "| " + " | ".join(t.replace("|", "\\|") for t in texts) + " |"

    lines = [f"# Runs compared ({datetime.now():%Y-%m-%d %H:%M})", "", f"`{command}`", "",
             cells([h for h, _ in columns]), cells(["---"] * len(columns))]
    lines += [cells([f(row.values) for _, f in columns]) for row in rows]
    lines += ["", "mAP@0.5 and the per-class AP@0.5 are COCO's (101-point) at IoU 0.5 (no GT: the split has no box "
                  "of the class); steps as metrics.csv logs them; wall time from the first to the last line of "
                  "train.log."]
    notes = [(row.name, n) for row in rows for n in row.notes]
    if notes:
        lines += ["", "Notes:", *[f"- {name}: {note}" for name, note in notes]]
    if skipped:
        lines += ["", "Skipped:", *[f"- {path}: {why}" for path, why in skipped]]
    lines += ["", *[f"![{p}]({p})" for p in pictures]]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    keys = CSV_KEYS + [CLASS_PREFIX + c for c in class_names_of(rows)] + ["path"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.values.get(k) is None else row.values.get(k) for k in keys[:-1]}
                            | {"path": str(row.path)})
    return path


def summary_line(row: Row) -> str:
    v = row.values
    parts = [f"{v.get('model') or '?'}/{v.get('backbone') or '?'} {v.get('input_size') or '?'}",
             f"{_epochs(v) or '?'} epochs, {_fmt(v.get('steps'), 0) or '?'} steps"]
    if v.get("params_m") is not None:
        parts.append(f"{v['params_m']:.2f} M params, {v['gflops']:.2f} GFLOPs")
    if v.get("train_img_s") is not None:
        parts.append(f"{v['train_img_s']:.1f} img/s")
    if v.get("wall_time_s") is not None:
        parts.append(f"wall {_duration(v['wall_time_s'])}")
    best = (f"best val mAP@0.5 {v['best_val_map_50']:.4f} at step {_best_step(v)}"
            if v.get("best_val_map_50") is not None else "no validation yet")
    test = f", test mAP@0.5 {v['test_map_50']:.4f}" if v.get("test_map_50") is not None else ""
    return f"{row.name}: " + ", ".join(parts) + f"; {best}{test}"
