"""``train.py init_from=PATH``: fine-tuning a checkpoint of 6 shape classes to other classes, for every head.

The reference is each head's own forward pass: after init_from, the class-independent outputs (boxes,
objectness, background) and the outputs of the classes both runs have equal the source model's, and those of
the new classes equal a fresh model's class rows on the source's features (a fresh model that plain
``load_state_dict`` gave the source's tensors of equal shape)."""

import copy
import logging
import os
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import detectors  # noqa: F401  (resolvers)
from detectors.checkpoints import config_differences
from detectors.data.shapes import SHAPE_CLASSES
from detectors.init_from import check_init_from, init_from_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SOURCE_CLASSES = list(SHAPE_CLASSES)  # circle, square, triangle, star, ellipse, cross
# two of the source's classes in another order, and two new ones
CLASSES = ["square", "RBC", "circle", "WBC"]
KEPT = {0: 1, 2: 0}  # label here -> label in the source
NEW = [1, 3]

# small and fast versions of each model, on a narrow MobileNetV2 (the heads' class layouts are under test)
SMALL = ["backbone=mobilenet_v2", "backbone.width_mult=0.25"]
MODELS = {
    "ssd300": ["input_size=[264,264]"],
    "ssdlite": ["input_size=[128,128]"],
    "yolov1": ["input_size=[128,160]", "backbone.out_strides=[32]", "head.channels=32", "head.fc_width=16"],
    "yolov2": ["input_size=[128,128]", "neck.channels=32"],
    "yolov3": ["input_size=[128,128]", "neck.channels=32"],
    "faster_rcnn": ["input_size=[128,128]", "head.fc_width=16", "head.rpn_channels=16",
                    "head.rpn_pre_nms_top_k={train: 100, test: 100}", "head.rpn_post_nms_top_k={train: 20, test: 20}"],
}


def run_config(model: str, *overrides: str, classes=SOURCE_CLASSES):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", f"model={model}", "multiscale.sizes=null",
                                          *SMALL, *MODELS.get(model, []), *overrides])
    with open_dict(cfg):
        cfg.data.classes = list(classes)
    return cfg


def build(cfg, classes, seed: int, **changes):
    """The module of ``cfg`` (a copy, with these classes and root keys changed), initialised from ``seed``."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.classes = list(classes)
        for key, value in changes.items():
            cfg[key] = value
    torch.manual_seed(seed)
    module = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    return module.eval(), cfg


def write_checkpoint(path: Path, state: dict, cfg) -> Path:
    """A checkpoint as train.py's (and detectors.weights') carry it: the state dict and the run config."""
    torch.save({"state_dict": state, "hyper_parameters": {"run_config": OmegaConf.to_yaml(cfg, resolve=True)},
                "epoch": 0, "global_step": 0}, path)
    return path


def perturbed(module) -> dict:
    """Its state with every parameter moved: each tensor the source gives is told apart from a fresh one's."""
    g = torch.Generator().manual_seed(7)
    params = dict(module.named_parameters())
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if k in params else v.clone()
            for k, v in module.state_dict().items()}


def outputs(raw, num_boxes: int = 2) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
    """A head's raw outputs as (class-independent tensors, [(class-dependent tensor, its class dim)])."""
    name = type(raw).__name__
    if name == "SSDRaw":
        return [raw.box_offsets, raw.cls_logits[..., :1]], [(raw.cls_logits[..., 1:], -1)]
    if name in ("YOLOv2Raw", "YOLOv3Raw"):
        return [raw.output[..., :5]], [(raw.output[..., 5:], -1)]
    if name == "YOLOv1Raw":
        return [raw.output[..., : 5 * num_boxes]], [(raw.output[..., 5 * num_boxes:], -1)]
    if name == "FasterRCNNRaw":
        return ([raw.objectness, raw.rpn_deltas, raw.rois, raw.cls_logits[..., :1]],
                [(raw.cls_logits[..., 1:], -1), (raw.box_deltas, -2)])
    raise AssertionError(name)


