"""What ``python train.py`` does: build data, model, trainer from the config; fit; test; return the metric."""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from detectors.callbacks.time_budget import BudgetTooShort, TimeBudget
from detectors.callbacks.tracker_pictures import tracker_callbacks
from detectors.checkpoints import check_fits, check_optimizer_fits, find_resumable_checkpoint, load_checkpoint
from detectors.evaluation.report import format_report
from detectors.init_from import check_init_from, init_from_checkpoint, keep_init_from_of
from detectors.noise import silence_known_noise
from detectors.trackers import TrackerUnavailable

log = logging.getLogger(__name__)


def _overridden_on_command_line(group: str) -> bool:
    """Whether this run's command line sets ``group`` or one of its keys (False outside a Hydra run)."""
    if not HydraConfig.initialized():
        return False
    names = [o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]
    return any(n == group or n.startswith(group + ".") or n.startswith(group + "@") for n in names)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """Instantiate ``cfg.data`` and write the class names it found back into ``cfg.data.classes``."""
    datamodule = hydra.utils.instantiate(cfg.data)
    chosen, applied = cfg.get("augment", {}).get("preset"), cfg.data.get("augment", {}).get("preset")
    if chosen is not None and applied is not None and chosen != applied:
        # the built-in shapes on a CPU train unaugmented (configs/data/shapes.yaml): say so, never silently; a
        # warning where the user asked for the augmentation, a line of the log where the model config chose it
        # (the default run: nothing for its user to act on)
        level = logging.WARNING if _overridden_on_command_line("augment") else logging.INFO
        log.log(level, "augmentation: %s, not augment=%s: this data config sets its own (data.augment=${augment} "
                "applies augment=%s)", applied, chosen, chosen)
    with open_dict(cfg):
        cfg.data.classes = list(datamodule.classes)
    log.info("classes (label order): %s", list(datamodule.classes))
    return datamodule


def instantiate_dict(section: DictConfig | None) -> list:
    """Instantiate every entry with a _target_ of a callbacks/logger section."""
    if not section:
        return []
    for entry in section.values():
        target = entry.get("_target_", "") if isinstance(entry, DictConfig) else ""
        if target == "lightning.pytorch.callbacks.EMAWeightAveraging" and not hasattr(L.pytorch.callbacks, "EMAWeightAveraging"):
            raise ValueError(f"callbacks=ema needs lightning>=2.6 (EMAWeightAveraging); installed: {L.__version__}")
    return [hydra.utils.instantiate(c) for c in section.values() if isinstance(c, DictConfig) and "_target_" in c]


# loggers that drop what an interrupted run logged after its checkpoint, given ``purge_step``
PURGING_LOGGERS = ("detectors.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger")


def instantiate_loggers(section: DictConfig | None, purge_step: int | None) -> list:
    """The ``logger`` section's loggers; resuming (``purge_step`` set), the CSV and TensorBoard ones
    continue the run's logs from that step."""
    if not section:
        return []
    loggers = []
    for c in section.values():
        if isinstance(c, DictConfig) and "_target_" in c:
            purging = purge_step is not None and c._target_ in PURGING_LOGGERS
            try:
                loggers.append(hydra.utils.instantiate(c, **({"purge_step": purge_step} if purging else {})))
            except InstantiationException as e:  # a tracker's package missing: its one line, not Hydra's wrapper
                if isinstance(e.__cause__, TrackerUnavailable):
                    raise e.__cause__ from None
                raise
    return loggers


