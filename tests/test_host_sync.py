"""No host waits in a training step (DESIGN.md: "no host sync in a step"; issue 25).

One training step of every model config (configs/model/*.yaml) -- the module's on-device batch ops
(normalise, multi-scale shrink, mixup), the detector's forward with the targets, the loss, the backward --
runs under ``HostSyncSpy``, a ``TorchFunctionMode`` that sees every torch call from Python and records
each one that makes the host wait for the device on a GPU:

* reads of a tensor's values on the host: ``item``, ``tolist``, ``numpy``, ``cpu``, ``bool(t)`` (an
  ``if t:``), ``int(t)``, ``float(t)``, a tensor used as an index (``__index__``), ``torch.equal``, ...;
* ops whose output shape depends on the values: ``nonzero``, one-argument ``where``, ``unique``,
  ``masked_select``, indexing with a boolean mask (read or written), ``repeat_interleave`` without
  ``output_size``, ``bincount``;
* tensors made from Python data on a device (``torch.tensor(..., device=...)``): a blocking
  host-to-device copy, which waits for the device's queue.

On the CPU nothing waits, so the spy is how a CPU-only run proves the GPU path: every head's training
step must record nothing. The spied step is a run's second: the first makes what is then kept per shape,
device and dtype (anchors, a coder's weights on the device, the NMS threshold), once in a run, as
DESIGN.md has it ("cached by shape"); a cache that missed every step would show here. No exception is needed: Faster R-CNN's RPN runs its NMS with
``grouped_nms(strategy="scan")`` (exact greedy NMS in a fixed number of tensor steps, no host read), so
torchvision's ``nms`` (whose kernels decide on the host) is not called in training.
Where a GPU is present the same step also runs under ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any synchronising CUDA call (a device-to-host copy, a blocking copy, a stream sync).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.overrides import TorchFunctionMode

import detectors  # noqa: F401  (resolvers)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PACKAGE = str(Path(detectors.__file__).resolve().parent)
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
NUM_CLASSES = 3
# (the size the loader delivers, the multi-scale size the module shrinks it to): small, non-square; SSD300
# takes 257 px and more, YOLOv2's and YOLOv3's grids multiples of 32, Faster R-CNN multiples of 16; YOLOv1's
# FC is built for one size (no multi-scale: its step runs at the size it is built for)
SIZES = {"ssd300": ((288, 320), (264, 296)), "ssd512": ((288, 320), (264, 296)), "ssdlite": ((288, 320), (264, 296)),
         "yolov1": ((224, 288), None), "yolov2": ((320, 352), (288, 320)), "yolov3": ((320, 352), (288, 320)),
         "faster_rcnn": ((288, 320), (256, 288)), "yolov2_tiny": ((320, 352), (288, 320)),
         "yolov3_tiny": ((320, 352), (288, 320))}
# narrow heads and small backbones keep the steps fast; the host reads live in the heads' targets, losses and
# proposal selection, which these keep (the model's own backbone where it is cheap)
OVERRIDES = {"ssd300": ["backbone=mobilenet_v1", "backbone.width_mult=0.25"],
             "ssd512": ["backbone=mobilenet_v1", "backbone.width_mult=0.25"],
             "yolov1": ["head.channels=64", "head.fc_width=32", "backbone=mobilenet_v1", "backbone.width_mult=0.25"],
             "yolov2": ["neck.channels=64", "backbone=mobilenet_v1", "backbone.width_mult=0.25"],
             "yolov3": ["neck.channels=32", "backbone=mobilenet_v1", "backbone.width_mult=0.25"],
             # the tiny YOLOs on their own tiny trunk (cheap already), their necks narrowed
             "yolov2_tiny": ["neck.channels=32"], "yolov3_tiny": ["neck.channels=32"],
             "faster_rcnn": ["backbone=mobilenet_v1", "backbone.width_mult=0.25", "head.fc_width=32",
                             "head.rpn_channels=32", "head.roi_batch_size=64",
                             "head.rpn_pre_nms_top_k={train: 300, test: 300}",
                             "head.rpn_post_nms_top_k={train: 200, test: 100}"]}

#: calls that read a tensor's values on the host
HOST_READS = frozenset({"item", "tolist", "numpy", "__array__", "cpu", "__bool__", "__int__", "__float__", "__index__",
                        "__complex__", "__repr__", "__format__", "equal", "allclose"})
#: calls whose output's shape depends on the values (the device's count is read back)
DATA_SHAPED = frozenset({"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"})
INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})
FROM_HOST_DATA = frozenset({"tensor", "as_tensor", "asarray", "new_tensor"})


def _has_bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_bool_index(i) for i in index)
    return False


def _where_in_package() -> str:
    """file:line of the innermost frame in ``detectors/`` (else the innermost outside this file)."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PACKAGE):
            return f"{Path(path).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno} ({frame.f_code.co_name})"
        if fallback is None and path != __file__ and "torch/" not in path:
            fallback = f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


