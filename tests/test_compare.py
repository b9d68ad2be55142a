"""python -m detectors.compare: the table against each run's own files read here, params and GFLOPs against
the model rebuilt from its checkpoint and counted as benchmarks/backbones.py counts, the PR curves against
evaluate.py's per-class VOC AP; and the readers on hand-written files whose answers are known."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import detectors  # noqa: F401  (resolvers)
from detectors.tasks.compare import main
from detectors.tasks.compare_plots import curves_from_files, evaluation_split
from detectors.tasks.compare_table import CSV_KEYS, Row, sort_rows
from detectors.tasks.run_folder import find_runs, read_metrics, read_train_log
from test_train_e2e import TINY, run, run_dir, textured_shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Two models and two loss choices (configured, the head's defaults): the loss column must tell them apart.
# SSDLite fits its 2 images of one shape each (the overfit preset: unaugmented, validated on those same
# images) for 30 steps, validated 3 times, so its PR curves can hold true positives; its data has no test
# split, so it is evaluated on val. YOLOv2 trains 2 epochs of the tiny shapes and tests.
RUNS = {
    "ssdlite": ["model=ssdlite", "loss.box=giou", *textured_shapes(max_objects=1), "debug=overfit",
                "trainer.overfit_batches=1", "data.batch_size=2",
                "trainer.max_epochs=30", "trainer.check_val_every_n_epoch=10", "data.source.sizes={train: 2, val: 2}",
                "~data.source.sizes.test", "data.num_workers=0",
                "trainer.accelerator=cpu"],
    "yolov2": ["model=yolov2", "multiscale.sizes=null", "input_size=[320,320]", *TINY, "trainer.max_epochs=2",
               "test=true"],
}
SPLIT = {"ssdlite": "val", "yolov2": "test"}
STEPS = {"ssdlite": 30, "yolov2": 4}


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Path:
    """Two tiny finished runs and an incomplete folder (a config and a log, no metrics)."""
    base = tmp_path_factory.mktemp("runs")
    for name, overrides in RUNS.items():
        run("train.py", *overrides, run_dir(base, name))
    incomplete = base / "incomplete"
    (incomplete / ".hydra").mkdir(parents=True)
    shutil.copy(base / "ssdlite" / ".hydra" / "config.yaml", incomplete / ".hydra" / "config.yaml")
    (incomplete / "train.log").write_text("[2026-01-01 10:00:00,000][x][INFO] - started\n")
    return base


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def compared(runs, tmp_path_factory) -> tuple[Path, str]:
    """The command as a user types it, without --evaluate."""
    out = tmp_path_factory.mktemp("compare")
    proc = subprocess.run([sys.executable, "-m", "detectors.compare", str(runs / "yolov2"), str(runs / "ssdlite"),
                           str(runs / "incomplete"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def evaluated(runs, tmp_path_factory) -> tuple[Path, str]:
    """In this process (its stdout captured), on the CPU: evaluate.py's files and the PR curves."""
    out = tmp_path_factory.mktemp("compare_evaluated")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main([str(runs / "ssdlite"), str(runs / "yolov2"), "--out", str(out), "--evaluate",
                       "--accelerator", "cpu", "--num-workers", "0"])
    assert status == 0, buffer.getvalue()
    return out, buffer.getvalue()


def metrics_csv(folder: Path) -> list[dict[str, str]]:
    return csv_rows(folder / "csv" / "metrics.csv")


