"""python -m detectors.weights darknet CFG WEIGHTS [--names NAMES_FILE] [--input-size H [W]] --out OUT.ckpt

A darknet detector (cfg + ``.weights``: yolov3.cfg, yolov3-voc.cfg, yolov3-spp.cfg, yolov3-tiny.cfg, yolov2.cfg,
yolov2-voc.cfg, yolov2-tiny.cfg) becomes a checkpoint of this framework carried by its own parts: DarkNet-53 + the
YOLOv3 neck (SPP where the cfg has it) + the YOLOv3 head; the tiny trunk + yolov3-tiny's neck + the YOLOv3 head;
DarkNet-19 + the passthrough neck (darknet's reorg order) + the YOLOv2 head; the tiny trunk + a 3x3 conv + the
YOLOv2 head. Every batch norm is darknet's (``DarknetBatchNorm2d``). The run config inside records darknet's
preprocessing and decoding, so evaluate.py and predict.py give darknet's numbers: RGB in 0..1 without mean/std
(the DarkNet backbones' configs), letterbox to the cfg's input size with fill 0.5 (image.c's ``letterbox_image``,
as detector.c's ``validate_detector_map``), score = objectness x class probability (softmax for the region layer,
logistic for the yolo layers), per-class NMS at 0.45, threshold 0.005 (detector.c's mAP settings).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from detectors.weights import ImportError_, build_imported_model, compose_run_config, write_checkpoint
from detectors.weights.darknet_cfg import describe, float_count, parse_cfg
from detectors.weights.darknet_layout import check_float_count, check_layout, expected_layers, load_weights_file
from detectors.weights.darknet_names import data_for_names
from detectors.weights.torchvision_ssd import coco_label_map

log = logging.getLogger(__name__)

# image.c's letterbox_image fills with 0.5 on darknet's 0..1 scale
DARKNET_FILL = 127.5


def run_config_for(cfg_path: str | Path, names: list[str] | None,
                   input_size: tuple[int, int] | None = None) -> tuple[DictConfig, str]:
    """The run config of the framework model a darknet cfg describes (see the module docstring) and that model's
    name (``yolov3`` | ``yolov2``). ``names``: the class names (a names file's lines); None: COCO's for 80
    classes, VOC's for 20, else class_0 ... ``input_size`` (H, W): instead of the cfg's width and height
    (yolov3.cfg has 608; the paper's YOLOv3-416 is 416). ImportError_ for a cfg the framework cannot carry."""
    cfg_path = Path(cfg_path)
    sections = parse_cfg(cfg_path)
    spec = describe(sections, cfg_path.name)
    data, classes = data_for_names(names, spec.num_classes)
    if len(classes) != spec.num_classes:
        raise ImportError_(f"{len(classes)} class names for the {spec.num_classes} classes of {cfg_path.name}")
    h, w = spec.input_size
    if input_size is not None:
        # darknet runs a cfg at another size by editing its width and height: the yolo layers' anchors stay in
        # pixels of the network, the region layer's in cells of its grid (32 px), so neither scales
        h, w = input_size
    anchors = ",".join(f"[{a!r},{b!r}]" for a, b in spec.anchors)
    overrides = [
        # the data the weights were trained on, its root given where evaluate.py or train.py runs (data.root=PATH)
        f"model={spec.model}", f"data={data}", "data.root=null",
        f"data.classes=[{','.join(_quoted(c) for c in classes)}]",
        f"input_size=[{h},{w}]", f"head.anchors=[{anchors}]", f"head.input_size=[{h},{w}]",
        "backbone.darknet_bn=true", "neck.darknet_bn=true",
        # darknet's own evaluation: letterbox with fill 0.5 (the yolo augment's eval_resize is the letterbox)
        "augment.eval_resize=letterbox", f"augment.fill=[{DARKNET_FILL},{DARKNET_FILL},{DARKNET_FILL}]",
        "head.score_threshold=0.005", "head.nms_threshold=0.45",
        *spec.overrides,
    ]
    if spec.model == "yolov2":
        overrides.append("neck.reorg=darknet")
    run = compose_run_config(overrides)
    if data == "coco":  # predict.py writes COCO's ids without the annotation files (evaluate.py reads them there)
        coco_names, coco_ids = coco_label_map(91)  # torchvision's COCO categories: a column is an id
        run.category_ids = [coco_ids[coco_names.index(c)] for c in classes]
    return run, spec.model


def load_darknet_model(cfg_path: str | Path, weights_path: str | Path, names: list[str] | None = None,
                       input_size: tuple[int, int] | None = None) -> tuple[nn.Module, DictConfig]:
    """The DetectionModule of ``cfg_path`` (see :func:`run_config_for`) filled from ``weights_path`` in the cfg's
    layer order, and its run config. ImportError_ (one line) for a cfg the framework cannot carry or weights of
    another cfg."""
    cfg_path, weights_path = Path(cfg_path), Path(weights_path)
    run, model_name = run_config_for(cfg_path, names, input_size)
    sections = parse_cfg(cfg_path)
    # the file against the cfg before the model is built (seconds); the layout check below ties cfg and model
    check_float_count(weights_path, float_count(sections, cfg_path.name), cfg_path.name)
    with initialisation_skipped():  # every parameter comes from the file (checked below): no random init
        model = build_imported_model(run, str(cfg_path))
    convs = check_layout(sections, expected_layers(model.detector, model_name), cfg_path.name, model_name)
    version, seen = load_weights_file(weights_path, convs, cfg_path.name)
    filled = {id(t) for c in convs for t in (c.conv.weight, c.conv.bias, *((c.bn.weight, c.bn.bias, c.bn.running_mean,
                                                                            c.bn.running_var) if c.bn else ()))}
    # what the skipped initialisers would have set: parameters (BatchNorm's running statistics start as zeros and
    # ones without them, the other buffers are made by torch.zeros / torch.tensor)
    unfilled = [name for name, t in model.named_parameters() if id(t) not in filled]
    if unfilled:  # a part with tensors darknet's layers do not have: they would hold uninitialised memory
        raise ValueError(f"the darknet layout of {model_name} leaves {unfilled[0]} unfilled")
    log.info("%s: %d convs from %s (version %s, %d images seen)", cfg_path.name, len(convs), weights_path.name,
             ".".join(map(str, version)), seen)
    return model.eval(), run


def import_darknet(cfg_path: str | Path, weights_path: str | Path, out: str | Path,
                   names: list[str] | None = None, input_size: tuple[int, int] | None = None) -> Path:
    """:func:`load_darknet_model`, written as the checkpoint ``out``."""
    model, run = load_darknet_model(cfg_path, weights_path, names, input_size)
    return write_checkpoint(model, run, out, f"darknet {cfg_path} + {weights_path}")


@contextlib.contextmanager
def initialisation_skipped() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers do nothing inside (modules keep the memory they were allocated):
    building a 60M-parameter model whose every tensor is then read from a file takes a fraction of the time."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, initialiser in saved.items():
            setattr(nn.init, n, initialiser)


def _quoted(name: str) -> str:
    """A class name as a quoted Hydra override value (names have spaces: 'traffic light')."""
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def read_names(path: str | Path) -> list[str]:
    """A darknet ``.names`` file: one class name a line, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"names file {path}: no such file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m detectors.weights darknet",
                                     description=__doc__.strip().splitlines()[2])
    parser.add_argument("cfg", help="darknet cfg (e.g. yolov3.cfg)")
    parser.add_argument("weights", help="its .weights file (e.g. yolov3.weights)")
    parser.add_argument("--names", help="class names, one a line (coco.names, voc.names); default: COCO's for 80 "
                                        "classes, VOC's for 20, else class_0 ...")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="SIDE",
                        help="network input H [W] instead of the cfg's width and height (a multiple of 32)")
    parser.add_argument("--out", required=True, help="checkpoint to write (OUT.ckpt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        names = read_names(args.names) if args.names else None
        size = None if not args.input_size else (args.input_size[0], args.input_size[-1])
        if size is not None and (len(args.input_size) > 2 or size[0] % 32 or size[1] % 32):
            raise ImportError_(f"--input-size {' '.join(map(str, args.input_size))}: one or two multiples of 32")
        path = import_darknet(args.cfg, args.weights, args.out, names, size)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