class HostSyncSpy(TorchFunctionMode):
    """Records every torch call that would make the host wait for a GPU (module docstring):
    ``calls`` holds (what, where) pairs, where = the innermost ``detectors/`` file and line."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def reason(self, name: str, args: tuple, kwargs: dict) -> str | None:
        if name in HOST_READS:
            return f"host read: {name}"
        if name in DATA_SHAPED:
            return f"data-dependent shape: {name}"
        if name == "where" and len(args) + len(kwargs) == 1:
            return "data-dependent shape: where(condition)"
        if name == "repeat_interleave" and "output_size" not in kwargs and (
                len(args) > 1 and isinstance(args[1], torch.Tensor) or isinstance(kwargs.get("repeats"), torch.Tensor)):
            return "data-dependent shape: repeat_interleave without output_size"
        if name in INDEXING and len(args) > 1 and _has_bool_index(args[1]):
            return f"data-dependent shape: boolean-mask indexing ({name})"
        if name in FROM_HOST_DATA and "device" in kwargs:
            data = args[0] if args else kwargs.get("data")
            if not isinstance(data, torch.Tensor):
                return f"blocking host-to-device copy: {name}(<python data>, device=...)"
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = self.reason(getattr(func, "__name__", ""), args, kwargs)
        if why is not None:
            self.calls.append((why, _where_in_package()))
        return func(*args, **kwargs)


def build(model: str, *extra: str):
    delivered, shrunk = SIZES[model]
    size = shrunk or delivered
    multiscale = [f"multiscale.sizes=[[{shrunk[0]},{shrunk[1]}]]", "multiscale.every_n_batches=1"] if shrunk else [
        "multiscale.sizes=null"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", f"model={model}", f"input_size=[{size[0]},{size[1]}]",
                                          *multiscale, "mixup.prob=1.0", *OVERRIDES.get(model, []), *extra])
    with open_dict(cfg):
        cfg.data.classes = [f"c{i}" for i in range(NUM_CLASSES)]
    return hydra.utils.instantiate(cfg.model)


def loader_batch(size: tuple[int, int], device: torch.device, boxes_per_image: int = 4) -> dict:
    """What ``collate_detection`` delivers (uint8 images, padded targets, frames), the second image with
    fewer boxes than the first (padding) and the third with none."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    xy = torch.rand(3, boxes_per_image, 2, generator=g) * torch.tensor([w, h]) * 0.6
    wh = torch.rand(3, boxes_per_image, 2, generator=g) * 80 + 12
    mask = torch.ones(3, boxes_per_image, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False
    batch = {
        "images": torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=g),
        "boxes": torch.cat([xy, xy + wh], -1) * mask[..., None],
        "labels": torch.randint(0, NUM_CLASSES, (3, boxes_per_image), generator=g).masked_fill(~mask, -1),
        "mask": mask,
        "weights": mask.float(),
        "difficult": torch.zeros(3, boxes_per_image, dtype=torch.bool),
        "iscrowd": torch.zeros(3, boxes_per_image, dtype=torch.bool),
        "frames": torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3),
        "num_skipped": torch.tensor(0),
    }
    return {k: v.to(device) for k, v in batch.items()}


def training_step(module, batch: dict) -> dict:
    """What ``DetectionModule`` does with a training batch once it is on the device: the batch ops, then
    forward with the targets, the loss and the backward."""
    batch = module.on_after_batch_transfer(batch, 0)
    images = batch["images"]
    losses = module.detector.loss(module.detector(images, batch), batch, tuple(images.shape[-2:]))
    losses["loss"].backward()
    return losses


