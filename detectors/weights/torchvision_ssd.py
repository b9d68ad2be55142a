"""python -m detectors.weights torchvision ssd300_vgg16 [--weights COCO_V1|FILE] --out OUT.ckpt

torchvision's ``ssd300_vgg16`` as a checkpoint of this framework: ``model=ssd300 backbone=vgg16`` with SSD's
neck and head, carrying everything that makes torchvision's numbers (``torchvision.models.detection.ssd``):

- its layers, tensor for tensor (``TENSOR_MAP``): VGG16's conv1_1..conv4_3 (``backbone.features``) and
  conv5_1..conv5_3 (torchvision keeps them in ``backbone.extra.0`` with pool4 and fc6/fc7) go to the backbone,
  the L2Norm scale on conv4_3, fc6/fc7 and the four extra blocks to the neck, the predictors to the head. The
  pools agree at 300 px (torchvision's floor pools 1, 2 and 4 meet even sides there, its ceil pool 3 is ours);
  the L2Norm's epsilon is 1e-10 here, 1e-12 there, which only a map that is zero over all channels would meet.
- its priors (``DefaultBoxGenerator``: scales 0.07 .. 1.05, steps 8 .. 300, sizes clipped to the image):
  ``head.priors.scales`` / ``steps``;
- its input: RGB in 0..1, mean (0.48235, 0.45882, 0.40784), std 1/255, stretched to 300x300 by a bilinear
  resize of the float image (``augment.eval_resize=stretch_float``; predict.py and evaluate.py then feed the
  network the input torchvision's transform makes);
- its decoding: box coder weights (10, 10, 5, 5) (``head.variances`` 0.1, 0.2), softmax scores above 0.01,
  the best 400 per class, NMS 0.45 per class, 200 per image;
- its COCO label map: 91 logit columns (background, then COCO category ids 1..90, 10 of them "N/A"). The 80
  named ones are the model's classes in id order (``head.class_columns``: the softmax still runs over all 91,
  so the scores are torchvision's; "N/A" columns are never reported), and their ids are the run config's
  ``category_ids`` (predict.py's predictions.json; evaluate.py with ``data=coco`` maps names to ids itself).

``--weights COCO_V1`` (default) is ``SSD300_VGG16_Weights.COCO_V1``, downloaded into torch's cache unless it is
there; ``--weights FILE`` reads a state dict of ``ssd300_vgg16`` saved with ``torch.save`` (bare, or under
``model``/``state_dict`` as torchvision's reference scripts save it), offline.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from detectors.weights import ImportError_, build_imported_model, compose_run_config, write_checkpoint

MODELS = ("ssd300_vgg16",)
# torchvision's SSD transform: GeneralizedRCNNTransform(300, 300, image_mean, image_std, fixed_size=(300, 300))
IMAGE_MEAN = (0.48235, 0.45882, 0.40784)
IMAGE_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)
# DefaultBoxGenerator of ssd300_vgg16
PRIOR_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
PRIOR_STEPS = (8, 16, 32, 64, 100, 300)
UNNAMED = ("N/A", "__background__")

Rename = Callable[[re.Match], str]
# torchvision's key -> ours. In torchvision's VGG16 features, pool4 is 23 and conv5_1..5_3 are 24, 26, 28: its
# backbone.extra.0 is (pool4, conv5_1, relu, conv5_2, relu, conv5_3, relu, (pool5 3x3/1, fc6, relu, fc7, relu))
TENSOR_MAP: list[tuple[re.Pattern, Rename]] = [
    (re.compile(r"backbone\.features\.(\d+)\.(weight|bias)"), lambda m: f"detector.backbone.features.{m[1]}.{m[2]}"),
    (re.compile(r"backbone\.extra\.0\.([135])\.(weight|bias)"),
     lambda m: f"detector.backbone.features.{23 + int(m[1])}.{m[2]}"),
    (re.compile(r"backbone\.extra\.0\.7\.([13])\.(weight|bias)"), lambda m: f"detector.neck.fc7.{m[1]}.{m[2]}"),
    (re.compile(r"backbone\.scale_weight"), lambda m: "detector.neck.l2norm.weight"),
    (re.compile(r"backbone\.extra\.([1-9])\.([02])\.(weight|bias)"),
     lambda m: f"detector.neck.blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"head\.classification_head\.module_list\.(\d+)\.(weight|bias)"),
     lambda m: f"detector.head.cls_convs.{m[1]}.{m[2]}"),
    (re.compile(r"head\.regression_head\.module_list\.(\d+)\.(weight|bias)"),
     lambda m: f"detector.head.box_convs.{m[1]}.{m[2]}"),
]


def our_key(key: str) -> str | None:
    """The tensor of ours that torchvision's ``key`` fills, or None when the layout has no place for it."""
    for pattern, rename in TENSOR_MAP:
        match = pattern.fullmatch(key)
        if match:
            return rename(match)
    return None


