"""Published detectors in: whole-model weights of other tools turned into checkpoints of this framework.

``python -m detectors.weights darknet CFG WEIGHTS ...`` (``darknet.py``) and ``python -m detectors.weights
torchvision ssd300_vgg16 ...`` (``torchvision_ssd.py``) compose the equivalent model from the framework's own
parts and write an ordinary checkpoint (:func:`write_checkpoint`) that evaluate.py, predict.py, the exporter and
``train.py init_from=`` accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from detectors.checkpoints import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ImportError_(ValueError):
    """A file that cannot be imported (a layer this framework lacks, a wrong float count): one line says why."""


def compose_run_config(overrides: Sequence[str]) -> DictConfig:
    """configs/train.yaml with ``overrides`` (e.g. ``model=yolov3``, ``data.num_classes=80``), resolved: the run
    config an imported checkpoint carries, as train.py would have stored it."""
    from hydra.core.hydra_config import HydraConfig
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="import"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the paths' ${hydra:...} interpolations resolve as in a run
    run = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.create(OmegaConf.to_container(run, resolve=True))


def build_imported_model(run: DictConfig, source: str) -> torch.nn.Module:
    """The DetectionModule ``run`` describes, freshly initialised (nothing downloaded), to be filled by an importer."""
    return build_model(run, source)


def write_checkpoint(model: torch.nn.Module, run: DictConfig, path: str | Path, source: str) -> Path:
    """Write ``model``'s weights with ``run`` inside as a checkpoint of this framework (the keys
    ``checkpoints.load_checkpoint`` reads, epoch and step 0: a start, not a run to resume). ``source`` (the files
    imported) is kept in the checkpoint for the record."""
    import lightning

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({
        "state_dict": state,
        "hyper_parameters": {"run_config": OmegaConf.to_yaml(run)},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "imported_from": source,
    }, path)
    return path