def continue_run_folder(cfg: DictConfig, ckpt_path: str | Path) -> bool:
    """Resuming from ``RUN/checkpoints/*.ckpt`` of a train.py run folder, the run goes on in RUN:
    checkpoints (best.ckpt keeps competing with the earlier epochs'), CSV and TensorBoard logs and the
    text log continue there. This invocation's own Hydra folder keeps its config and log. Returns
    whether the run folder changed; a checkpoint outside a run folder starts a new one."""
    ckpt = Path(ckpt_path).resolve()
    run_dir = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not (run_dir / ".hydra").is_dir():
        log.warning("%s is not in a run folder of train.py: this run logs to a new folder", ckpt)
        return False
    if run_dir == Path(cfg.paths.output_dir).resolve():
        return False
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    # the rest of this invocation's text log goes to the run's train.log too
    formatter = next((h.formatter for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
    handler = logging.FileHandler(run_dir / "train.log")
    if formatter is not None:
        handler.setFormatter(formatter)
    logging.getLogger().addHandler(handler)
    log.info("resuming in the run folder %s (this invocation's config: %s)", run_dir,
             HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "-")
    return True


def write_git_state(run_dir: str | Path, suffix: str = "") -> None:
    """Record the code a run used (commit and uncommitted changes) beside Hydra's config dump;
    ``suffix`` tells the files of a resumed part of the run apart."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return
    if commit.returncode == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"git_commit{suffix}.txt").write_text(commit.stdout)
        if diff.stdout:
            (Path(run_dir) / f"git_diff{suffix}.patch").write_text(diff.stdout)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: None, a file, or 'auto' = the newest last.ckpt of this task's run folders that a
    run of this configuration wrote (``detectors.checkpoints.RESUME_IGNORED_KEYS``: what may differ)."""
    path = cfg.get("ckpt_path")
    if path != "auto":
        return path
    found, refused = find_resumable_checkpoint(Path(cfg.paths.log_dir) / cfg.task_name / "runs", cfg)
    shown = 3
    why = " | ".join(f"{p} ({reason})" for p, reason in refused[:shown])
    why += f" | and {len(refused) - shown} more" if len(refused) > shown else ""
    if found:
        log.info("ckpt_path=auto: resuming from %s%s", found,
                 f" (newer ones skipped: {why})" if refused else "")
    elif refused:
        log.warning("ckpt_path=auto: no last.ckpt of this configuration, starting fresh; refused "
                    "(key: checkpoint's vs this run's): %s", why)
    else:
        log.info("ckpt_path=auto: no last.ckpt found, starting fresh")
    return str(found) if found else None


def run_trial(cfg: DictConfig) -> float | None:
    """``train`` as a sweep trial: in a multirun (-m) a failing or diverging trial is logged and
    returns NaN (a failed trial for Optuna) instead of ending the whole sweep."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:
        try:
            return train(cfg)
        except (BudgetTooShort, TrackerUnavailable) as e:  # one line (the minimum; the extra to install)
            log.error("%s", e)
            raise SystemExit(2) from None
    try:
        metric = train(cfg)
    except Exception:  # noqa: BLE001 (any failure of one trial)
        log.exception("trial failed (the sweep goes on): %s", HydraConfig.get().job.override_dirname)
        return float("nan")
    if metric is None or not math.isfinite(metric):
        log.warning("trial gave no finite %s: recorded as failed", cfg.get("optimized_metric"))
        return float("nan")
    return metric


def test_writer(cfg: DictConfig, datamodule: L.LightningDataModule, model: L.LightningModule, best: str) -> L.Callback:
    """The callback that writes evaluate.py's files of the test split (results, PR curves, confusion matrix,
    threshold curves, error breakdown, ranked images) into the run folder's ``test/``, where the trackers find
    them; the operating threshold is the best checkpoint's best-F1 threshold, as evaluate.py's."""
    from detectors.tasks.evaluate import build_writer

    checkpoint = load_checkpoint(best)[0] if best else None
    where = OmegaConf.create({"split": "test", "paths": {"output_dir": str(Path(cfg.paths.output_dir) / "test")}})
    return build_writer(where, datamodule, len(model.class_names), checkpoint)


def train(cfg: DictConfig) -> float | None:
    """Fit (and optionally test) the configured model; returns ``cfg.optimized_metric`` for sweeps."""
    silence_known_noise()
    # first: the budget counts from here (the data and the model's build, the sanity check, every step)
    budget = TimeBudget(cfg.time_budget) if cfg.get("time_budget") else None
    L.seed_everything(cfg.seed, workers=True)
    check_init_from(cfg)  # before anything is built: init_from with a ckpt_path file is refused
    datamodule = build_datamodule(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    checkpoint, resume_step, continued = None, None, False
    if ckpt_path:
        checkpoint, stored_run = load_checkpoint(ckpt_path)
        keep_init_from_of(stored_run, cfg)
        check_optimizer_fits(stored_run, cfg, ckpt_path)
        resume_step = int(checkpoint.get("global_step", 0))
        if cfg.get("resume_in_run_folder", True):
            continued = continue_run_folder(cfg, ckpt_path)
    model = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    if checkpoint is not None:
        # a clear message now instead of Lightning's key-by-key error after the trainer started
        check_fits(model, checkpoint["state_dict"], ckpt_path)
        del checkpoint
    elif cfg.get("init_from"):
        # after the build: the backbone's `weights` download does not overwrite what init_from loads
        init_from_checkpoint(model, cfg.init_from)
    # resuming, what the interrupted run logged after its checkpoint's step is dropped from the logs
    loggers = instantiate_loggers(cfg.get("logger"), None if resume_step is None else resume_step + 1)
    # MLflow, W&B, TensorBoard get the config and the pictures the run writes (detectors/callbacks/tracker_pictures.py)
    trackers = tracker_callbacks(loggers, cfg.paths.output_dir, OmegaConf.to_container(cfg, resolve=True))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")) + ([budget] if budget else []) + trackers,
        logger=loggers or False
    )
    log.info("run folder: %s", cfg.paths.output_dir)
    write_git_state(cfg.paths.output_dir, suffix=f".resumed_at_step_{resume_step}" if continued else "")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    skipped = getattr(datamodule.source, "skips", None)
    if skipped is not None and skipped.counts:
        log.warning("annotations skipped while loading: %s", skipped.summary())
    if getattr(model, "last_metrics", None) and not trainer.fast_dev_run:
        print(format_report(model.last_metrics, model.class_names, title="validation (last epoch)"))

    metric = trainer.callback_metrics.get(cfg.get("optimized_metric", ""))
    if cfg.get("test") and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.callbacks.append(test_writer(cfg, datamodule, model, best))
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        print(format_report(model.last_metrics, model.class_names, title=f"test ({best or 'last weights'})"))
        log.info("the test split's evaluation files (as evaluate.py's): %s", Path(cfg.paths.output_dir) / "test")
    return float(metric) if isinstance(metric, torch.Tensor) else None