@pytest.mark.slow
def test_the_table_has_a_row_per_run_and_the_runs_own_numbers(runs, compared):
    out, stdout = compared
    rows = csv_rows(out / "compare.csv")
    by_name = {r["run"]: r for r in rows}
    assert len(rows) == 2 and set(by_name) == {"ssdlite", "yolov2"}
    header = list(rows[0])
    classes = sorted(k.split("/")[-1] for k in metrics_csv(runs / "yolov2")[0]
                     if k.startswith("test/map_50_per_class/"))
    assert len(classes) == 6  # the shapes' classes, a column each
    assert sorted(h[len("ap50/"):] for h in header if h.startswith("ap50/")) == classes
    assert header[:len(CSV_KEYS)] == CSV_KEYS and header[-1] == "path"

    for name, row in by_name.items():
        metrics = metrics_csv(runs / name)
        val = [(float(r["val/map_50"]), r) for r in metrics if r.get("val/map_50")]
        best, best_row = max(val, key=lambda x: x[0])
        assert float(row["best_val_map_50"]) == best
        assert int(row["best_val_step"]) == int(best_row["step"])
        assert int(row["best_val_epoch"]) == int(best_row["epoch"]) + 1
        assert float(row["val_map"]) == float(best_row["val/map"])
        tests = [r for r in metrics if r.get("test/map_50")]
        if SPLIT[name] == "test":
            (test,) = tests
            assert float(row["test_map_50"]) == float(test["test/map_50"])
            assert float(row["test_map"]) == float(test["test/map"])
            assert row["class_ap_from"] == "test"
            for c in classes:
                assert float(row[f"ap50/{c}"]) == float(test[f"test/map_50_per_class/{c}"])
        else:  # no test: blanks, and the best validation's per-class AP
            assert not tests and row["test_map_50"] == row["test_map"] == ""
            assert row["class_ap_from"] == f"val step {best_row['step']}"
            for c in classes:
                assert float(row[f"ap50/{c}"]) == float(best_row[f"val/map_50_per_class/{c}"])
        last = torch.load(runs / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert int(row["steps"]) == last["global_step"] == STEPS[name]
        assert row["epochs"] == row["max_epochs"] == str(last["epoch"] + 1)
        assert row["input_size"] == "320x320"
        rates = [float(m) for m in re.findall(r"([0-9.]+) img/s", (runs / name / "train.log").read_text())]
        assert len(rates) == int(row["epochs"]) and float(row["train_img_s"]) == statistics.median(rates)
        assert 0 < float(row["wall_time_s"]) < 600
        if not torch.cuda.is_available():  # the CPU's default time budget (13 min), of which the short run used little
            assert float(row["time_budget_s"]) == 780 and 0 < float(row["budget_used_s"]) < 600
    assert by_name["ssdlite"]["model"] == "ssdlite" and by_name["ssdlite"]["backbone"] == "mobilenet_v2"
    assert by_name["yolov2"]["model"] == "yolov2" and by_name["yolov2"]["backbone"] == "darknet19"
    assert by_name["ssdlite"]["loss_terms"] == "box giou, cls ce (default)"
    assert by_name["yolov2"]["loss_terms"] == "box sse (default), cls ce (default), obj bce (default)"
    # sorted by best val mAP@0.5, descending
    values = [float(r["best_val_map_50"]) for r in rows]
    assert values == sorted(values, reverse=True)

    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and len({line.count(" | ") for line in table}) == 1
    assert table[0].count(" | ") + 1 == 18 + len(classes)  # 18 columns, then a column per class
    for name in RUNS:
        assert any(line.startswith(f"| {name} |") for line in table[2:])
        assert re.search(rf"^{name}: .*best val mAP@0.5 [0-9.]+ at step \d+", stdout, re.M)


@pytest.mark.slow
def test_params_and_gflops_are_those_of_the_model_rebuilt_from_its_checkpoint(runs, compared):
    from backbones import gflops

    from detectors.checkpoints import load_checkpoint, restore_model

    rows = {r["run"]: r for r in csv_rows(compared[0] / "compare.csv")}
    for name in RUNS:
        ckpt, config = load_checkpoint(runs / name / "checkpoints" / "best.ckpt")
        model = restore_model(ckpt, config, "best.ckpt").eval()
        assert float(rows[name]["params_m"]) == sum(p.numel() for p in model.parameters()) / 1e6
        # benchmarks/backbones.py's count: real zeros through the network on the CPU
        reference = gflops(model.detector, 320, torch.device("cpu"))
        assert float(rows[name]["gflops"]) == pytest.approx(reference, rel=1e-9)
        assert reference > 0.1


@pytest.mark.slow
def test_plots_are_pngs_and_the_incomplete_folder_is_skipped_with_its_reason(runs, compared):
    out, stdout = compared
    assert (out / "val_map50.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (out / "pr_curves.png").exists() and "no PR curves" in stdout
    reason = "no csv/metrics.csv"
    assert f"skipped {runs / 'incomplete'}: {reason}" in stdout
    markdown = (out / "compare.md").read_text()
    assert f"- {runs / 'incomplete'}: {reason}" in markdown and "![val_map50.png](val_map50.png)" in markdown
    assert "incomplete" not in {r["run"] for r in csv_rows(out / "compare.csv")}


def evaluate_py_voc_ap(checkpoint: Path, split: str, out: Path) -> list[float]:
    """Per-class VOC AP of evaluate.py's own run (its module's metric, not the writer's the PR curves use)."""
    from detectors.tasks.evaluate import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={checkpoint}", f"split={split}", "num_workers=0",
                                             "trainer.accelerator=cpu", f"paths.output_dir={out}"])
    return [float(v) for v in evaluate(cfg)["voc_ap_per_class"]]


