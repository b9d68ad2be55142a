"""``ckpt_path=auto`` resumes the newest last.ckpt that a run of the same configuration wrote: fake
checkpoints (the run config as train.py stores it, a state dict) in run folders of chosen ages."""

import logging
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import detectors  # noqa: F401  (resolvers)
from detectors.checkpoints import check_optimizer_fits, config_differences, find_resumable_checkpoint
from detectors.tasks.train import resolve_ckpt_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(tmp_path: Path, *overrides: str, output: str = "now"):
    """The resolved config of ``train.py OVERRIDES`` (after the data module filled in the classes)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.log_dir={tmp_path / 'logs'}", "data.classes=[a,b,c]",
                                          f"paths.output_dir={tmp_path / 'logs' / 'train' / 'runs' / output}",
                                          *overrides])
    return cfg


def write_run(tmp_path: Path, name: str, age_s: float, cfg=None, ckpt: dict | None = None) -> Path:
    """``logs/train/runs/NAME/checkpoints/last.ckpt`` written ``age_s`` seconds ago by a run of ``cfg``
    (or holding ``ckpt`` as it is)."""
    path = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    if cfg is not None:
        ckpt = {"state_dict": {"detector.w": torch.zeros(2)}, "epoch": 0, "global_step": 4,
                "hyper_parameters": {"run_config": OmegaConf.to_yaml(cfg, resolve=True)}}
    torch.save(ckpt, path)
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "logs" / "train" / "runs"


def resolve(cfg, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detectors.tasks.train"):
        found = resolve_ckpt_path(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "detectors.tasks.train"]
    assert len(lines) == 1, lines  # one log line says what auto did
    return found, lines[0]


def test_the_newest_run_of_another_configuration_is_skipped_for_the_newest_matching_one(tmp_path, runs, caplog):
    now = config(tmp_path, "ckpt_path=auto")
    oldest = write_run(tmp_path, "a_oldest", 300, config(tmp_path, output="a_oldest"))
    middle = write_run(tmp_path, "b_middle", 200, config(tmp_path, output="b_middle"))
    write_run(tmp_path, "c_newest", 100, config(tmp_path, "backbone=darknet53", output="c_newest"))

    found, line = resolve(now, caplog)
    assert found == str(middle) != str(oldest)  # the newest matching one, not the oldest
    assert f"resuming from {middle}" in line
    assert str(runs / "c_newest" / "checkpoints" / "last.ckpt") in line
    assert "backbone._target_: detectors.backbones.darknet.DarkNet53 vs detectors.backbones.vgg.VGG16" in line

    path, refused = find_resumable_checkpoint(runs, now)
    assert path == middle and [p for p, _ in refused] == [runs / "c_newest" / "checkpoints" / "last.ckpt"]


def test_paths_epochs_logging_and_loading_settings_do_not_block_a_resume(tmp_path, runs, caplog):
    earlier = config(tmp_path, "trainer.max_epochs=1", "logger=tensorboard", "callbacks=none",
                     "data.num_workers=0", "data.eval_batch_size=3", "trainer.accelerator=cpu",
                     "trainer.log_every_n_steps=1", "ckpt_path=null", "test=true", "model.compile=true",
                     output="earlier")
    last = write_run(tmp_path, "earlier", 100, earlier)
    now = config(tmp_path, "ckpt_path=auto", "trainer.max_epochs=5")
    assert config_differences(OmegaConf.create(OmegaConf.to_yaml(earlier, resolve=True)), now) == []
    found, line = resolve(now, caplog)
    assert found == str(last) and line == f"ckpt_path=auto: resuming from {last}"


@pytest.mark.parametrize("override,key", [
    ("backbone=darknet53", "backbone._target_"),
    # the first three differences are shown, in key order: SSDLite's 320 px (data.source.image_size, data.input_size,
    # data.train_input_size) before its backbone
    ("model=ssdlite", "data.input_size"),
    ("optimizer=adamw", "optimizer._target_"),
    ("optimizer.lr=0.02", "optimizer.lr"),
    ("data.classes=[a,b]", "data.classes"),
    ("input_size=[320,320]", "data.input_size"),
    ("data.batch_size=4", "data.batch_size"),
    ("seed=7", "seed"),
    ("head.neg_pos_ratio=2", "head.neg_pos_ratio"),
    ("trainer.precision=bf16-mixed", "trainer.precision"),
    ("time_budget=20m", "time_budget"),  # the budget is part of the configuration (issue 26)
])
def test_a_setting_that_makes_the_run_blocks_the_resume(tmp_path, runs, caplog, override, key):
    write_run(tmp_path, "other", 100, config(tmp_path, override, output="other"))
    now = config(tmp_path, "ckpt_path=auto")
    found, line = resolve(now, caplog)
    assert found is None
    assert "starting fresh" in line and str(runs / "other" / "checkpoints" / "last.ckpt") in line
    assert f"{key}" in line.split("(key: checkpoint's vs this run's):", 1)[1], line


def test_when_none_matches_one_line_names_each_checkpoint_and_its_first_differences(tmp_path, runs, caplog):
    a = write_run(tmp_path, "a", 300, config(tmp_path, "optimizer.lr=0.5", output="a"))
    b = write_run(tmp_path, "b", 200, config(tmp_path, "seed=1", "head.iou_threshold=0.6", output="b"))
    c = write_run(tmp_path, "c", 100, ckpt={"state_dict": {}})  # not one of train.py's
    (runs / "d" / "checkpoints").mkdir(parents=True)
    (runs / "d" / "checkpoints" / "last.ckpt").write_bytes(b"half a file")
    found, line = resolve(config(tmp_path, "ckpt_path=auto"), caplog)
    assert found is None
    assert line.startswith("ckpt_path=auto: no last.ckpt of this configuration, starting fresh; refused")
    # newest first; three shown, the fourth counted
    shown = [part.split(" (", 1)[0] for part in line.split("): ", 1)[1].split(" | ")]
    assert shown == [str(runs / "d" / "checkpoints" / "last.ckpt"), str(c), str(b), "and 1 more"]
    assert "not a readable checkpoint" in line and "no run config of train.py in it" in line
    assert "seed: 1 vs 42" in line and "head.iou_threshold: 0.6 vs 0.5" in line
    assert str(a) not in line

    path, refused = find_resumable_checkpoint(runs, config(tmp_path))
    assert path is None and [p for p, _ in refused] == [runs / "d" / "checkpoints" / "last.ckpt", c, b, a]
    assert refused[3][1].startswith(f"optimizer.lr: 0.5 vs {config(tmp_path).optimizer.lr}")


def test_the_reasons_are_the_first_few_differing_keys_with_both_values(tmp_path):
    stored = OmegaConf.create({"model": {"a": 1, "b": [1, 2], "c": "x"}, "seed": 1, "paths": {"log_dir": "p"}})
    current = OmegaConf.create({"model": {"a": 1, "b": [1, 3], "d": 2}, "seed": 1, "paths": {"log_dir": "q"}})
    assert config_differences(stored, current) == [
        "model.b: [1, 2] vs [1, 3]", "model.d: <absent> vs 2", "model.c: x vs <absent>"]
    write_run(tmp_path, "r", 10, ckpt={"state_dict": {}, "hyper_parameters": {"run_config": OmegaConf.to_yaml(stored)}})
    path, refused = find_resumable_checkpoint(tmp_path / "logs" / "train" / "runs", current, max_reasons=2)
    assert path is None and refused[0][1] == "model.b: [1, 2] vs [1, 3]; model.d: <absent> vs 2; 1 more"


def test_no_checkpoint_starts_fresh_and_a_given_path_is_kept(tmp_path, caplog):
    found, line = resolve(config(tmp_path, "ckpt_path=auto"), caplog)
    assert found is None and line == "ckpt_path=auto: no last.ckpt found, starting fresh"
    assert resolve_ckpt_path(config(tmp_path, "ckpt_path=/some/file.ckpt")) == "/some/file.ckpt"
    assert resolve_ckpt_path(config(tmp_path)) is None


def test_a_stored_config_that_no_longer_resolves_is_refused_with_the_reason(tmp_path, runs):
    write_run(tmp_path, "old", 10, ckpt={"state_dict": {}, "hyper_parameters": {
        "run_config": "model: ${oc.env:DETECTORS_TEST_UNSET_VARIABLE}\n"}})
    path, refused = find_resumable_checkpoint(runs, config(tmp_path))
    assert path is None and len(refused) == 1
    assert refused[0][1].startswith("its run config does not resolve") and "\n" not in refused[0][1]


def test_resuming_into_another_optimizer_is_refused_in_one_line_naming_the_checkpoints(tmp_path, monkeypatch):
    """An SGD checkpoint resumed where the config builds AdamW (model=ssd300 on a CPU, optimizer=auto) would
    fail at its first step (no AdamW moments in SGD's state): refused at start, with the override that fits."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resolved = lambda *o: OmegaConf.create(OmegaConf.to_yaml(config(tmp_path, *o), resolve=True))  # noqa: E731
    sgd_run, cpu_default = resolved("optimizer=sgd"), config(tmp_path)
    with pytest.raises(ValueError, match=r"trained with SGD, this run's optimizer is AdamW.*\(optimizer=sgd\)"):
        check_optimizer_fits(sgd_run, cpu_default, "a.ckpt")
    check_optimizer_fits(sgd_run, config(tmp_path, "optimizer=sgd"), "a.ckpt")  # the same optimizer: resumes
    check_optimizer_fits(resolved(), cpu_default, "a.ckpt")  # auto's AdamW and auto's AdamW
    check_optimizer_fits(resolved("optimizer=adamw"), cpu_default, "a.ckpt")  # AdamW by either option
    with pytest.raises(ValueError, match=r"\(optimizer=adamw\)"):
        check_optimizer_fits(resolved(), config(tmp_path, "optimizer=sgd"), "a.ckpt")