@pytest.fixture(scope="module")
def source_of(tmp_path_factory):
    """model -> (its config, the source module (6 classes, every parameter moved), its state, its checkpoint):
    built once for this file's tests."""
    made = {}

    def get(model: str):
        if model not in made:
            cfg = run_config(model)
            source, source_cfg = build(cfg, SOURCE_CLASSES, seed=0)
            state = perturbed(source)
            source.load_state_dict(state)
            path = write_checkpoint(tmp_path_factory.mktemp(model) / "source.ckpt", state, source_cfg)
            made[model] = cfg, source, state, path
        return made[model]

    return get


def forward(module, images):
    with torch.no_grad():
        return module.detector(images)


@pytest.mark.parametrize("model", list(MODELS))
def test_fine_tuning_loads_equal_shapes_and_keeps_the_shared_classes(model, source_of, caplog):
    cfg, source, source_state, path = source_of(model)

    target, _ = build(cfg, CLASSES, seed=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    # the reference for the new classes: the fresh model with the source's equal-shape tensors, loaded plainly
    reference = copy.deepcopy(target)
    with caplog.at_level(logging.INFO, logger="detectors.init_from"):
        transfer = init_from_checkpoint(target, path)

    same_shape = [k for k, v in fresh.items() if k in source_state and source_state[k].shape == v.shape]
    other_shape = [k for k in fresh if k not in same_shape]
    assert other_shape, "the class outputs must differ in shape (4 classes, not 6)"
    assert sorted(transfer.loaded) == sorted(same_shape)
    assert sorted(transfer.rebuilt) == sorted(other_shape) and not transfer.reinitialised
    state = target.state_dict()
    for key in same_shape:
        torch.testing.assert_close(state[key], source_state[key], rtol=0, atol=0, msg=key)

    reference.load_state_dict({**fresh, **{k: source_state[k] for k in same_shape}})
    size = target.input_size
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3))
    (src_common, src_classes), (tgt_common, tgt_classes), (_, ref_classes) = (
        outputs(forward(m, images)) for m in (source, target, reference))
    for src, tgt in zip(src_common, tgt_common, strict=True):
        torch.testing.assert_close(tgt, src)
    for (src, dim), (tgt, _), (ref, _) in zip(src_classes, tgt_classes, ref_classes, strict=True):
        assert tgt.shape[dim] == len(CLASSES) and src.shape[dim] == len(SOURCE_CLASSES)
        for label, source_label in KEPT.items():
            torch.testing.assert_close(tgt.select(dim, label), src.select(dim, source_label))
        for label in NEW:
            torch.testing.assert_close(tgt.select(dim, label), ref.select(dim, label))

    (line,) = [r.getMessage() for r in caplog.records if r.name == "detectors.init_from"]
    assert f"{len(same_shape)} of {len(fresh)} tensors loaded" in line
    assert "classes kept from the checkpoint: ['square', 'circle'], new: ['RBC', 'WBC']" in line
    first = other_shape[0]
    assert f"{first} {tuple(source_state[first].shape)} -> {tuple(fresh[first].shape)}" in line


def test_an_ssd_whose_classes_sit_in_named_columns_keeps_them_by_name(tmp_path):
    """torchvision's COCO SSD, imported, puts its 80 classes in 90 columns after the background
    (``head.class_columns``): fine-tuning it keeps each shared class's rows from its own column, not from the
    slot its label would have in a plain head."""
    columns = [2, 4, 5, 7, 8, 9]  # the 6 shape classes spread over 9 columns, as COCO's ids with gaps
    cfg = run_config("ssdlite", f"head.class_columns=[{','.join(map(str, columns))}]")
    source, source_cfg = build(cfg, SOURCE_CLASSES, seed=0)
    source.load_state_dict(perturbed(source))
    path = write_checkpoint(tmp_path / "columns.ckpt", source.state_dict(), source_cfg)
    target, _ = build(run_config("ssdlite"), CLASSES, seed=1)
    transfer = init_from_checkpoint(target, path)
    assert transfer.kept == ["square", "circle"] and transfer.new == ["RBC", "WBC"]
    images = torch.rand(2, 3, *target.input_size, generator=torch.Generator().manual_seed(3))
    src, tgt = (forward(m, images).cls_logits for m in (source, target))
    torch.testing.assert_close(tgt[..., 0], src[..., 0])  # the background
    for label, source_label in KEPT.items():
        torch.testing.assert_close(tgt[..., 1 + label], src[..., columns[source_label]])


