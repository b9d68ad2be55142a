"""Every option of every config group builds a run as train.py builds it: the data module, the model
(the parts the config names, for the data's classes), the optimizer and schedule (through the module's
configure_optimizers), the callbacks, the loggers and the trainer; and the model runs a forward.
The built-in shapes data serves every option that does not need BCCD, so only those skip without it."""

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

import detectors  # noqa: F401  (resolvers)
from detectors.module import DetectionModule
from detectors.tasks.train import (
    build_datamodule,
    instantiate_dict,
    instantiate_loggers,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["data", "augment", "backbone", "neck", "head", "optimizer", "scheduler", "module", "model", "trainer",
          "callbacks", "logger", "experiment", "debug"]
# the forward runs on a small input every model takes (SSD300's extras need 257 px and more) ...
FORWARD_SIZE = (264, 280)
# ... or on the size a head needs: None is the config's own input_size (YOLOv1's FC is built for that one
# size), YOLOv2's and YOLOv3's grids take multiples of 32
FORWARD_SIZES = {"detectors.heads.yolov1.YOLOv1Head": None, "detectors.heads.yolov2.YOLOv2Head": (288, 320),
                 "detectors.heads.yolov3.YOLOv3Head": (288, 320),
                 # Faster R-CNN's proposals are clipped to its stride-16 map: multiples of 16
                 "detectors.heads.faster_rcnn.FasterRCNNHead": (256, 272)}
# YOLOv1's paper FC (4096 units, 205M weights at 448 px) only slows the test down
SMALL_YOLOV1 = ["head.fc_width=64"]
# and Faster R-CNN's (VGG16's fc6: 103M weights)
SMALL_RCNN = ["head.fc_width=64"]
# options that need a partner to make a model (the neck's levels must be the priors' levels)
PARTNERS = {
    ("neck", "ssd512_extras"): ["model=ssd512"],
    ("neck", "ssdlite_extras"): ["model=ssdlite"],
    ("neck", "identity"): ["backbone=mobilenet_v2", "backbone.out_strides=[8,16,32]",
                           "head.priors.aspect_ratios=[[2],[2,3],[2,3]]"],
    ("neck", "passthrough"): ["model=yolov2"],
    ("neck", "darknet_conv"): ["model=yolov2_tiny"],
    ("head", "yolov2"): ["model=yolov2"],
    ("neck", "yolov3_fpn"): ["model=yolov3"],
    ("head", "yolov3"): ["model=yolov3"],
    ("head", "yolov1"): ["model=yolov1", *SMALL_YOLOV1],
    ("model", "yolov1"): SMALL_YOLOV1,
    ("head", "faster_rcnn"): ["model=faster_rcnn", *SMALL_RCNN],
    ("model", "faster_rcnn"): SMALL_RCNN,
}


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def needs_bccd(group, option):
    return (group == "data" and option != "shapes") or (group == "experiment" and option.endswith("_bccd"))


def compose_train(overrides, tmp_path, root=None):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs", *overrides],
                      return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        if "root" in cfg.data.keys():  # keys() lists it while still ??? (mandatory)
            assert root is not None, "this data option needs a dataset root"
            cfg.data.root = str(root)
        del cfg["hydra"]
    return cfg


def targets(section: DictConfig | None) -> list[type]:
    """The classes a callbacks/logger section names, in its order."""
    return [get_class(c._target_) for c in (section or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def build_run(cfg: DictConfig):
    """What train.py builds before ``fit``, with the same helpers."""
    datamodule = build_datamodule(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), None)
    accelerator = {} if torch.cuda.is_available() or cfg.trainer.get("accelerator") != "gpu" else {"accelerator": "cpu"}
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **accelerator)
    return datamodule, model, callbacks, loggers, trainer


def check_run(cfg: DictConfig, datamodule, model, callbacks, loggers, trainer):
    classes = list(datamodule.classes)
    assert classes and list(cfg.data.classes) == classes

    # the model: the parts the config names, for the data's classes
    assert isinstance(model, DetectionModule) and model.class_names == classes
    detector = model.detector
    assert type(detector.backbone) is get_class(cfg.backbone._target_)
    assert type(detector.neck) is get_class(cfg.neck._target_)
    assert type(detector.head) is get_class(cfg.head._target_)
    assert detector.head.num_classes == len(classes)
    assert model.input_size == tuple(cfg.input_size)
    assert OmegaConf.create(model.hparams.run_config).model.detector.backbone._target_ == cfg.backbone._target_

    # the optimizer (and schedule) that Lightning gets: every trainable parameter once, 1-D ones undecayed
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    if cfg.optimizer._target_ == "detectors.optimizers.sgd_or_adamw":  # optimizer=auto: AdamW on a CPU
        assert type(optimizer) is (torch.optim.AdamW if cfg.optimizer.adamw else torch.optim.SGD)
    else:
        assert type(optimizer) is get_class(cfg.optimizer._target_)
    decay, no_decay = optimizer.param_groups
    trainable = [p for p in detector.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert decay["weight_decay"] == pytest.approx(cfg.optimizer.weight_decay) and no_decay["weight_decay"] == 0.0
    if cfg.get("scheduler"):
        scheduler = configured["lr_scheduler"]
        assert scheduler["interval"] == "step"
        assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.LRScheduler)
        assert scheduler["scheduler"].optimizer is optimizer
        assert all(g["initial_lr"] == pytest.approx(cfg.optimizer.lr) for g in optimizer.param_groups)
    else:
        assert all(g["lr"] == pytest.approx(cfg.optimizer.lr) for g in optimizer.param_groups)

    # callbacks and loggers: the ones the config lists, in the trainer
    assert [type(c) for c in callbacks] == targets(cfg.get("callbacks"))
    assert all(any(c is t for t in trainer.callbacks) for c in callbacks)
    assert [type(lg) for lg in loggers] == targets(cfg.get("logger"))
    if cfg.trainer.get("fast_dev_run"):  # Lightning then swaps the loggers for a dummy
        assert [type(lg).__name__ for lg in trainer.loggers] == ["DummyLogger"] * len(loggers)
    else:
        assert trainer.loggers == loggers and trainer.max_epochs == cfg.trainer.max_epochs
    assert trainer.precision == str(cfg.trainer.precision)
    assert trainer.num_devices == cfg.trainer.devices

    # one forward (and decode) on a small input (or the one the head takes)
    size = FORWARD_SIZES.get(cfg.head._target_, FORWARD_SIZE) or tuple(cfg.input_size)
    model.eval()
    with torch.no_grad():
        raw = model(torch.randn(1, 3, *size))
        preds = detector.predict(raw, size)
    if hasattr(detector.head, "priors"):  # SSD: one prediction per prior, C + 1 scores each
        num_priors = detector.head.priors(raw.feature_shapes, size).shape[0]
        assert raw.cls_logits.shape == (1, num_priors, len(classes) + 1)
        assert raw.box_offsets.shape == (1, num_priors, 4)
    tensors = [v for v in vars(raw).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.shape[0] == 1 and torch.isfinite(t).all() for t in tensors)
    assert len(preds) == 1 and set(preds[0]) >= {"boxes", "scores", "labels"}


CASES = [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES)
def test_every_config_option_builds_a_run_and_its_model_runs_a_forward(group, option, tmp_path, request):
    root = None
    if needs_bccd(group, option):
        root = request.getfixturevalue("bccd_as")(option) if option in ("coco", "yolo") else request.getfixturevalue("bccd_root")
    cfg = compose_train([f"{group}={option}", *PARTNERS.get((group, option), [])], tmp_path, root)
    if group != "data" and not needs_bccd(group, option):
        with open_dict(cfg):  # a few generated images are plenty to build a run
            cfg.data.source.sizes = {"train": 4, "val": 2, "test": 2}
    check_run(cfg, *build_run(cfg))
    if group == "backbone" or (group == "model" and option == "ssd300"):
        # every backbone under SSD300 keeps SSD300's priors per cell (4, 6, 6, 6, 4, 4: 8732 at 300 px)
        assert cfg.model.detector.head.priors.aspect_ratios == [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def test_the_sweep_searches_keys_the_config_has(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "hparams_search=ssd_optuna"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and len(params) >= 1
    for key in params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    get_class(cfg.hydra.sweeper._target_)  # the plugin is installed


def test_typo_in_a_group_option_is_a_clear_error(tmp_path):
    # Hydra's own error, naming the option and listing the ones there are
    with pytest.raises(MissingConfigException,
                       match=r"Could not find 'model/ssd301'(.|\n)*Available options in 'model'"):
        compose_train(["model=ssd301"], tmp_path)


def test_overfit_preset_validates_on_the_very_batches_it_trains_on(tmp_path):
    """Lightning's overfit_batches alone validates on the val split's first batches (other images)
    and keeps the augmentation, so mAP there cannot show whether the model fits what it trains on."""
    cfg = compose_train(["debug=overfit", "trainer.overfit_batches=2", "data.batch_size=4",
                         "data.source.sizes={train: 8, val: 8, test: 8}"], tmp_path)
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


@pytest.mark.parametrize("data", ["shapes", "voc"])
def test_resolving_before_the_classes_are_known_says_how_to_get_them(data, tmp_path, request):
    root = request.getfixturevalue("bccd_root") if data == "voc" else None
    cfg = compose_train([f"data={data}"], tmp_path, root)
    # OmegaConf wraps the resolver's ValueError
    with pytest.raises(InterpolationResolutionError,
                       match=r"ValueError .*data.classes is null.*data.classes=\[a,b,c\]"):
        OmegaConf.to_container(cfg, resolve=True)


def test_the_cpu_shapes_run_unaugmented_and_a_chosen_augmentation_is_named(tmp_path, caplog, monkeypatch):
    """On a CPU the built-in shapes train without augmentation (configs/data/shapes.yaml); an augment= the user
    chose is then not applied, and the log says so, with the override that applies it."""
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    small = ["data.source.sizes={train: 2, val: 1, test: 1}", "data.num_workers=0"]
    cfg = compose_train(["augment=yolo", *small], tmp_path)
    assert cfg.data.augment.preset == "none" and cfg.augment.preset == "yolo"
    with caplog.at_level(logging.WARNING, logger="detectors.tasks.train"):
        build_datamodule(cfg)
    assert "augmentation: none, not augment=yolo" in caplog.text and "data.augment=${augment}" in caplog.text
    caplog.clear()
    cfg = compose_train(["augment=yolo", "data.augment=${augment}", *small], tmp_path)
    assert cfg.data.augment.preset == "yolo"
    with caplog.at_level(logging.WARNING, logger="detectors.tasks.train"):
        build_datamodule(cfg)
    assert "augmentation:" not in caplog.text
    # the default run (the model config chose augment=ssd, the user chose nothing): a line of the log, no warning
    cfg = compose_train(small, tmp_path)
    with caplog.at_level(logging.INFO, logger="detectors.tasks.train"):
        build_datamodule(cfg)
    said = [r for r in caplog.records if r.getMessage().startswith("augmentation: none, not augment=ssd")]
    assert len(said) == 1 and said[0].levelno == logging.INFO


@pytest.mark.parametrize("cuda", [False, True])
def test_ssd300_trains_with_adamw_on_a_cpu_and_sgd_on_a_gpu_and_its_recipes_keep_sgd(tmp_path, monkeypatch, cuda):
    """optimizer=auto (model=ssd300's): AdamW from its lr on a CPU (the short default run), SGD with momentum
    and the one-epoch warm-up on a GPU; optimizer=sgd and the BCCD recipe pick SGD on either."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def built(overrides):
        cfg = compose_train(["data.classes=[a,b]", *overrides], tmp_path, root=tmp_path)  # the model alone
        module = hydra.utils.instantiate(cfg.model, run_config="")
        assert isinstance(module, DetectionModule)
        optimizer = module.configure_optimizers()["optimizer"]
        return cfg, optimizer

    cfg, optimizer = built(["model=ssd300"])
    if cuda:
        assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
        assert optimizer.defaults["lr"] == 0.01 and cfg.scheduler.warmup_epochs == 1.0
    else:
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.05
        assert optimizer.defaults["lr"] == 0.001 and cfg.scheduler.warmup_epochs == 0
    for overrides in (["model=ssd300", "optimizer=sgd"], ["experiment=ssd300_bccd"]):
        assert type(built(overrides)[1]) is torch.optim.SGD, overrides
