"""A checkpoint's network as an ONNX model: images in, decoded boxes and per-class scores out, or
detections after NMS inside the graph.

    python -m detectors.export ckpt_path=PATH [format=onnx] [nms=false|true] [output=PATH] [opset=17]
        [image_size=[H,W]] [input_dtype=uint8|float32] [check_images=PATH]

The graph (``ExportedDetector``):

* input ``images`` (B, 3, H, W), RGB, uint8 (or float32 with the same 0..255 values), already resized to
  the model's input as evaluation resizes (the checkpoint's ``augment.eval_resize``: a stretch to H x W,
  or a letterbox: the longer side scaled to fit, centred, padded with ``augment.fill``); the batch axis
  is dynamic; the module's normalisation (mean/std) is the graph's first step.
* ``nms=false``: ``boxes`` (B, N, 4) xyxy in pixels of the input, clipped to it, and ``scores`` (B, N, C)
  per foreground class: the head's ``decode_scores``, everything its ``predict`` feeds to NMS.
* ``nms=true``: ``detections`` (B, K, 6) rows [x1, y1, x2, y2, score, label], K = the head's
  ``max_detections``, descending score, zero rows after ``num_detections`` (B,) int64: the head's
  ``predict`` in the graph (top ``pre_nms_top_k`` per class, ONNX ``NonMaxSuppression`` per image and
  class, the best K per image).

The export runs the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``): it serves every
torch this project supports (2.4 on) without onnxscript, exports in about a second, and takes the NMS
op from a ``symbolic`` (``BatchedNMS``). It is deprecated since torch 2.9 (still in 2.14); where a torch
no longer has it, the export stops with a line that says so.
"""

from detectors.export.check import CheckResult, Tolerance, compare_decoded, compare_detections, run_check
from detectors.export.graph import (
    DEFAULT_OPSET,
    BatchedNMS,
    ExportedDetector,
    ExportError,
    NMSSettings,
    check_exportable,
    export_onnx,
    nms_detections,
    onnx_session,
)

__all__ = [
    "DEFAULT_OPSET", "BatchedNMS", "CheckResult", "ExportError", "ExportedDetector", "NMSSettings", "Tolerance",
    "check_exportable", "compare_decoded", "compare_detections", "export_onnx", "nms_detections", "onnx_session",
    "run_check",
]
