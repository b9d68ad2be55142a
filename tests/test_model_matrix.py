"""Every backbone under every model, through the configs as train.py builds them: a training step and
``predict`` on a small non-square input, with the contract every head keeps (DESIGN.md): finite loss
with its named terms, gradients reaching every parameter, boxes inside the image, labels in range,
images and batches without boxes. Later heads join this matrix."""

import re
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import open_dict

import detectors  # noqa: F401  (resolvers)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
SIZE = (264, 296)  # (H, W): small, non-square, and above SSD300's smallest input (257 px)
# models whose input size is constrained: YOLOv1's FC is built for one size (any, as long as it is the
# one it runs at: small and non-square here too), YOLOv2's and YOLOv3's grids need multiples of 32,
# and Faster R-CNN's proposals are clipped to its stride-16 map's extent: multiples of 16 (each head's size_divisor)
SIZES = {"yolov1": (224, 288), "yolov2": (288, 320), "yolov3": (288, 320), "faster_rcnn": (256, 288),
         "yolov2_tiny": (288, 320), "yolov3_tiny": (288, 320)}
# and what keeps them fast: YOLOv1's paper head (1024-channel convs, an FC of 4096) only slows the matrix;
# YOLOv2's and YOLOv3's paper necks (up to 1024 wide) are a large share of their networks: narrow ones test the same.
OVERRIDES = {"yolov1": ["head.channels=128", "head.fc_width=32"],
             "yolov2": ["neck.channels=128"], "yolov3": ["neck.channels=64"],
             # Faster R-CNN: VGG16's fc6 of 4096 alone is 103M weights; fewer proposals and RoIs, the same steps
             "faster_rcnn": ["head.fc_width=32", "head.rpn_channels=64", "head.roi_batch_size=64",
                             "head.rpn_pre_nms_top_k={train: 300, test: 300}",
                             "head.rpn_post_nms_top_k={train: 200, test: 100}"]}
NUM_CLASSES = 3
# untrained scores sit under the heads' own thresholds (YOLOv2's objectness x class is ~0.002 < 0.005,
# YOLOv1's confidence x class near 0): threshold 0 lets every candidate through to NMS, so predict's
# decoding, clipping and NMS run on real boxes in every case (and the contract checks see some)
PREDICT_EVERYTHING = "head.score_threshold=0.0"


def size_of(model: str) -> tuple[int, int]:
    return SIZES.get(model, SIZE)


def build(model: str, backbone: str, *overrides: str):
    h, w = size_of(model)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", f"model={model}", f"backbone={backbone}",
                                          f"input_size=[{h},{w}]",
                                          # the step runs at the size given: no multi-scale draw (YOLOv2's default)
                                          "multiscale.sizes=null", PREDICT_EVERYTHING, *OVERRIDES.get(model, []),
                                          *overrides])
    with open_dict(cfg):
        cfg.data.classes = [f"c{i}" for i in range(NUM_CLASSES)]
    return hydra.utils.instantiate(cfg.model)


def batch_with_an_empty_image(generator: torch.Generator, boxes_per_image: int = 3, size=SIZE) -> dict:
    h, w = size
    xy = torch.rand(2, boxes_per_image, 2, generator=generator) * torch.tensor([w, h]) * 0.6
    wh = torch.rand(2, boxes_per_image, 2, generator=generator) * 80 + 12
    mask = torch.ones(2, boxes_per_image, dtype=torch.bool)
    mask[1] = False  # the second image has no objects
    return {
        "images": torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=generator),
        "boxes": torch.cat([xy, xy + wh], -1),
        "labels": torch.randint(0, NUM_CLASSES, (2, boxes_per_image), generator=generator),
        "mask": mask,
        "weights": torch.ones(2, boxes_per_image),
        "difficult": torch.zeros(2, boxes_per_image, dtype=torch.bool),
        "num_skipped": torch.tensor(0),
    }