def spy_on_a_step(model: str, device: torch.device) -> tuple[list[tuple[str, str]], dict]:
    """The host syncs of a training step after the first: the first one fills what is made once per shape,
    device and dtype (anchors, the coders' weights on the device, the NMS threshold), as a run's first
    step does; every later step must wait for nothing."""
    torch.manual_seed(0)
    module = build(model).to(device).train()
    batch = loader_batch(SIZES[model][0], device)
    training_step(module, batch)
    module.zero_grad(set_to_none=True)
    with HostSyncSpy() as spy:
        losses = training_step(module, batch)
    return spy.calls, losses


@pytest.mark.parametrize("model", MODELS)
def test_a_training_step_reads_nothing_back_from_the_device(model):
    calls, losses = spy_on_a_step(model, torch.device("cpu"))
    assert not calls, f"{model}: {len(calls)} host syncs in a training step:\n" + "\n".join(
        f"  {why} at {where}" for why, where in calls)
    assert torch.isfinite(losses["loss"])


def test_the_spy_sees_what_it_counts():
    x = torch.arange(6.0)
    with HostSyncSpy() as spy:
        x.sum().item()
        x.tolist()
        if x.any():
            pass
        x[x > 2]
        x.nonzero()
        int(x[0])
        torch.tensor([1.0, 2.0], device=x.device)
        # none of these wait: fixed shapes, the data stays on the device
        torch.where(x > 2, x, 0.0)
        x.masked_fill(x > 2, 0.0)
        x[torch.arange(2)]
        torch.full((2,), 3.0, device=x.device)
    whats = [why for why, _ in spy.calls]
    assert whats == ["host read: item", "host read: tolist", "host read: __bool__",
                     "data-dependent shape: boolean-mask indexing (__getitem__)", "data-dependent shape: nonzero",
                     "host read: __int__", "blocking host-to-device copy: tensor(<python data>, device=...)"]


def test_the_rpn_proposals_of_a_training_step_are_the_per_image_nms_ones_without_a_host_read():
    """The RPN's selection as a training step runs it (``nms_strategy="scan"``) keeps what per-image
    ``torchvision.ops.nms`` keeps (the evaluation's way: one call per image), and reads nothing back."""
    from detectors.anchors import RPNAnchors
    from detectors.boxes import DeltaBoxCoder
    from detectors.heads.rpn import select_proposals

    g = torch.Generator().manual_seed(0)
    anchors = RPNAnchors(sizes=(32, 64, 128))((12, 16), 16)
    objectness = torch.randn(3, anchors.shape[0], generator=g) * 3
    deltas = torch.randn(3, anchors.shape[0], 4, generator=g) * 0.5
    deltas[:, ::7, 2] = -20.0  # tiny boxes, dropped by the min-size rule: invalid candidates among the valid
    objectness[2] = -30.0  # an image whose candidates are all under the score threshold
    args = (objectness, deltas, anchors, DeltaBoxCoder((1.0, 1.0, 1.0, 1.0)), (192, 256), 1000, 1000, 0.7)
    expected = select_proposals(*args, min_size=1e-3, score_threshold=0.2)
    select_proposals(*args, nms_strategy="scan")  # a first step: the NMS threshold, computed once
    with HostSyncSpy() as spy:
        got = select_proposals(*args, min_size=1e-3, score_threshold=0.2, nms_strategy="scan")
    assert not spy.calls
    for e, o in zip(expected, got):
        assert torch.equal(e, o)
    assert 0 < int(got[2][0].sum()) < 1000 and not got[2][2].any()  # NMS dropped some; image 2 none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA sync check runs where one is present")
@pytest.mark.parametrize("model", MODELS)
def test_a_training_step_on_the_gpu_does_not_synchronise(model):
    device = torch.device("cuda")
    torch.manual_seed(0)
    module = build(model).to(device).train()
    batch = loader_batch(SIZES[model][0], device)
    training_step(module, batch)  # first step: cuDNN's choices, caches (anchors by shape), lazy inits
    module.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = training_step(module, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses["loss"]).item()
