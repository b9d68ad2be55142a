"""What a train.py run folder says about its run, read from its files only (no model is built here):
``train.log`` (the epoch summaries, the class names, the time of the first and last line),
``csv/metrics.csv`` (every validation and test metric), the run config (a checkpoint's, else
``.hydra/config.yaml``) and Hydra's choices (``model=``, ``backbone=``) from ``.hydra/hydra.yaml``.

Every reader takes what is there and leaves the rest None: a run in progress, a failed or an older
run gives a partial answer, never an exception for a missing or short file.
"""

from __future__ import annotations

import ast
import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.checkpoints import read_run_config

__all__ = [
    "LogFacts",
    "MetricFacts",
    "RunFolder",
    "checkpoint_of",
    "find_runs",
    "hydra_choices",
    "read_metrics",
    "read_train_log",
    "run_config",
]

# "[2026-12-04 18:08:09,467][module][INFO] - message": the format of configs/hydra's job logging
LOG_TIME = re.compile(r"^\[(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:,(\d{1,6}))?\]")
# detectors.callbacks.epoch_summary.EpochSummary's line
EPOCH_LINE = re.compile(r"epoch (\d+)(?:/(\d+))? step (\d+): .*?(\d+) images ([0-9.]+(?:e[-+]?\d+)?) img/s")
# detectors.callbacks.time_budget.TimeBudget's last line
BUDGET_LINE = re.compile(r"time budget .*?\((\d+(?:\.\d+)?) s\): (\d+(?:\.\d+)?) s used")
# detectors.tasks.train.build_datamodule's line
CLASSES_LINE = re.compile(r"classes \(label order\): (\[.*\])\s*$")


@dataclass(frozen=True)
class RunFolder:
    """A run folder to compare and the name its row takes (the folder's; ``<multirun>/<job>`` for a job
    of a Hydra multirun folder; the parent's name in front where two folders share a name)."""

    name: str
    path: Path


def _is_run_folder(path: Path) -> bool:
    return any((path / p).exists() for p in (".hydra/config.yaml", "train.log", "csv/metrics.csv", "checkpoints"))


def find_runs(paths: list[Path]) -> tuple[list[RunFolder], list[tuple[str, str]]]:
    """The run folders among ``paths``: each is a run folder of train.py, or a Hydra multirun folder
    whose numbered subfolders (``0/``, ``1/``, ...) are runs. Returns the runs (each folder once, in
    the order given) and ``(path, why)`` for every path that is neither."""
    found: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            skipped.append((str(given), "not found"))
        elif not path.is_dir():
            skipped.append((str(given), "not a folder"))
        elif _is_run_folder(path):
            found.append((path.resolve().name, path))
        else:
            jobs = sorted((c for c in path.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))
            if not jobs:
                skipped.append((str(given), "neither a run folder of train.py (no .hydra/config.yaml, train.log, "
                                            "csv/ or checkpoints/) nor a multirun folder (no numbered subfolders)"))
            for job in jobs:
                if _is_run_folder(job):
                    found.append((f"{path.resolve().name}/{job.name}", job))
                else:
                    skipped.append((str(job), "a numbered subfolder that is no run folder"))
    seen: set[Path] = set()
    unique = []
    for name, path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append((name, path))
    counts: dict[str, int] = {}
    for name, _ in unique:
        counts[name] = counts.get(name, 0) + 1
    runs = [RunFolder(f"{p.resolve().parent.name}/{n}" if counts[n] > 1 and "/" not in n else n, p) for n, p in unique]
    return runs, skipped


@dataclass
class LogFacts:
    """From ``train.log``: the last epoch summary's epoch (of ``max_epochs``) and step, the median of
    the summaries' training img/s, the seconds from the first to the last timestamped line, the classes,
    and a time-budgeted run's budget and the seconds it used."""

    epochs: int | None = None
    max_epochs: int | None = None
    steps: int | None = None
    img_per_s: float | None = None
    wall_seconds: float | None = None
    classes: list[str] | None = None
    budget_seconds: float | None = None  # time_budget=..., and how much of it the run used
    budget_used_seconds: float | None = None


def _log_time(line: str) -> datetime | None:
    m = LOG_TIME.match(line)
    if not m:
        return None
    fraction = (m.group(2) or "0").ljust(6, "0")
    try:
        return datetime.strptime(f"{m.group(1)}.{fraction}", "%Y-%m-%d %H:%M:%S.%f")
    except ValueError:
        return None


def read_train_log(path: Path) -> LogFacts:
    """:class:`LogFacts` of a ``train.log`` (all None when the file is missing)."""
    facts = LogFacts()
    if not path.is_file():
        return facts
    first = last = None
    rates = []
    with open(path, errors="replace") as f:
        for line in f:
            when = _log_time(line)
            if when is not None:
                first = first or when
                last = when
            if m := EPOCH_LINE.search(line):
                facts.epochs, facts.steps = int(m.group(1)), int(m.group(3))
                facts.max_epochs = int(m.group(2)) if m.group(2) else None
                rates.append(float(m.group(5)))
            elif m := BUDGET_LINE.search(line):
                facts.budget_seconds, facts.budget_used_seconds = float(m.group(1)), float(m.group(2))
            elif (m := CLASSES_LINE.search(line)) and facts.classes is None:
                try:
                    facts.classes = [str(c) for c in ast.literal_eval(m.group(1))]
                except (ValueError, SyntaxError):
                    pass
    facts.img_per_s = statistics.median(rates) if rates else None
    facts.wall_seconds = (last - first).total_seconds() if first is not None and last is not None else None
    return facts