def assert_predictions_keep_the_contract(preds, batch_size, size=SIZE, max_detections=None):
    """Every image has boxes (the matrix predicts at score threshold 0: an empty result means predict
    dropped what it should keep), and they keep the contract: xyxy float32 inside the (H, W) image,
    labels 0..C-1, scores in (0, 1] best first, at most ``max_detections``."""
    assert len(preds) == batch_size
    h, w = size
    for i, p in enumerate(preds):
        assert set(p) >= {"boxes", "scores", "labels"}
        boxes, scores, labels = p["boxes"], p["scores"], p["labels"]
        assert len(boxes) > 0, f"image {i}: no box predicted at score threshold 0"
        if max_detections is not None:
            assert len(boxes) <= max_detections
        assert boxes.shape[1:] == (4,) and len(boxes) == len(scores) == len(labels)
        assert boxes.dtype == torch.float32 and not labels.is_floating_point()
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((labels >= 0) & (labels < NUM_CLASSES)).all()
        assert ((scores > 0) & (scores <= 1)).all()
        assert (scores[:-1] >= scores[1:]).all()  # best first


def covering_pairs(models: list[str], backbones: list[str]) -> set[tuple[str, str]]:
    """Pairs in which every model and every backbone appears at least once (the quick tier's share of the
    matrix; ``pytest -m slow`` runs the rest)."""
    n = max(len(models), len(backbones))
    # models beyond the backbones' count take the cheapest backbone: their case tests the head, not the trunk
    cheap = "darknet_tiny" if "darknet_tiny" in backbones else backbones[0]
    return {(models[i % len(models)], backbones[i] if i < len(backbones) else cheap) for i in range(n)}


MATRIX = [pytest.param(m, b, id=f"{b}-{m}", marks=() if (m, b) in covering_pairs(MODELS, BACKBONES) else pytest.mark.slow)
          for b in BACKBONES for m in MODELS]


