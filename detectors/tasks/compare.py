"""Compare training runs on the user's data: one table of the runs, their validation curves, their PR curves.

    python -m detectors.compare RUN_DIR... [--out DIR] [--evaluate] [--sort KEY] [--ascending]

Each RUN_DIR is a run folder of train.py or a Hydra multirun folder (its numbered subfolders are the runs).
Into ``--out`` (default ``compare/``) it writes:

* ``compare.md`` and ``compare.csv``: a row per run (keys of the CSV in brackets): run [run], model
  [model], backbone [backbone], loss terms as the built head uses them, "(default)" where the config left
  the head's own [loss_terms], input size H x W [input_size], epochs done of max [epochs, max_epochs] and
  steps [steps] (train.log's last epoch summary), parameters in millions [params_m] and forward GFLOPs per
  image at the input size [gflops] (2 x multiply-adds, ``torch.utils.flop_counter`` as
  benchmarks/backbones.py counts; the model is built from the run's config, the forward runs on the meta
  device), the median of the epoch summaries' training img/s [train_img_s], the time from the first to
  the last line of train.log [wall_time_s], the best validation mAP@0.5 [best_val_map_50] with the step
  metrics.csv logged it at [best_val_step] (Lightning's: the validation after 125 steps is logged at step
  124) and its epoch [best_val_epoch, from 1], mAP@[.5:.95] of that validation [val_map], the test mAP@0.5
  and mAP@[.5:.95] if the run tested [test_map_50, test_map], and COCO's AP@0.5 of each class
  [ap50/<class>: the test's, else the best validation's, as class_ap_from says]. A value the run does not
  have is blank.
* ``val_map50.png``: validation mAP@0.5 over the steps, a line per run.
* ``pr_curves.png`` (and its points, ``pr_curves.json``): precision-recall at IoU 0.5, a subplot per class,
  a curve per run, from the project's VOC AP (``VOCMeanAP.pr_curves``). With ``--evaluate`` each run's
  best.ckpt (else last.ckpt) is evaluated on its test split (val when it has none) as evaluate.py does,
  on the GPU if there is one, and evaluate.py's files go to ``OUT/evaluate/<run>/``; without it the
  curves are read from the files a previous evaluation wrote (``coco_ground_truth.json`` and
  ``coco_results.json`` in the run folder, its ``eval/`` or ``evaluate/``, or ``OUT/evaluate/<run>/``),
  and the plot is skipped, with a note, when no run has them.

A folder without csv/metrics.csv is skipped and named with the reason; what cannot be read from a run
(a model an older version configured, a missing log) leaves blanks and a note. ``--sort KEY`` orders the
rows by a CSV key (default best_val_map_50, descending; ``--ascending``), blanks last. A line per run is
printed. Exit status 0, 1 when there is no run to compare, 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from detectors.evaluation.plots import safe_filename
from detectors.flops import forward_gflops
from detectors.noise import silence_known_noise
from detectors.tasks.compare_plots import (
    RunCurves,
    curves_from_files,
    evaluate_run,
    evaluation_split,
    plot_pr_grid,
    plot_val_curves,
)
from detectors.tasks.compare_table import (
    CLASS_PREFIX,
    CSV_KEYS,
    Row,
    markdown,
    sort_rows,
    summary_line,
    write_csv,
)
from detectors.tasks.run_folder import (
    RunFolder,
    checkpoint_of,
    find_runs,
    hydra_choices,
    read_metrics,
    read_train_log,
    run_config,
)

__all__ = ["main", "model_facts", "read_run"]

log = logging.getLogger(__name__)

TERMS = ("box", "cls", "obj")


def loss_terms(head: torch.nn.Module, config: DictConfig) -> str | None:
    """The loss terms the built head uses (``head.losses``), each marked "(default)" where the run's config
    left it null (``loss.<term>``) and the head chose its own; None for a head without ``losses``."""
    chosen = getattr(head, "losses", None)
    if chosen is None:
        return None
    configured = OmegaConf.select(config, "loss", default=None) or OmegaConf.select(config, "head.losses", default={})
    parts = []
    for term in TERMS:
        name = getattr(chosen, term, None)
        if name is not None:
            parts.append(f"{term} {name}" + ("" if configured.get(term) else " (default)"))
    return ", ".join(parts)


def model_facts(config: DictConfig, source: str) -> dict[str, object]:
    """``loss_terms``, ``params_m`` (every parameter of the DetectionModule, in millions) and ``gflops`` of the
    model ``config`` describes, built on the CPU from random init (no weights read or downloaded).
    Raises ValueError when this version cannot build it."""
    from detectors.checkpoints import build_model

    model = build_model(OmegaConf.create(OmegaConf.to_container(config)), source)
    return {"loss_terms": loss_terms(model.detector.head, config),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": forward_gflops(model.detector, model.input_size)}


def _name_of(config: DictConfig | None, key: str) -> str | None:
    target = OmegaConf.select(config, f"{key}._target_", default=None) if config is not None else None
    return str(target).rsplit(".", 1)[-1] if target else None


def read_run(run: RunFolder) -> Row | str:
    """The table row of a run folder, or the reason it is skipped (no metrics.csv to compare)."""
    metrics_file = run.path / "csv" / "metrics.csv"
    if not metrics_file.is_file():
        return "no csv/metrics.csv (nothing logged yet, or a run without the CSV logger)"
    try:
        metrics = read_metrics(metrics_file)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        return f"csv/metrics.csv cannot be read ({e})"
    row = Row(run.name, run.path, {"run": run.name}, metrics.val_curve)
    logged = read_train_log(run.path / "train.log")
    if not (run.path / "train.log").is_file():
        row.notes.append("no train.log")
    if logged.epochs is not None:
        row.values.update(epochs=logged.epochs, max_epochs=logged.max_epochs, steps=logged.steps)
    elif metrics.last_step is not None:
        row.values.update(epochs=metrics.last_epoch + 1 if metrics.last_epoch is not None else None,
                          steps=metrics.last_step + 1)
        row.notes.append("no epoch summary in train.log: epochs and steps as far as metrics.csv logged them")
    row.values.update(time_budget_s=logged.budget_seconds, budget_used_s=logged.budget_used_seconds)
    row.values.update(train_img_s=logged.img_per_s, wall_time_s=logged.wall_seconds,
                      best_val_map_50=metrics.best_val_map_50, best_val_step=metrics.best_val_step,
                      best_val_epoch=metrics.best_val_epoch + 1 if metrics.best_val_epoch is not None else None,
                      val_map=metrics.val_map, test_map_50=metrics.test_map_50, test_map=metrics.test_map,
                      class_ap_from=metrics.class_ap_from)
    row.values.update({CLASS_PREFIX + name: ap for name, ap in metrics.class_ap.items()})

    classes = logged.classes or [k[len(CLASS_PREFIX):] for k in row.values if k.startswith(CLASS_PREFIX)] or None
    config, source = run_config(run.path, classes)
    row.config = config
    choices = hydra_choices(run.path)
    row.values.update(model=choices.get("model") or _name_of(config, "head"),
                      backbone=choices.get("backbone") or _name_of(config, "backbone"))
    if config is None:
        row.notes.append(f"no model facts: {source}")
        return row
    size = OmegaConf.select(config, "input_size", default=None)
    row.values["input_size"] = "x".join(str(int(s)) for s in size) if size is not None else None
    try:
        row.values.update(model_facts(config, f"{run.path / source}"))
        row.buildable = True
    except Exception as e:  # noqa: BLE001 (an older or broken config: blanks and the reason, not a crash)
        row.notes.append(f"no model facts: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return row


def pr_curves_of(row: Row, out: Path, evaluate: bool, options: argparse.Namespace) -> RunCurves | None:
    """The run's PR curves: evaluated now (``evaluate``), else read from files an evaluation left."""
    folder = out / "evaluate" / safe_filename(row.name)
    if not evaluate:
        for place in (row.path, row.path / "eval", row.path / "evaluate", folder):
            found = curves_from_files(place)
            if found is not None:
                return found
        return None
    checkpoint = checkpoint_of(row.path)
    if checkpoint is None or row.config is None:
        row.notes.append("not evaluated: no checkpoint")
        return None
    if not row.buildable:
        row.notes.append("not evaluated: its model cannot be built (see above)")
        return None
    if checkpoint.name != "best.ckpt":
        row.notes.append("no best.ckpt: last.ckpt evaluated")
    try:
        return evaluate_run(checkpoint, evaluation_split(row.config), folder, options.accelerator,
                            options.batch_size, options.num_workers)
    except Exception as e:  # noqa: BLE001 (one run that cannot be evaluated leaves the others' curves)
        row.notes.append(f"not evaluated: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None


def pr_json(curves: dict[str, RunCurves]) -> dict:
    return {name: {"source": found.source, "classes": {
        c: {"ap": float(k["ap"]), "num_gt": int(k["num_gt"]), "recall": [float(x) for x in k["recall"]],
            "precision": [float(x) for x in k["precision"]]} for c, k in found.curves.items()}}
        for name, found in curves.items()}


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="python -m detectors.compare", description=doc[0],
                                     epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folders of train.py, or Hydra multirun folders")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default: compare/)")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate each run's best checkpoint on its test split (val without one) for the PR plot")
    parser.add_argument("--sort", default="best_val_map_50", metavar="KEY",
                        help="a CSV key to order the rows by (default best_val_map_50), descending")
    parser.add_argument("--ascending", action="store_true", help="sort ascending")
    parser.add_argument("--accelerator", default="auto", help="--evaluate's device: auto (the GPU if any), gpu, cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="--evaluate's batch size")
    parser.add_argument("--num-workers", type=int, default=2, help="--evaluate's loader workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import lightning.pytorch  # noqa: F401  (it sets its loggers' level when imported: first import, then quieten)

    for name in ("lightning.pytorch", "lightning.fabric"):  # their INFO lines ("GPU available: ...") per evaluation
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_known_noise()
    command = "python -m detectors.compare " + " ".join(str(a) for a in (sys.argv[1:] if argv is None else argv))

    if args.sort not in CSV_KEYS and not args.sort.startswith(CLASS_PREFIX):
        parser.error(f"--sort {args.sort}: not a column; choose from {', '.join(CSV_KEYS)} or {CLASS_PREFIX}<class>")

    folders, skipped = find_runs(args.runs)
    rows: list[Row] = []
    for run in folders:
        found = read_run(run)
        if isinstance(found, str):
            skipped.append((str(run.path), found))
        else:
            rows.append(found)
    for path, why in skipped:
        print(f"skipped {path}: {why}")
    if not rows:
        print("no run to compare")
        return 1
    rows = sort_rows(rows, args.sort, args.ascending)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pictures = [plot_val_curves({r.name: r.val_curve for r in rows}, out / "val_map50.png").name]
    curves = {}
    for row in rows:
        found = pr_curves_of(row, out, args.evaluate, args)
        if found is not None:
            curves[row.name] = found
            print(f"PR curves of {row.name}: {found.source}")
    if curves:
        pictures.append(plot_pr_grid(curves, out / "pr_curves.png").name)
        (out / "pr_curves.json").write_text(json.dumps(pr_json(curves)))
    else:
        print("no PR curves: no run evaluated (--evaluate evaluates each run's best checkpoint); pr_curves.png "
              "not written")
    (out / "compare.md").write_text(markdown(rows, skipped, pictures, command))
    write_csv(rows, out / "compare.csv")
    for row in rows:
        print(summary_line(row))
        for note in row.notes:
            print(f"  note: {note}")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, " + ", ".join(str(out / p) for p in pictures))
    return 0
