"""Finding, reading and checking checkpoints of this framework, with clear messages for wrong files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """Load a Lightning checkpoint written by train.py and the run config stored in it.

    Loads with ``weights_only=True``: a checkpoint cannot run code when loaded. Anything else (a
    corrupt file, another program's checkpoint) raises ValueError saying what it is.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean: not a checkpoint we can read
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    run = OmegaConf.create(config) if isinstance(config, str) else None
    if run is None or "model" not in run or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint written by detectors' train.py (no run config in it)")
    return ckpt, run


def check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise a one-line ValueError when ``state_dict`` was not made by a model like ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        detail = (f"{first}: {tuple(state_dict[first].shape)} in the checkpoint, {tuple(own[first].shape)} here"
                  if reshaped else first)
        raise ValueError(
            f"checkpoint {path} was made by another model: {len(reshaped)} tensors of other shapes, "
            f"{len(missing)} missing, {len(unexpected)} unexpected (first: {detail}). "
            "Use the model, backbone and data (class count) it was trained with."
        )


def optimizer_class(optimizer_cfg) -> type | None:
    """The optimizer class a run's ``optimizer`` config (``_partial_``) builds, found by building it over one
    parameter: a factory such as optimizer=auto's ``sgd_or_adamw`` tells only then. None when it cannot be
    built here (a class this install lacks)."""
    import hydra  # here: train.py's resume logic reads this module, and most callers never build an optimizer

    try:
        return type(hydra.utils.instantiate(optimizer_cfg)([torch.nn.Parameter(torch.zeros(1))]))
    except Exception:  # noqa: BLE001 (no verdict without the class: the resume goes on as before)
        return None


def check_optimizer_fits(run: DictConfig, cfg: DictConfig, path: str | Path) -> None:
    """Raise a one-line ValueError when resuming ``path`` (run config ``run``) would load its optimizer
    state into another optimizer (SGD's momentum buffers into AdamW: a KeyError at the first step)."""
    stored, current = (optimizer_class(OmegaConf.select(c, "model.optimizer", default=None) or {}) for c in (run, cfg))
    if stored and current and stored is not current:
        option = {torch.optim.SGD: "sgd", torch.optim.AdamW: "adamw"}.get(stored)
        hint = f"optimizer={option}" if option else f"optimizer._target_={stored.__module__}.{stored.__qualname__}"
        raise ValueError(
            f"checkpoint {path} was trained with {stored.__name__}, this run's optimizer is {current.__name__}: its "
            f"optimizer state cannot go on in another optimizer. Resume with the checkpoint's ({hint}), or start a "
            "new run.")


def build_model(run: DictConfig, path: str | Path) -> nn.Module:
    """The DetectionModule a run config describes, freshly initialised, with nothing downloaded: the
    backbone's ``weights`` are set to null in ``run`` first (a checkpoint holds them; a count of
    parameters or FLOPs does not need them). ``run`` may carry the caller's changes: its YAML becomes the
    module's ``run_config``. A config this version cannot build raises a one-line ValueError naming ``path``,
    where the config came from."""
    import hydra  # here: checkpoints.py is also read by train.py's resume logic, which needs no instantiation

    with open_dict(run):
        run.backbone.weights = None
        run.model.detector.backbone.weights = None
    try:
        return hydra.utils.instantiate(run.model, run_config=OmegaConf.to_yaml(run))
    except Exception as e:  # noqa: BLE001 (any config this code cannot build)
        cause = e.__cause__ or e  # Hydra's InstantiationException says where; its cause says what
        raise ValueError(
            f"the model stored in {path} cannot be built by this version of detectors "
            f"({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}); a run configured by an older "
            "version (e.g. neck/head configs with channel lists, from before the backbone contract) needs the "
            "version that wrote it"
        ) from None


def restore_model(ckpt: dict, run: DictConfig, path: str | Path) -> nn.Module:
    """The DetectionModule a checkpoint's run config describes, with the checkpoint's weights.

    ``ckpt`` and ``run`` as :func:`load_checkpoint` returns them (``run`` may carry the caller's changes:
    its YAML becomes the module's ``run_config``). The backbone's ``weights`` are set to null in ``run``
    first: the checkpoint holds them, and nothing is downloaded. A config this version cannot build, or
    tensors that do not fit, raise a one-line ValueError.
    """
    model = build_model(run, path)
    check_fits(model, ckpt["state_dict"], path)
    model.load_state_dict(ckpt["state_dict"])
    log.info("weights loaded from %s (the backbone's initialisation above is replaced)", path)
    return model


def last_checkpoints(runs_dir: str | Path) -> list[Path]:
    """Every ``*/checkpoints/last.ckpt`` of ``runs_dir``, newest first."""
    return sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)