@pytest.mark.parametrize("model,backbone", MATRIX)
def test_training_step_and_predict(model, backbone):
    torch.manual_seed(0)
    module = build(model, backbone)
    module.train()
    size = size_of(model)
    g = torch.Generator().manual_seed(1)
    batch = module.on_after_batch_transfer(batch_with_an_empty_image(g, size=size), 0)
    losses = module.detector.loss(module.detector(batch["images"], batch), batch, size)
    assert "loss" in losses and len(losses) > 1
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    no_grad = [n for n, p in module.detector.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient (DDP would refuse them): {no_grad[:3]}"

    # a batch without any box at all (M = 0) trains too
    empty = {**batch, **{k: batch[k][:, :0] for k in ("boxes", "labels", "mask", "weights", "difficult")}}
    losses = module.detector.loss(module.detector(empty["images"], empty), empty, size)
    assert torch.isfinite(losses["loss"])

    module.eval()
    with torch.no_grad():
        preds = module.detector.predict(module.detector(batch["images"]), size)
    assert_predictions_keep_the_contract(preds, 2, size, module.detector.head.max_detections)


@pytest.mark.parametrize("backbone,attention", [("mobilenet_v2", "se"), ("darknet19", "cbam")])
def test_attention_is_one_config_line(backbone, attention):
    plain, with_attention = build("ssdlite", backbone), build("ssdlite", backbone, f"backbone.attention={attention}")
    added = [n for n, _ in with_attention.detector.named_parameters() if "attention" in n]
    assert added and not [n for n, _ in plain.detector.named_parameters() if "attention" in n]
    g = torch.Generator().manual_seed(2)
    batch = with_attention.on_after_batch_transfer(batch_with_an_empty_image(g), 0)
    with_attention.detector.loss(with_attention.detector(batch["images"]), batch, SIZE)["loss"].backward()
    assert all(p.grad is not None for n, p in with_attention.detector.named_parameters() if "attention" in n)


# every loss term a head takes, each once (the others at the head's defaults), on the cheapest model of each
# head; loss.obj only where there is objectness
LOSS_CASES = {
    "yolov1": [*(f"loss.box={b}" for b in ("sse", "smooth_l1", "l1", "iou", "giou", "diou", "ciou")),
               *(f"loss.cls={c}" for c in ("sse", "ce", "softmax_focal", "bce", "focal")),
               *(f"loss.obj={o}" for o in ("sse", "bce", "focal"))],
    "ssdlite": [*(f"loss.box={b}" for b in ("smooth_l1", "l1", "sse", "iou", "giou", "diou", "ciou")),
                *(f"loss.cls={c}" for c in ("ce", "softmax_focal", "bce", "focal"))],
    "yolov2": [*(f"loss.box={b}" for b in ("sse", "smooth_l1", "l1", "iou", "giou", "diou", "ciou")),
               *(f"loss.cls={c}" for c in ("ce", "softmax_focal", "bce", "focal")),
               *(f"loss.obj={o}" for o in ("bce", "sse", "focal"))],
    "yolov3": [*(f"loss.box={b}" for b in ("sse", "smooth_l1", "l1", "iou", "giou", "diou", "ciou")),
               "loss.box=smooth_l1 head.xy_bce=false",
               *(f"loss.cls={c}" for c in ("bce", "focal", "ce", "softmax_focal")),
               *(f"loss.obj={o}" for o in ("bce", "sse", "focal"))],
    # box: both stages; cls: the RoI head's; obj: the RPN's objectness
    "faster_rcnn": [*(f"loss.box={b}" for b in ("smooth_l1", "l1", "sse", "iou", "giou", "diou", "ciou")),
                    *(f"loss.cls={c}" for c in ("ce", "softmax_focal", "bce", "focal")),
                    *(f"loss.obj={o}" for o in ("bce", "sse", "focal"))],
}


def quick_loss_cases(cases: list[str]) -> set[str]:
    """Per head, the first case of each term (box, cls, obj) and the IoU-family box loss on decoded boxes:
    the quick tier's share; ``pytest -m slow`` runs every case."""
    first = {}
    for case in cases:
        first.setdefault(case.split("=")[0], case)
    return {*first.values(), *(c for c in cases if c == "loss.box=giou")}


LOSS_MATRIX = [pytest.param(m, loss, id=f"{m}-{loss}", marks=() if loss in quick_loss_cases(cases) else pytest.mark.slow)
               for m, cases in LOSS_CASES.items() for loss in cases]


@pytest.mark.parametrize("model,loss", LOSS_MATRIX)
def test_every_loss_of_every_head_trains_a_step(model, loss):
    torch.manual_seed(0)
    module = build(model, "mobilenet_v1", *loss.split(), "backbone.width_mult=0.25")  # a case may set two keys
    module.train()
    size = size_of(model)
    batch = batch_with_an_empty_image(torch.Generator().manual_seed(3), size=size)
    batch["boxes"] = batch["boxes"] * batch["mask"][..., None]  # padding is zeros, as collate_detection writes it
    batch = module.on_after_batch_transfer(batch, 0)
    losses = module.detector.loss(module.detector(batch["images"], batch), batch, size)
    assert all(torch.isfinite(v).all() for v in losses.values()) and losses["loss"] > 0
    losses["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.detector.parameters())
    empty = {**batch, **{k: batch[k][:, :0] for k in ("boxes", "labels", "mask", "weights", "difficult")}}
    assert torch.isfinite(module.detector.loss(module.detector(empty["images"], empty), empty, size)["loss"])
    module.eval()
    with torch.no_grad():
        preds = module.detector.predict(module.detector(batch["images"]), size)
    assert_predictions_keep_the_contract(preds, 2, size, module.detector.head.max_detections)


@pytest.mark.parametrize("model,loss,message", [
    ("ssdlite", "loss.obj=bce", "loss.obj=bce does not fit the SSD head: it has no obj term"),
    ("yolov2", "loss.box=mse", r"loss.box=mse does not fit the YOLOv2 head: it takes loss.box among \['smooth_l1'"),
    ("faster_rcnn", "loss.cls=sse", r"loss.cls=sse does not fit the Faster R-CNN head: it takes loss.cls among \['ce'"),
])
def test_a_loss_the_head_cannot_take_stops_the_build_in_one_line(model, loss, message):
    # Hydra wraps what the constructor raised: the head's own ValueError, with the one line
    with pytest.raises(InstantiationException, match=message) as raised:
        build(model, "mobilenet_v1", loss)
    assert isinstance(raised.value.__cause__, ValueError)
    assert re.match(message, str(raised.value.__cause__))
