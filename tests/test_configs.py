"""Every config of every group composes, resolves and instantiates its part."""

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import detectors  # noqa: F401  (resolvers)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["data", "augment", "backbone", "neck", "head", "optimizer", "scheduler", "module", "model", "trainer",
          "callbacks", "logger", "experiment", "debug"]


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(overrides, tmp_path, root):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        if "root" in cfg.data.keys():  # keys() lists it while still ??? (mandatory)
            cfg.data.root = str(root)
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_resolves(group, option, tmp_path, bccd_root, bccd_as):
    root = bccd_as(option) if group == "data" and option in ("coco", "yolo") else bccd_root
    cfg = compose_train([f"{group}={option}"], tmp_path, root)
    datamodule = hydra.utils.instantiate(cfg.data)
    with open_dict(cfg):
        cfg.data.classes = list(datamodule.classes)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.model._target_ == "detectors.module.DetectionModule"


@pytest.mark.parametrize("backbone", options("backbone"))
def test_model_instantiates_with_each_backbone(backbone, tmp_path, bccd_root):
    cfg = compose_train([f"backbone={backbone}"], tmp_path, bccd_root)
    with open_dict(cfg):
        cfg.data.classes = ["a", "b", "c"]
    model = hydra.utils.instantiate(cfg.model)
    assert model.detector.head.num_classes == 3
    assert model.detector.head.priors.num_priors_per_cell == [4, 6, 6, 6, 4, 4]


def test_typo_in_a_group_option_is_a_clear_error(tmp_path, bccd_root):
    with pytest.raises(Exception, match="ssd301"):
        compose_train(["model=ssd301"], tmp_path, bccd_root)


def test_overfit_preset_validates_on_the_very_batches_it_trains_on(tmp_path, bccd_root):
    """Lightning's overfit_batches alone validates on the val split's first batches (other images)
    and keeps the augmentation, so mAP there cannot show whether the model fits what it trains on."""
    cfg = compose_train(["debug=overfit", "trainer.overfit_batches=2", "data.batch_size=4"], tmp_path, bccd_root)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.trainer = SimpleNamespace(overfit_batches=cfg.trainer.overfit_batches)

    def first_two(loader):
        return [batch for _, batch in zip(range(2), loader)]

    # the same images, unaugmented, in every pass over the training data and in validation
    train, again, val = (first_two(datamodule.train_dataloader()), first_two(datamodule.train_dataloader()),
                         first_two(datamodule.val_dataloader()))
    for t, a, v in zip(train, again, val):
        for key in ("images", "boxes", "labels", "image_ids"):
            assert torch.equal(t[key], a[key]) and torch.equal(t[key], v[key]), key
    assert len(train[0]["image_ids"]) == 4 and len(val) == 2


def test_resolving_before_the_classes_are_known_says_how_to_get_them(tmp_path, bccd_root):
    cfg = compose_train(["data=voc"], tmp_path, bccd_root)
    with pytest.raises(Exception, match=r"data.classes is null.*data.classes=\[a,b,c\]"):
        OmegaConf.to_container(cfg, resolve=True)