# Keys of the resolved run config (dotted prefixes) that may differ between a run and the run that resumes
# it (``ckpt_path=auto``): where files go, how long to train (extending a run is why one resumes), what
# is logged and checked, how fast data loads and the network runs. Everything else makes the run: model
# parts, losses, data (root, splits, sizes, classes, batch size, augmentation), input size, optimizer,
# schedule, mixup, multi-scale, precision, devices, gradient clipping, and the seed: runs that differ
# only in it are replicas of one experiment (a resumed run takes its RNG state from the checkpoint).
# data.train_input_size is compared too: the configs derive it from input_size and multiscale.sizes, so
# then it only repeats a difference those keys show, but set by hand it changes what the network trains
# on (and a checkpoint from before the key was added trained multi-scale on enlarged images).
RESUME_IGNORED_KEYS = (
    "ckpt_path", "resume_in_run_folder", "test", "optimized_metric", "task_name", "paths", "hydra",
    "logger", "callbacks",
    "trainer.max_epochs", "trainer.min_epochs", "trainer.max_steps", "trainer.min_steps", "trainer.max_time",
    "trainer.default_root_dir", "trainer.accelerator", "trainer.benchmark", "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch", "trainer.val_check_interval", "trainer.limit_val_batches",
    "trainer.limit_test_batches", "trainer.num_sanity_val_steps", "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.num_workers", "data.pin_memory", "data.eval_batch_size", "data.cache",
    "model.compile", "model.channels_last",
)

ABSENT = "<absent>"
# Keys added after checkpoints were written, whose null is what their absence meant: an older checkpoint's run
# config without them matches a run that leaves them null. init_from is compared (where a run's weights started
# makes the run: ckpt_path=auto with init_from=X resumes only a run started from X), so a null one must match; so
# is time_budget (the budget is part of the configuration).
NULL_WHEN_ABSENT = ("init_from", "time_budget")


def _leaves(node, prefix: str = "") -> dict[str, object]:
    """``{dotted.key: value}`` of a plain config; lists are values."""
    if not isinstance(node, dict):
        return {prefix: node}
    if not node:
        return {prefix: {}} if prefix else {}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _ignored(key: str, ignored: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in ignored)


def _short(value: object, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_leaves(config: DictConfig | dict) -> dict[str, object]:
    """The resolved leaves of a config, through YAML as a checkpoint's copy went (so both read alike)."""
    config = config if isinstance(config, DictConfig) else OmegaConf.create(config)
    return _leaves(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(config, resolve=True)), resolve=True))


def _differences(old: dict[str, object], new: dict[str, object], ignored: tuple[str, ...]) -> list[str]:
    keys = list(new) + [k for k in old if k not in new]

    def value(config: dict[str, object], key: str) -> object:
        return config.get(key, None if key in NULL_WHEN_ABSENT else ABSENT)

    return [f"{k}: {_short(value(old, k))} vs {_short(value(new, k))}"
            for k in keys if not _ignored(k, ignored) and value(old, k) != value(new, k)]


def config_differences(stored: DictConfig | dict, current: DictConfig | dict,
                       ignored: tuple[str, ...] = RESUME_IGNORED_KEYS) -> list[str]:
    """``key: stored vs current`` for each setting in which a checkpoint's run config and this run's
    differ (both resolved; keys under ``ignored`` left out), in this run's key order."""
    return _differences(_plain_leaves(stored), _plain_leaves(current), ignored)


def read_run_config(path: str | Path) -> DictConfig:
    """The run config stored in a checkpoint of train.py, without reading its tensors (memory-mapped);
    ValueError for a file that is not one."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (a file that cannot be read is refused, whatever the reason)
        raise ValueError(f"not a readable checkpoint ({type(e).__name__})") from None
    config = ckpt.get("hyper_parameters", {}).get("run_config") if isinstance(ckpt, dict) else None
    try:
        run = OmegaConf.create(config) if isinstance(config, str) else None
    except Exception:  # noqa: BLE001 (YAML that does not parse)
        run = None
    if not isinstance(run, DictConfig) or "model" not in run:
        raise ValueError("no run config of train.py in it")
    return run


def find_resumable_checkpoint(runs_dir: str | Path, config: DictConfig | dict,
                              max_reasons: int = 3) -> tuple[Path | None, list[tuple[Path, str]]]:
    """For ``ckpt_path=auto``: the newest ``*/checkpoints/last.ckpt`` of ``runs_dir`` whose run config
    matches ``config`` (but for ``RESUME_IGNORED_KEYS``), or None; and the newer ones refused, each with
    why (its first ``max_reasons`` differing keys, ``key: checkpoint's vs this run's``)."""
    refused: list[tuple[Path, str]] = []
    current = _plain_leaves(config)
    for path in last_checkpoints(runs_dir):
        try:
            differences = _differences(_plain_leaves(read_run_config(path)), current, RESUME_IGNORED_KEYS)
        except OmegaConfBaseException as e:  # a stored config that no longer resolves
            refused.append((path, f"its run config does not resolve ({str(e).splitlines()[0]})"))
            continue
        except ValueError as e:
            refused.append((path, str(e)))
            continue
        if not differences:
            return path, refused
        more = len(differences) - max_reasons
        refused.append((path, "; ".join(differences[:max_reasons]) + (f"; {more} more" if more > 0 else "")))
    return None, refused
