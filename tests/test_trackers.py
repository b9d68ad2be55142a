"""Experiment trackers (logger=mlflow, logger=wandb): what a run hands them, read back with MLflow's own client and
from W&B's offline run directory; the picture hand-off and the one-line error without the package."""

import csv
import json
import os
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf
from test_train_e2e import SMALL_MODEL, TINY, run
from torchvision.io import decode_png, read_image, write_png

from detectors.callbacks.tracker_pictures import TrackerPictures
from detectors.loggers import CSVLogger
from detectors.tasks.train import instantiate_loggers
from detectors.trackers import (
    TrackerUnavailable,
    flatten,
    log_pictures,
    run_name,
    wandb_logged_in,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def picture(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.full((3, 4, 5), value, dtype=torch.uint8), str(path))
    return path


def fake_trackers():
    """An MLflow and a W&B logger as Lightning's classes (isinstance holds), recording their calls."""
    mlflow, wandb = MagicMock(spec=MLFlowLogger), MagicMock(spec=WandbLogger)
    mlflow.run_id = "RUN"
    return mlflow, wandb


def test_pictures_reach_mlflow_as_artifacts_wandb_and_tensorboard_as_images_and_csv_is_skipped(tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tensorboard' extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlflow, wandb = fake_trackers()
    csv_logger = CSVLogger(tmp_path)
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version="")
    a, b = picture(tmp_path / "train_batch0.jpg", 200), picture(tmp_path / "pr_curves" / "pr_curve_cat.png", 30)
    grid = torch.zeros(3, 6, 8, dtype=torch.uint8)
    handed = log_pictures([csv_logger, mlflow, wandb, tensorboard],
                          {"train_batch0.jpg": a, "pr_curves/pr_curve_cat.png": b, "val/samples": grid}, step=7)
    assert handed == 9  # 3 pictures x 3 trackers, none to the CSV logger
    tensorboard.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("pr_curves/pr_curve_cat")
    assert logged.step == 7
    assert torch.equal(decode_png(torch.frombuffer(bytearray(logged.encoded_image_string), dtype=torch.uint8)),
                       read_image(str(b)))
    artifacts = [(c.args, c.kwargs) for c in mlflow.experiment.log_artifact.call_args_list]
    assert artifacts == [(("RUN", str(a)), {"artifact_path": None}), (("RUN", str(b)), {"artifact_path": "pr_curves"})]
    (image_call,) = mlflow.experiment.log_image.call_args_list
    assert image_call.args[0] == "RUN" and image_call.args[1].shape == (6, 8, 3)
    assert image_call.kwargs == {"artifact_file": "val/samples_step000007.png"}
    keys = [(c.kwargs["key"], c.kwargs["step"]) for c in wandb.log_image.call_args_list]
    assert keys == [("train_batch0", 7), ("pr_curves/pr_curve_cat", 7), ("val/samples", 7)]
    assert wandb.log_image.call_args_list[0].kwargs["images"] == [str(a)]


def test_the_callback_hands_over_each_new_or_rewritten_picture_once_and_not_the_trackers_own(tmp_path):
    mlflow, wandb = fake_trackers()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[mlflow, wandb], global_step=3)
    keep = [picture(tmp_path / "train_batch0.jpg"), picture(tmp_path / "pr_curves" / "pr_curve_cat.png")]
    picture(tmp_path / "wandb" / "offline-run-x" / "files" / "media" / "images" / "train_batch0_1.png")  # W&B's copy
    picture(tmp_path / "checkpoints" / "x.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    callback = TrackerPictures(tmp_path)

    def artifacts():
        return [c.args[1] for c in mlflow.experiment.log_artifact.call_args_list]

    callback.hand_over_new_pictures(trainer)
    assert artifacts() == [str(p) for p in sorted(keep)]
    callback.hand_over_new_pictures(trainer)  # nothing new
    assert len(artifacts()) == 2 and wandb.log_image.call_count == 2
    later = keep[0].stat().st_mtime_ns + 10**9
    os.utime(keep[0], ns=(later, later))  # rewritten (an evaluation plot of the next validation)
    callback.hand_over_new_pictures(trainer)
    assert artifacts()[2:] == [str(keep[0])]


def test_flattened_config_run_names_and_the_wandb_login_check(tmp_path, monkeypatch):
    assert flatten({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 1, "empty": {}}) == {
        "optimizer/lr": 0.1, "optimizer/betas": [0.9, 0.99], "seed": 1, "empty": {}}
    logs = tmp_path / "logs"
    assert run_name(logs / "train" / "runs" / "2026-01-02_10-00-00", logs) == "train/runs/2026-01-02_10-00-00"
    assert run_name(tmp_path / "elsewhere" / "r1", logs) == "r1"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine example.com login u password p\n")
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_logged_in()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_logged_in()


@pytest.mark.parametrize("kind,package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(kind, package, tmp_path, monkeypatch):
    target = OmegaConf.load(CONFIGS / "logger" / f"{kind}.yaml")[kind]._target_
    section = OmegaConf.create({kind: {"_target_": target, "run_dir": str(tmp_path), "log_dir": str(tmp_path),
                                       **({"tracking_uri": f"sqlite:///{tmp_path}/m.db", "experiment_name": "e"}
                                          if kind == "mlflow" else {"project": "p"})}})
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(TrackerUnavailable) as error:
        instantiate_loggers(section, None)
    message = str(error.value)
    assert "\n" not in message and f"logger={kind}" in message and 'pip install -e ".[trackers]"' in message


# ---------------------------------------------------------------------------------------------------------------
# the whole path: train.py with the CSV, MLflow and W&B loggers at once, each tracker read back with its own tools


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB's log format: 32 KiB blocks, each record or piece of
    one behind a 7-byte header: CRC32C, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; W&B's own 7-byte file
    header first). wandb 0.31 ships no reader of its own in Python."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at a block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_a_run_logs_config_metrics_and_pictures_to_mlflow_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the trackers extra is not installed")
    pytest.importorskip("wandb", reason="the trackers extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline whoever runs the test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    logs = tmp_path / "logs"
    folder = logs / "train" / "runs" / "r1"
    run("train.py", "logger=[csv,mlflow,wandb]", f"paths.log_dir={logs}", f"hydra.run.dir={folder}",
        "trainer.max_epochs=1", "optimizer.lr=0.0123", "+trainer.num_sanity_val_steps=0",
        "callbacks.model_summary=null", *SMALL_MODEL, *TINY)
    rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
    csv_map50 = [float(r["val/map_50"]) for r in rows if r.get("val/map_50")][-1]

    # MLflow: the default store, SQLite under the logs folder, read back with MLflow's client
    client = MlflowClient(f"sqlite:///{logs}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("train/ssdlite")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "train/runs/r1" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["optimizer/lr"] == "0.0123" and params["data/batch_size"] == "2"
    assert params["model/detector/head/_target_"] == "detectors.heads.ssd.SSDHead"
    assert found.data.metrics["val/map_50"] == pytest.approx(csv_map50, abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(found.info.run_id, "val")}
    assert {"train_batch0.jpg", "train_batch1.jpg"} <= artifacts
    assert any(a.startswith("val/samples_step") for a in artifacts)
    artifact_dir = Path(client.download_artifacts(found.info.run_id, "train_batch0.jpg", str(tmp_path / "dl")))
    assert artifact_dir.read_bytes() == (folder / "train_batch0.jpg").read_bytes()

    # W&B: the offline run directory in the run folder
    (offline,) = (folder / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(offline.glob("*.wandb"))))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == "train/runs/r1" and run_record.project == "detectors"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.config.update})
    assert config["optimizer"]["lr"] == 0.0123 and config["data"]["batch_size"] == 2
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    map50 = [json.loads(h["val/map_50"]) for h in history if "val/map_50" in h]
    assert map50 and map50[-1] == pytest.approx(csv_map50, abs=1e-6)
    (logged,) = [h for h in history if "train_batch0/filenames" in h]
    (saved,) = json.loads(logged["train_batch0/filenames"])
    assert (offline / "files" / saved).read_bytes() == (folder / "train_batch0.jpg").read_bytes()
    assert any("val/samples/filenames" in h for h in history)
    assert any((offline / "files" / "media" / "images" / "val").glob("samples_*.png"))