@pytest.mark.slow
def test_evaluate_draws_pr_curves_whose_ap_is_evaluate_pys(runs, evaluated, tmp_path):
    out, stdout = evaluated
    png = (out / "pr_curves.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", png[16:24]) == (3 * 450, 2 * 400)  # 6 classes: subplots of 3 columns, 2 rows
    assert (out / "val_map50.png").read_bytes()[:8] == PNG_SIGNATURE
    found = json.loads((out / "pr_curves.json").read_text())
    assert set(found) == set(RUNS)
    for name in RUNS:
        assert found[name]["source"] == f"evaluated {name}/checkpoints/best.ckpt on {SPLIT[name]}"
        reference = evaluate_py_voc_ap(runs / name / "checkpoints" / "best.ckpt", SPLIT[name], tmp_path / name)
        curves = found[name]["classes"]
        assert len(curves) == len(reference) == 6
        for (class_name, curve), ap in zip(curves.items(), reference):
            assert curve["ap"] == pytest.approx(ap, abs=1e-6), (name, class_name)
            assert len(curve["recall"]) == len(curve["precision"])
        assert (out / "evaluate" / name / "coco_results.json").is_file()
    # where the overfitted SSDLite's best validation found boxes, so does its evaluation: APs above 0
    best = float({r["run"]: r for r in csv_rows(out / "compare.csv")}["ssdlite"]["best_val_map_50"])
    hits = [c for c in found["ssdlite"]["classes"].values() if c["ap"] > 0]
    assert bool(hits) == (best > 0) and all(max(c["recall"]) > 0 for c in hits)

    # without --evaluate, the curves come back from the files that evaluation wrote, with the same APs
    status = main([str(runs / "ssdlite"), str(runs / "yolov2"), "--out", str(out)])
    assert status == 0
    again = json.loads((out / "pr_curves.json").read_text())
    for name in RUNS:
        assert again[name]["source"] == f"files in {out / 'evaluate' / name}"
        for class_name, curve in found[name]["classes"].items():
            assert again[name]["classes"][class_name]["ap"] == pytest.approx(curve["ap"], abs=1e-9)
            assert again[name]["classes"][class_name]["recall"] == pytest.approx(curve["recall"], abs=1e-12)


# ---- the readers, on files whose answers are known --------------------------------------------------------
def test_read_metrics_takes_the_first_best_validation_and_the_last_test(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/map,val/map_50,val/map_50_per_class/a,val/map_50_per_class/b,test/map,"
        "test/map_50\n"
        "0,9,3.0,,,,,,\n"
        "0,24,,0.10,0.30,0.2,0.4,,\n"
        "1,49,,0.20,0.50,0.6,0.4,,\n"
        "2,74,,nan,nan,,,,\n"
        "3,99,,0.30,0.50,0.9,0.1,,\n"      # equal to the best: best.ckpt keeps the first
        "4,124,,0.25,0.45,0.5,0.4,,\n"
        ",124,,,,,,0.22,0.48\n")
    facts = read_metrics(path)
    assert (facts.best_val_map_50, facts.best_val_step, facts.best_val_epoch, facts.val_map) == (0.5, 49, 1, 0.2)
    assert facts.val_curve == [(24, 0.3), (49, 0.5), (99, 0.5), (124, 0.45)]
    assert (facts.test_map_50, facts.test_map) == (0.48, 0.22)
    # no per-class test columns: the best validation's, and it says so
    assert facts.class_ap == {"a": 0.6, "b": 0.4} and facts.class_ap_from == "val step 49"
    assert (facts.last_step, facts.last_epoch) == (124, 4)


