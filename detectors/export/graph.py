"""The ONNX graph of a detector: normalisation, network, the head's ``decode_scores`` and optionally the
NMS (``ExportedDetector``), and the export itself (``export_onnx``); see ``detectors.export``."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.postprocess import grouped_nms

log = logging.getLogger(__name__)

#: the opset written unless ``opset=`` says otherwise (ONNX Runtime >= 1.12, TensorRT 8.5 and later read it)
DEFAULT_OPSET = 17
#: NonMaxSuppression's batched form (the one ``BatchedNMS`` emits) came with opset 11
MIN_OPSET = 11
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


class ExportError(ValueError):
    """What stops an export, in one line: a head that cannot be exported, a setting the model cannot take."""


@dataclass(frozen=True)
class NMSSettings:
    """The post-process of ``postprocess.multiclass_nms`` (the heads' defaults come from ``from_head``)."""

    score_threshold: float
    iou_threshold: float
    pre_nms_top_k: int
    max_detections: int

    @classmethod
    def from_head(cls, head: nn.Module, overrides: Mapping[str, Any] | None = None) -> NMSSettings:
        """The head's own decoding settings, each replaced by ``overrides[name]`` where that is not None."""
        own = {"score_threshold": head.score_threshold, "iou_threshold": head.nms_threshold,
               "pre_nms_top_k": head.pre_nms_top_k, "max_detections": head.max_detections}
        chosen = {k: v if (overrides or {}).get(k) is None else overrides[k] for k, v in own.items()}
        return cls(float(chosen["score_threshold"]), float(chosen["iou_threshold"]), int(chosen["pre_nms_top_k"]),
                   int(chosen["max_detections"]))


def check_exportable(detector: nn.Module) -> None:
    """ExportError (one line) unless the detector's head decodes to (boxes, scores) in one method."""
    head = getattr(detector, "head", None)
    if not callable(getattr(head, "decode_scores", None)):
        raise ExportError(
            f"{type(head).__name__} cannot be exported: it has no decode_scores(raw, image_size) -> (boxes, scores) "
            "(export covers one-stage heads, whose outputs decode to a fixed number of boxes per image)")


class BatchedNMS(torch.autograd.Function):
    """ONNX's ``NonMaxSuppression`` as a traceable op: greedy NMS in every (batch, class) group.

    boxes (G, k, 4) xyxy; scores (G, 1, k) in descending order along k (top-k's output, which the eager
    path below relies on) -> selected (S, 3) int64 rows [group, 0, box]: the boxes scored above
    ``score_threshold`` that no higher-scored box of their group overlaps by IoU > ``iou_threshold``,
    at most ``max_per_group`` a group. In eager mode (and while tracing) it is ``postprocess.grouped_nms``,
    what ``torchvision.ops.nms`` keeps; exported, ONNX Runtime's kernel, which suppresses and thresholds
    by the same strict comparisons.
    """

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, max_per_group: Tensor, iou_threshold: Tensor,
                score_threshold: Tensor) -> Tensor:
        scores = scores[:, 0]
        kept = grouped_nms(boxes, scores, scores > float(score_threshold), float(iou_threshold))
        kept &= torch.cumsum(kept, 1) <= int(max_per_group)
        group, box = kept.nonzero().unbind(1)
        return torch.stack([group, torch.zeros_like(group), box], 1)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_group: Any, iou_threshold: Any,
                 score_threshold: Any) -> Any:
        # center_point_box=0: corners in any order of axes; IoU is the same for xyxy as for yxyx
        return g.op("NonMaxSuppression", boxes, scores, max_per_group, iou_threshold, score_threshold)


def nms_detections(boxes: Tensor, scores: Tensor, settings: NMSSettings) -> tuple[Tensor, Tensor]:
    """``multiclass_nms`` in traceable, batch-agnostic tensor ops: per image and class the top
    ``pre_nms_top_k`` scores, ``BatchedNMS`` over the (image x class) groups, then each image's best
    ``max_detections`` kept boxes (descending score; ties: lower class, then higher top-k rank first).

    boxes (B, N, 4), scores (B, N, C) -> detections (B, max_detections, 6) [x1, y1, x2, y2, score,
    label], zero rows after each image's count, and num_detections (B,) int64."""
    _, anchors, classes = scores.shape
    k = min(settings.pre_nms_top_k, anchors)
    top_scores, top_index = scores.transpose(1, 2).topk(k, dim=2)  # (B, C, k)
    top_boxes = boxes.gather(1, top_index.reshape(-1, classes * k, 1).expand(-1, -1, 4))  # (B, C k, 4)
    group_scores = top_scores.reshape(-1, 1, k)
    selected = BatchedNMS.apply(top_boxes.reshape(-1, k, 4), group_scores, torch.tensor([k]),
                                torch.tensor([settings.iou_threshold], dtype=torch.float32),
                                torch.tensor([settings.score_threshold], dtype=torch.float32))
    flat = selected[:, 0] * k + selected[:, 2]  # group * k + rank: (image, class, rank) in row-major order
    kept = torch.zeros_like(group_scores.reshape(-1)).index_fill(0, flat, 1.0).reshape(-1, classes * k)
    # kept scores are > score_threshold; the rest sort below every kept one
    ranked = torch.where(kept > 0, top_scores.reshape(-1, classes * k), torch.full_like(kept, -1.0))
    count = min(settings.max_detections, classes * k)
    best, index = ranked.topk(count, dim=1)  # ties: the lower index, i.e. lower class, then rank
    valid = kept.gather(1, index)
    det_boxes = top_boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    labels = torch.div(index, k, rounding_mode="floor").to(boxes.dtype)
    detections = torch.cat([det_boxes, best.unsqueeze(-1), labels.unsqueeze(-1)], -1) * valid.unsqueeze(-1)
    if count < settings.max_detections:  # fewer candidates than max_detections: zero rows to the full K
        detections = F.pad(detections, (0, 0, 0, settings.max_detections - count))
    return detections, valid.sum(1).long()