def test_yolov1_for_another_input_size_reinitialises_its_fc_logging_both_shapes(source_of, caplog):
    """YOLOv1 built for another input size: its FC layers change shape (re-initialised, as a fresh model's);
    with the source's classes in the source's order every other tensor loads whole."""
    cfg, _, source_state, path = source_of("yolov1")
    target, _ = build(cfg, SOURCE_CLASSES, 1, input_size=[192, 160])
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="detectors.init_from"):
        transfer = init_from_checkpoint(target, path)
    changed = {k for k, v in fresh.items() if source_state[k].shape != v.shape}
    assert changed and set(transfer.reinitialised) == changed and not transfer.rebuilt
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in changed else source_state[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    key = sorted(changed)[0]
    assert f"{key} {tuple(source_state[key].shape)} -> {tuple(fresh[key].shape)}" in caplog.text


def test_the_same_classes_load_every_tensor_whole_and_reordered_ones_are_mapped_by_name(source_of):
    _, source, source_state, path = source_of("ssdlite")
    target = copy.deepcopy(source)
    with torch.no_grad():
        for value in target.parameters():
            value.zero_()
    transfer = init_from_checkpoint(target, path)
    assert sorted(transfer.loaded) == sorted(source_state) and not transfer.rebuilt and not transfer.reinitialised
    for key, value in target.state_dict().items():
        assert torch.equal(value, source_state[key]), key

    # the same names in another order: the rows follow the names
    target.class_names = SOURCE_CLASSES[::-1]
    transfer = init_from_checkpoint(target, path)
    assert transfer.rebuilt and transfer.kept == SOURCE_CLASSES[::-1] and transfer.new == []
    images = torch.rand(1, 3, *target.input_size, generator=torch.Generator().manual_seed(3))
    expected, got = forward(source, images).cls_logits, forward(target, images).cls_logits
    torch.testing.assert_close(got[..., 0], expected[..., 0])  # background
    torch.testing.assert_close(got[..., 1:], expected[..., 1:].flip(-1))


def test_another_model_or_too_little_matching_is_refused_in_one_line_naming_the_model(tmp_path, source_of):
    cfg, target, _, _ = source_of("ssdlite")
    target = copy.deepcopy(target)
    yolov3_cfg = run_config("yolov3")
    path = write_checkpoint(tmp_path / "yolov3.ckpt", {}, yolov3_cfg)
    with pytest.raises(ValueError) as info:
        init_from_checkpoint(target, path)
    message = str(info.value)
    assert "\n" not in message and "holds another model: YOLOv3Head on MobileNetV2" in message
    assert "6 classes" in message and "this run builds SSDHead on MobileNetV2" in message

    # the same model, but fewer than half of its tensors in the file
    state = target.state_dict()
    few = dict(list(state.items())[: len(state) // 3])
    path = write_checkpoint(tmp_path / "few.ckpt", few, cfg)
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=rf"only {len(few)} of this model's {len(state)} tensors match") as info:
        init_from_checkpoint(target, path)
    assert "\n" not in str(info.value) and "SSDHead on MobileNetV2" in str(info.value)
    for key, value in target.state_dict().items():  # refused: nothing loaded
        assert torch.equal(value, before[key]), key


def test_init_from_with_a_ckpt_path_is_refused_and_ckpt_path_auto_matches_the_run_it_started(tmp_path):
    fresh_run = run_config("ssdlite", classes=CLASSES)
    source = write_checkpoint(tmp_path / "source.ckpt", {}, fresh_run)
    resume = tmp_path / "last.ckpt"
    resume.write_bytes(b"")

    def with_(**keys):
        cfg = fresh_run.copy()
        with open_dict(cfg):
            cfg.update(keys)
        return cfg

    with pytest.raises(ValueError, match="starts a new run .* resumes a run: give one") as info:
        check_init_from(with_(init_from=str(source), ckpt_path=str(resume)))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_init_from(with_(init_from=str(tmp_path / "missing.ckpt")))

    # ckpt_path=auto may come with init_from: the path is recorded absolute in the run config, which is compared
    cfg = with_(init_from=os.path.relpath(source), ckpt_path="auto")
    check_init_from(cfg)
    assert cfg.init_from == str(source.resolve())
    assert config_differences(cfg, cfg) == []
    (difference,) = config_differences(fresh_run, cfg)
    assert difference.startswith("init_from: None vs /")
    # a checkpoint written before init_from existed matches a run that leaves it null
    older = OmegaConf.masked_copy(fresh_run, [k for k in fresh_run if k != "init_from"])
    assert "init_from" not in older and config_differences(older, fresh_run) == []


@pytest.mark.slow
def test_train_py_fine_tunes_a_shapes_run_to_bccd_and_the_fine_tuned_run_resumes(tmp_path, bccd_root):
    """A one-epoch run on shapes, then ``init_from=`` its last.ckpt on BCCD (no class in common: every class row
    new, the rest loaded), a fresh start (epoch 0, step count from 0), then the fine-tuned run resumed with
    ``ckpt_path`` as any run, its run config still naming where its weights began."""
    from test_train_e2e import run, run_dir

    small = ["model=ssdlite", "input_size=[128,128]", "data.batch_size=2", "data.eval_batch_size=2",
             "data.num_workers=0", "trainer.accelerator=cpu"]
    run("train.py", *small, "data.source.sizes={train: 2, val: 2, test: 2}", "trainer.max_epochs=1",
        run_dir(tmp_path, "source"))
    source = tmp_path / "source" / "checkpoints" / "last.ckpt"
    source_state = torch.load(source, map_location="cpu", weights_only=True)
    assert source_state["global_step"] == 1

    bccd = [*small, "data=voc", f"data.root={bccd_root}", "debug=limit", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1"]
    out = run("train.py", *bccd, "trainer.max_epochs=1", f"init_from={source}", run_dir(tmp_path, "tuned"))
    (line,) = [line for line in out.splitlines() if "detectors.init_from" in line]
    tensors = len(source_state["state_dict"])
    assert f"{tensors - 12} of {tensors} tensors loaded" in line  # SSDLite's 6 class predictors' weights and biases
    assert "classes kept from the checkpoint: none, new: ['Platelets', 'RBC', 'WBC']" in line
    assert "detector.head.cls_convs.0.3.weight (42, 96, 1, 1) -> (24, 96, 1, 1)" in line  # 6 priors x (1 + C)
    assert "re-initialised: none" in line
    tuned = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (tuned["epoch"], tuned["global_step"]) == (0, 2)  # not a resume: counted from the start
    assert f"init_from: {source}" in tuned["hyper_parameters"]["run_config"]

    last = tmp_path / "tuned" / "checkpoints" / "last.ckpt"
    out = run("train.py", *bccd, "trainer.max_epochs=2", f"ckpt_path={last}", run_dir(tmp_path, "resumed"))
    assert "tensors loaded" not in out  # a resume loads the checkpoint's weights, not init_from's again
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 4)
    assert f"init_from: {source}" in resumed["hyper_parameters"]["run_config"]