def test_read_metrics_of_a_run_without_validation(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,9,3.0\n")
    facts = read_metrics(path)
    assert facts.best_val_map_50 is None and facts.val_curve == [] and facts.class_ap == {}
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_metrics(path)


def test_read_train_log_median_rate_wall_time_and_classes(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(
        "[2026-12-04 10:00:00,250][detectors.tasks.train][INFO] - classes (label order): ['RBC', 'WBC']\n"
        "a line without a time\n"
        "[2026-12-04 10:10:00,000][detectors.callbacks.epoch_summary][INFO] - epoch 1/8 step 25: loss 32.8 "
        "(epoch mean), lr 0.000417, 200 images 1.0 img/s, epoch 373.3 s\n"
        "[2026-12-04 10:20:00,000][detectors.callbacks.epoch_summary][INFO] - epoch 2/8 step 50: loss 30.1 "
        "(epoch mean), lr 0.0005, 200 images 5.0 img/s, epoch 40.0 s; val map_50 0.1000 map 0.0500\n"
        "[2026-12-04 10:30:00,000][detectors.callbacks.epoch_summary][INFO] - epoch 3/8 step 75: loss 29.0 "
        "(epoch mean), lr 0.0005, 200 images 2.0 img/s, epoch 100.0 s\n"
        "[2026-12-04 11:01:30,750][detectors.tasks.train][INFO] - the end\n")
    facts = read_train_log(path)
    assert (facts.epochs, facts.max_epochs, facts.steps) == (3, 8, 75)
    assert facts.img_per_s == 2.0  # the median; the mean would be 2.67
    assert facts.wall_seconds == pytest.approx(3690.5)
    assert facts.classes == ["RBC", "WBC"]
    assert read_train_log(tmp_path / "missing.log").epochs is None


def test_a_time_budgeted_runs_budget_and_use_reach_the_table(tmp_path):
    """TimeBudget's last line (its format, written by the callback itself) gives the budget and the seconds
    used; the table shows them as h:mm:ss with the share used; a run without one stays blank."""
    import logging

    from detectors.callbacks.time_budget import TimeBudget
    from detectors.tasks.compare_table import MARKDOWN_COLUMNS

    budget = TimeBudget("12m", clock=lambda: 0.0)
    budget._spent_before = 698.0
    record = []
    handler = logging.Handler()
    handler.emit = lambda r: record.append(r.getMessage())
    logger = logging.getLogger("detectors.callbacks.time_budget")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        budget.on_train_end(type("T", (), {"is_global_zero": True, "global_step": 200})(), None)
    finally:
        logger.removeHandler(handler)
    path = tmp_path / "train.log"
    path.write_text(f"[2026-12-04 10:00:00,250][detectors.callbacks.time_budget][INFO] - {record[-1]}\n")
    facts = read_train_log(path)
    assert (facts.budget_seconds, facts.budget_used_seconds) == (720.0, 698.0)
    column = dict(MARKDOWN_COLUMNS)["time budget (used)"]
    assert column({"time_budget_s": 720.0, "budget_used_s": 698.0}) == "0:12:00 (97%)"
    assert column({"time_budget_s": None}) == ""


def test_find_runs_expands_a_multirun_folder_and_names_what_it_skips(tmp_path):
    for job in ("0", "1", "10"):
        (tmp_path / "sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / job / ".hydra" / "config.yaml").write_text("{}")
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}")
    (tmp_path / "sweep" / "2").mkdir()  # a job that never started
    for parent in ("a", "b"):
        (tmp_path / parent / "run" / "csv").mkdir(parents=True)
        (tmp_path / parent / "run" / "csv" / "metrics.csv").write_text("epoch,step\n")
    (tmp_path / "empty").mkdir()
    runs, skipped = find_runs([tmp_path / "sweep", tmp_path / "a" / "run", tmp_path / "b" / "run",
                               tmp_path / "sweep" / "0", tmp_path / "empty", tmp_path / "nowhere"])
    assert [r.name for r in runs] == ["sweep/0", "sweep/1", "sweep/10", "a/run", "b/run"]
    assert [Path(p).name for p, _ in skipped] == ["2", "empty", "nowhere"]
    assert "not found" in skipped[2][1] and "no numbered subfolders" in skipped[1][1]


def test_sort_puts_blanks_last_in_either_direction():
    rows = [Row(n, Path(n), {"best_val_map_50": v}) for n, v in [("a", 0.2), ("b", None), ("c", 0.5), ("d", 0.1)]]
    assert [r.name for r in sort_rows(rows, "best_val_map_50")] == ["c", "a", "d", "b"]
    assert [r.name for r in sort_rows(rows, "best_val_map_50", ascending=True)] == ["d", "a", "c", "b"]
    assert math.isclose(sort_rows(rows, "best_val_map_50")[0].values["best_val_map_50"], 0.5)


def test_curves_from_evaluation_files_give_the_hand_computed_voc_ap(tmp_path):
    """coco_ground_truth.json / coco_results.json as evaluate.py writes them (category ids of a COCO dataset,
    not 1..C): 'cat' ranks TP, FP, TP over 2 GT (recall .5 .5 1, precision 1 .5 .67: AP .5 + .5 * 2/3);
    'dog' ranks an FP in an image without dogs, then its one TP (AP .5)."""
    gt = {"images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
          "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 20, 20], "area": 400,
                           "iscrowd": 0},
                          {"id": 3, "image_id": 1, "category_id": 3, "bbox": [20, 0, 10, 30], "area": 300,
                           "iscrowd": 0}]}
    results = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 1, "category_id": 7, "bbox": [80, 0, 10, 10], "score": 0.8},
               {"image_id": 1, "category_id": 7, "bbox": [51, 50, 20, 20], "score": 0.7},
               {"image_id": 2, "category_id": 3, "bbox": [20, 0, 10, 30], "score": 0.95},
               {"image_id": 1, "category_id": 3, "bbox": [20, 1, 10, 30], "score": 0.5}]
    assert curves_from_files(tmp_path) is None
    (tmp_path / "coco_ground_truth.json").write_text(json.dumps(gt))
    (tmp_path / "coco_results.json").write_text(json.dumps(results))
    found = curves_from_files(tmp_path)
    assert list(found.curves) == ["cat", "dog"]
    cat, dog = found.curves["cat"], found.curves["dog"]
    assert cat["recall"].tolist() == [0.5, 0.5, 1.0] and cat["num_gt"] == 2
    assert cat["precision"].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert cat["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert dog["ap"] == pytest.approx(0.5, abs=1e-12) and dog["recall"].tolist() == [0.0, 1.0]


def test_evaluation_split_is_test_where_the_data_has_one():
    from omegaconf import OmegaConf

    assert evaluation_split(OmegaConf.create({"data": {"splits": {"train": "a", "val": "b", "test": "c"}}})) == "test"
    assert evaluation_split(OmegaConf.create({"data": {"splits": {"train": "a", "val": "b"}}})) == "val"
    assert evaluation_split(OmegaConf.create({"data": {"source": {"sizes": {"train": 2, "val": 2}}}})) == "val"
    assert evaluation_split(OmegaConf.create({"data": {"source": {"sizes": {"train": 2, "test": 2}}}})) == "test"


@pytest.mark.slow
def test_train_with_test_writes_evaluates_files_of_the_test_split(runs):
    """train.py test=true leaves evaluate.py's files of the test split in RUN/test/ (where the trackers find its
    pictures): the confusion matrix's ground-truth rows hold every scored ground truth of the written GT file."""
    folder = runs / "yolov2" / "test"
    for name in ("confusion_matrix.png", "threshold_curves.png", "error_breakdown.csv", "samples.png"):
        assert (folder / name).is_file(), name
    truth = json.loads((folder / "coco_ground_truth.json").read_text())
    scored = sum(1 for a in truth["annotations"] if not a.get("iscrowd") and not a.get("ignore"))
    rows = [r for r in csv_rows(folder / "confusion_matrix.csv") if r[next(iter(r))] != "background"]
    assert scored > 0 and sum(int(float(v)) for r in rows for k, v in list(r.items())[1:]) == scored