@dataclass
class MetricFacts:
    """From ``csv/metrics.csv``.

    ``best_val_map_50`` is the largest ``val/map_50`` (the first row holding it: the one best.ckpt
    kept), with that row's ``step``, ``epoch`` and ``val/map``. ``test_*`` come from the last row with
    ``test/map_50``. ``class_ap`` is COCO's AP@0.5 of each class (``map_50_per_class``, whose mean is
    mAP@0.5) from the test row if there is one, else from the best validation row (``class_ap_from``
    says which). ``val_curve`` is every (step, val/map_50). Steps are as metrics.csv has them.
    """

    best_val_map_50: float | None = None
    best_val_step: int | None = None
    best_val_epoch: int | None = None
    val_map: float | None = None
    test_map_50: float | None = None
    test_map: float | None = None
    class_ap: dict[str, float] = field(default_factory=dict)
    class_ap_from: str | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    last_step: int | None = None
    last_epoch: int | None = None


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    value = _number(text)
    return int(value) if value is not None else None


def read_metrics(path: Path) -> MetricFacts:
    """:class:`MetricFacts` of a metrics.csv. Raises ValueError for a file without a header."""
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError("csv/metrics.csv is empty")
        rows = list(reader)
    facts = MetricFacts()
    steps = [s for r in rows if (s := _int(r.get("step"))) is not None]
    epochs = [e for r in rows if (e := _int(r.get("epoch"))) is not None]
    facts.last_step = max(steps) if steps else None
    facts.last_epoch = max(epochs) if epochs else None
    best_row = None
    for row in rows:
        value = _number(row.get("val/map_50"))
        if value is None:
            continue
        step = _int(row.get("step"))
        if step is not None:
            facts.val_curve.append((step, value))
        if facts.best_val_map_50 is None or value > facts.best_val_map_50:
            facts.best_val_map_50, best_row = value, row
    if best_row is not None:
        facts.best_val_step, facts.best_val_epoch = _int(best_row.get("step")), _int(best_row.get("epoch"))
        facts.val_map = _number(best_row.get("val/map"))
    test_row = next((r for r in reversed(rows) if _number(r.get("test/map_50")) is not None), None)
    if test_row is not None:
        facts.test_map_50, facts.test_map = _number(test_row["test/map_50"]), _number(test_row.get("test/map"))
    for stage, row in (("test", test_row), ("val", best_row)):
        if row is None:
            continue
        prefix = f"{stage}/map_50_per_class/"
        aps = {k[len(prefix):]: v for k, text in row.items() if k and k.startswith(prefix)
               and (v := _number(text)) is not None}
        if aps:
            facts.class_ap = aps
            facts.class_ap_from = "test" if stage == "test" else f"val step {facts.best_val_step}"
            break
    return facts


def checkpoint_of(folder: Path, prefer: tuple[str, ...] = ("best.ckpt", "last.ckpt")) -> Path | None:
    """The first of ``prefer`` in ``folder/checkpoints``, or None."""
    return next((folder / "checkpoints" / n for n in prefer if (folder / "checkpoints" / n).is_file()), None)


def run_config(folder: Path, classes: list[str] | None = None) -> tuple[DictConfig | None, str]:
    """The run's config and where it came from: a checkpoint's stored run config (resolved, as the model
    was built), else ``.hydra/config.yaml``, whose null ``data.classes`` (train.py reads the names from
    the data) is filled in from ``classes``. ``(None, why)`` when there is neither."""
    for name in ("last.ckpt", "best.ckpt"):
        path = folder / "checkpoints" / name
        if path.is_file():
            try:
                return read_run_config(path), f"checkpoints/{name}"
            except (ValueError, OSError):  # being written by a running job, or not ours: the next source
                continue
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None, "no checkpoint and no .hydra/config.yaml"
    try:
        config = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 (a file that does not parse is a reason, not a crash)
        return None, f".hydra/config.yaml does not load ({type(e).__name__})"
    with open_dict(config):
        if OmegaConf.select(config, "paths") is not None:
            config.paths.output_dir = str(folder)  # was ${hydra:runtime.output_dir}: this folder
        if OmegaConf.select(config, "data.classes") is None and classes:
            config.data.classes = list(classes)
    return config, ".hydra/config.yaml"


def hydra_choices(folder: Path) -> dict[str, str]:
    """Hydra's config-group choices of the run (``model``, ``backbone``, ``experiment``, ...), from
    ``.hydra/hydra.yaml``; empty when the file is missing or unreadable."""
    path = folder / ".hydra" / "hydra.yaml"
    try:
        choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices") if path.is_file() else None
        return {str(k): str(v) for k, v in OmegaConf.to_container(choices).items() if v is not None} if choices else {}
    except Exception:  # noqa: BLE001 (a name from elsewhere will do)
        return {}