class ExportedDetector(nn.Module):
    """What the ONNX graph computes: images (B, 3, H, W) uint8 or float 0..255 RGB at ``image_size`` ->
    normalised -> detector -> ``head.decode_scores`` -> (boxes (B, N, 4), scores (B, N, C)), or with
    ``nms`` (detections (B, K, 6), num_detections (B,)) from ``nms_detections``.

    mean, std: (1, 3, 1, 1) on the 0..255 scale (``DetectionModule``'s buffers). The detector is shared,
    not copied, and put in eval mode."""

    def __init__(self, detector: nn.Module, mean: Tensor, std: Tensor, image_size: tuple[int, int],
                 nms: NMSSettings | None = None):
        super().__init__()
        check_exportable(detector)
        self.detector = detector
        self.register_buffer("mean", mean.detach().float().reshape(1, 3, 1, 1).clone())
        self.register_buffer("std", std.detach().float().reshape(1, 3, 1, 1).clone())
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.nms = nms
        self.eval()  # inference only: BatchNorm's running statistics, no dropout

    @classmethod
    def from_module(cls, module: nn.Module, image_size: tuple[int, int] | None = None,
                    nms: NMSSettings | None = None) -> ExportedDetector:
        """From a ``DetectionModule``: its detector, normalisation and (by default) input size."""
        return cls(module.detector, module.mean, module.std, image_size or module.input_size, nms)

    @property
    def output_names(self) -> list[str]:
        return ["detections", "num_detections"] if self.nms is not None else ["boxes", "scores"]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = (images.float() - self.mean) / self.std
        boxes, scores = self.detector.head.decode_scores(self.detector(x), self.image_size)
        if self.nms is None:
            return boxes, scores
        return nms_detections(boxes, scores, self.nms)


def export_onnx(model: ExportedDetector, path: str | Path, opset: int = DEFAULT_OPSET, input_dtype: str = "uint8",
                trace_batch: int = 1, metadata: Mapping[str, str] | None = None) -> Path:
    """Trace ``model`` (eval mode) on a batch of ``trace_batch`` images and write it to ``path`` with a
    dynamic batch axis on the input and every output; ``metadata`` goes into the model's
    ``metadata_props`` (strings). Returns the path."""
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: NonMaxSuppression's batched form needs opset >= {MIN_OPSET}")
    parameters = inspect.signature(torch.onnx.export).parameters
    # torch 2.5 to 2.8 default to this exporter, 2.9 on to the dynamo one (dynamo=False still selects it);
    # before 2.5 it is the only one and there is no such argument
    if "dynamo" not in parameters and "autograd_inlining" not in parameters:
        raise ExportError(f"torch {torch.__version__}'s torch.onnx.export has no TorchScript-based path, which "
                          "this export uses (torch 2.4 to 2.14 have it)")
    kwargs: dict[str, Any] = {"dynamo": False} if "dynamo" in parameters else {}
    # autograd_inlining=False: BatchedNMS stays one op for its symbolic (inlined, the tracer would record the
    # eager NMS's host reads inside it, and the exporter's peephole pass fails on them)
    if "autograd_inlining" in parameters:
        kwargs["autograd_inlining"] = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(trace_batch, 3, *model.image_size, dtype=INPUT_DTYPES[input_dtype])
    names = model.output_names
    modes = {m: m.training for m in model.modules()}  # restored after: the detector may be a module's in use
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the exporter's deprecation notice and the tracer's "constant in the trace" notes: the priors,
            # anchors and grids are constants of a fixed input size, which is what is wanted here
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # clip_boxes' strided slices
            try:
                torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in ["images", *names]}, opset_version=opset,
                                  do_constant_folding=True, **kwargs)
            except RuntimeError as e:
                if "Unsupported onnx_opset_version" in str(e):  # newer than this torch's exporter knows
                    raise ExportError(f"opset {opset}: {str(e).splitlines()[0]} in torch {torch.__version__}") from None
                raise
            shapes = [tuple(t.shape[1:]) for t in model(example)]
    finally:
        for m, training in modes.items():
            m.training = training
    import onnx

    proto = onnx.load(str(path))
    # the exporter's shape inference loses N and K behind strided slices and pads; they are fixed by the
    # input size, so the file states them (runtimes that plan memory, e.g. TensorRT, want them)
    for output, shape in zip(proto.graph.output, shapes):
        for dim, size in zip(output.type.tensor_type.shape.dim[1:], shape):
            dim.Clear()
            dim.dim_value = size
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path``, with ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