def read_torchvision_state(weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The ssd300_vgg16 state dict named by ``weights`` (a file, or a ``SSD300_VGG16_Weights`` name) and a
    phrase saying where it came from."""
    path = Path(weights).expanduser()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a corrupt file or a pickle of objects: not a state dict)
            reason = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's first sentence; the rest is advice
            raise ImportError_(f"{path} is not a readable state dict ({type(e).__name__}: {reason})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ImportError_(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        return state, str(path)
    from torchvision.models.detection import SSD300_VGG16_Weights

    from detectors.backbones.weights import torchvision_state_dict

    if weights not in SSD300_VGG16_Weights.__members__ and weights != "DEFAULT":
        raise ImportError_(f"--weights {weights!r} is neither a file nor a SSD300_VGG16_Weights name "
                           f"({', '.join(SSD300_VGG16_Weights.__members__)})")
    try:
        return torchvision_state_dict(SSD300_VGG16_Weights, weights)
    except ValueError as e:  # no network: say how to go on offline, with this command's option
        url = SSD300_VGG16_Weights.verify(weights).url
        reason = str(e).split("; download")[0]
        raise ImportError_(f"{reason}; download {url} where the network is reachable and give the file: "
                           "--weights FILE") from None


def coco_label_map(num_columns: int) -> tuple[list[str], list[int]]:
    """(class names, their logit columns) of a head with ``num_columns`` outputs per prior: torchvision's COCO
    categories (column = COCO category id), the "N/A" ones left out."""
    from torchvision.models.detection import SSD300_VGG16_Weights

    categories = list(SSD300_VGG16_Weights.COCO_V1.meta["categories"])
    if num_columns != len(categories):
        raise ImportError_(f"the classification head has {num_columns} outputs per prior; torchvision's COCO "
                           f"label map has {len(categories)} (background and ids 1..90): another label map "
                           "cannot be named")
    named = [(name, column) for column, name in enumerate(categories) if name not in UNNAMED]
    return [n for n, _ in named], [c for _, c in named]


def head_columns(state: dict[str, torch.Tensor], source: str) -> int:
    """Outputs per prior of the classification head (its first level: 4 priors per cell in ssd300_vgg16)."""
    cls, box = (state.get(f"head.{part}_head.module_list.0.weight") for part in ("classification", "regression"))
    if cls is None or box is None:
        raise ImportError_(f"{source} is not a state dict of torchvision's ssd300_vgg16: no "
                           "head.classification_head / head.regression_head tensors")
    priors = box.shape[0] // 4
    if priors == 0 or cls.shape[0] % priors:
        raise ImportError_(f"{source}: the first level's predictors disagree ({cls.shape[0]} class outputs, "
                           f"{box.shape[0]} box outputs)")
    return cls.shape[0] // priors


def run_overrides(classes: list[str], columns: list[int]) -> list[str]:
    """The run config of the equivalent model (train.py's overrides)."""
    names = ",".join("'" + n.replace("'", "\\'") + "'" for n in classes)

    def floats(values: tuple[float, ...]) -> str:
        return "[" + ",".join(repr(float(v)) for v in values) + "]"

    return [
        "model=ssd300", "backbone=vgg16", "neck=ssd300_extras", "head=ssd",
        # COCO: evaluate.py data=coco data.root=PATH reads the dataset's own files, names -> ids
        "data=coco", "data.root=coco", "data.splits={train: train2017, val: val2017, test: val2017}",
        f"data.classes=[{names}]", "input_size=[300,300]",
        f"backbone.mean={floats(IMAGE_MEAN)}", f"backbone.std={floats(IMAGE_STD)}",
        "augment.eval_resize=stretch_float",
        f"head.priors.scales={floats(PRIOR_SCALES)}", f"head.priors.steps={floats(PRIOR_STEPS)}",
        "head.priors.clip=true", "head.variances=[0.1,0.2]", "head.score_threshold=0.01",
        "head.nms_threshold=0.45", "head.pre_nms_top_k=400", "head.max_detections=200",
        f"head.class_columns=[{','.join(map(str, columns))}]",
    ]


def fill(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy every tensor of ``state`` into ``model`` by ``TENSOR_MAP``; any tensor without a place, any of
    ours left unfilled or of another shape is refused in one line."""
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = our_key(key)
        if target is None or target not in ours:
            raise ImportError_(f"{source}: tensor {key} {tuple(value.shape)} has no place in ssd300 on vgg16 "
                               "(is it a state dict of torchvision's ssd300_vgg16?)")
        if ours[target].shape != value.shape:
            raise ImportError_(f"{source}: tensor {key} is {tuple(value.shape)}, {target} here is "
                               f"{tuple(ours[target].shape)}")
        mapped[target] = value
    missing = [k for k in ours if k not in mapped]
    if missing:
        raise ImportError_(f"{source}: {len(missing)} tensors of ssd300 on vgg16 are not in the file "
                           f"(first: {missing[0]}); is it a state dict of torchvision's ssd300_vgg16?")
    model.load_state_dict(mapped)


def import_ssd300_vgg16(weights: str, out: str | Path) -> tuple[Path, str]:
    """Write the checkpoint; returns its path and a summary line."""
    state, source = read_torchvision_state(weights)
    classes, columns = coco_label_map(head_columns(state, source))
    run = compose_run_config(run_overrides(classes, columns))
    run.category_ids = columns  # each class's COCO id (= its column): predictions.json carries these
    model = build_imported_model(run, source)
    fill(model, state, source)
    path = write_checkpoint(model, run, out, source)
    return path, (f"wrote {path}: ssd300 on vgg16 (torchvision ssd300_vgg16, {len(state)} tensors from "
                  f"{source}), {len(classes)} COCO classes, input 300x300")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detectors.weights torchvision",
                                     description="torchvision's SSD300-VGG16 as a checkpoint of this framework")
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--weights", default="COCO_V1",
                        help="SSD300_VGG16_Weights name (downloads into torch's cache) or a state-dict file")
    parser.add_argument("--out", required=True, help="the checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        _, summary = import_ssd300_vgg16(args.weights, args.out)
    except ImportError_ as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
