"""Whether ONNX Runtime computes what PyTorch computes: the decoded outputs element by element, the
detections after NMS as sets (``compare_detections``' rules), at fixed tolerances and, where those are
exceeded, against PyTorch's own float32 error (``run_check``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detectors.export.graph import ExportedDetector, NMSSettings, onnx_session
from detectors.postprocess import multiclass_nms

FAILED = "  FAILED"
#: past the fixed tolerances, ONNX Runtime may be off PyTorch's float32 outputs by this many times PyTorch's
#: own float32 error (its largest distance to the float64 outputs): two results within e of the exact
#: ones are within 2 e of each other
FP64_FACTOR = 2.0
#: IoUs this close to the NMS threshold may be decided either way by float rounding
IOU_ROUNDING = 1e-4


@dataclass(frozen=True)
class Tolerance:
    """How far ONNX Runtime may be from PyTorch: ``box`` in pixels per pixel of the input's longer side
    (1e-4: 0.032 px at 320), ``score`` absolute; detections after NMS are the same box at IoU > ``iou``
    (or every coordinate within the box tolerance: a zero-area box has no IoU)."""

    box: float = 1e-4
    score: float = 1e-4
    iou: float = 0.99

    def box_px(self, image_size: tuple[int, int]) -> float:
        return self.box * max(image_size)


@dataclass
class CheckResult:
    """``lines`` to print; ``ok``: every number within its tolerance."""

    ok: bool
    lines: list[str]


def compare_decoded(onnx_boxes: Tensor, onnx_scores: Tensor, boxes: Tensor, scores: Tensor,
                    image_size: tuple[int, int], tolerance: Tolerance) -> CheckResult:
    """The decoded outputs, element by element: (B, N, 4) boxes and (B, N, C) scores of both runtimes."""
    box_limit = tolerance.box_px(image_size)
    if onnx_boxes.shape != boxes.shape or onnx_scores.shape != scores.shape:
        return CheckResult(False, [f"shapes differ: ONNX boxes {tuple(onnx_boxes.shape)}, scores "
                                   f"{tuple(onnx_scores.shape)}; PyTorch {tuple(boxes.shape)}, {tuple(scores.shape)}"])
    box_diff = float((onnx_boxes - boxes).abs().max()) if boxes.numel() else 0.0
    score_diff = float((onnx_scores - scores).abs().max()) if scores.numel() else 0.0
    box_ok, score_ok = box_diff <= box_limit, score_diff <= tolerance.score  # NaN fails
    return CheckResult(box_ok and score_ok, [
        f"boxes  (B, N, 4) = {tuple(boxes.shape)}: max |ONNX - PyTorch| {box_diff:.3g} px "
        f"(tolerance {box_limit:.3g} px = {tolerance.box:.3g} x {max(image_size)}){'' if box_ok else FAILED}",
        f"scores (B, N, C) = {tuple(scores.shape)}: max |ONNX - PyTorch| {score_diff:.3g} "
        f"(tolerance {tolerance.score:.3g}){'' if score_ok else FAILED}"])


def compare_detections(onnx_detections: Tensor, onnx_counts: Tensor, preds: list[dict[str, Tensor]],
                       candidates: tuple[Tensor, Tensor], settings: NMSSettings, tolerance: Tolerance,
                       image_size: tuple[int, int]) -> CheckResult:
    """ONNX's ``detections`` (B, K, 6) and ``num_detections`` (B,) against PyTorch's ``multiclass_nms``
    per image (``preds``), which ran on ``candidates``: PyTorch's decoded (boxes (B, N, 4), scores (B, N, C)).

    Every detection must find one of the other side with the same label, the same box (``Tolerance``) and
    a score within ``tolerance.score``, except where float rounding or the order of equal scores decides
    what NMS keeps (both runtimes are right there; such detections are counted, not failed):

    * at a threshold: a score within ``tolerance.score`` of the score threshold, of its class's
      ``pre_nms_top_k``-th candidate score, or of the image's lowest when ``max_detections`` cut it;
    * by NMS order: a detection kept on one side that a kept detection ``e`` of the other side, of its
      class and no lower score, overlaps by IoU > the NMS threshold (less ``IOU_ROUNDING``), where ``e`` is
      itself unmatched with an equal score (a tie taken in the other order: a flat image region scores
      its cells alike) or already excused (a cascade), or their IoU is within ``IOU_ROUNDING`` of the threshold.

    An ONNX detection that is not one of PyTorch's candidates (same box and label, score within
    ``tolerance.score``) is never excused."""
    px = tolerance.box_px(image_size)
    totals = {"pytorch": 0, "onnx": 0, "matched": 0, "one side": 0, "unmatched": 0}
    box_diff = score_diff = 0.0
    examples: list[str] = []
    for i, pred in enumerate(preds):
        n = int(onnx_counts[i])
        sides = [(pred["boxes"].float(), pred["scores"].float(), pred["labels"].long()),
                 (onnx_detections[i, :n, :4], onnx_detections[i, :n, 4], onnx_detections[i, :n, 5].round().long())]
        totals["pytorch"] += len(sides[0][1])
        totals["onnx"] += n
        pairs = _match(sides, tolerance, px)
        for a, b in pairs:
            box_diff = max(box_diff, float((sides[0][0][a] - sides[1][0][b]).abs().max()))
            score_diff = max(score_diff, float((sides[0][1][a] - sides[1][1][b]).abs()))
        totals["matched"] += len(pairs)
        unmatched = [sorted(set(range(len(side[1]))) - {p[s] for p in pairs}) for s, side in enumerate(sides)]
        totals["one side"] += sum(map(len, unmatched))
        for s, j, reason in _unexplained(sides, unmatched, (candidates[0][i], candidates[1][i]), settings,
                                         tolerance, px):
            totals["unmatched"] += 1
            if len(examples) < 5:
                boxes, scores, labels = sides[s]
                examples.append(f"image {i}: only in {('PyTorch', 'ONNX')[s]} ({reason}): label {int(labels[j])} "
                                f"score {float(scores[j]):.6f} box {[round(v, 2) for v in boxes[j].tolist()]}")
    ok = totals["unmatched"] == 0
    lines = [f"detections: {totals['pytorch']} in PyTorch, {totals['onnx']} in ONNX; {totals['matched']} matched "
             f"(same label, IoU > {tolerance.iou:g} or within {px:.3g} px, "
             f"|score difference| <= {tolerance.score:.3g}), "
             f"{totals['one side'] - totals['unmatched']} on one side only where rounding or the order of equal "
             f"scores decides, {totals['unmatched']} otherwise{'' if ok else FAILED}",
             f"matched detections: max box difference {box_diff:.3g} px, max score difference {score_diff:.3g}",
             *examples]
    return CheckResult(ok, lines)


def _same_boxes(a: Tensor, b: Tensor, tolerance: Tolerance, px: float) -> Tensor:
    """(n, m) bool: a[i] and b[j] are the same box (IoU > ``tolerance.iou``, or every coordinate within ``px``)."""
    return (box_iou(a, b) > tolerance.iou) | ((a[:, None] - b[None]).abs().amax(-1) <= px)


def _match(sides: list[tuple[Tensor, Tensor, Tensor]], tolerance: Tolerance, px: float) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs (PyTorch index, ONNX index) of the same box and label and scores within
    ``tolerance.score``: in PyTorch's (descending score) order, each to its best-IoU free one."""
    (boxes, scores, labels), (other_boxes, other_scores, other_labels) = sides
    iou = box_iou(boxes, other_boxes)
    close = ((labels[:, None] == other_labels[None]) & _same_boxes(boxes, other_boxes, tolerance, px)
             & ((scores[:, None] - other_scores[None]).abs() <= tolerance.score))
    taken = torch.zeros(len(other_scores), dtype=torch.bool)
    pairs = []
    for a in range(len(scores)):
        free = (close[a] & ~taken).nonzero().squeeze(1)
        if len(free):
            b = int(free[iou[a, free].argmax()])
            taken[b] = True
            pairs.append((a, b))
    return pairs


def _unexplained(sides: list[tuple[Tensor, Tensor, Tensor]], unmatched: list[list[int]],
                 candidates: tuple[Tensor, Tensor], settings: NMSSettings, tolerance: Tolerance,
                 px: float) -> list[tuple[int, int, str]]:
    """(side, index, why) of the unmatched detections that neither a threshold nor the NMS order explains
    (``compare_detections``' rules), taken in descending score order so a cascade is followed."""
    boxes_c, scores_c = candidates  # (N, 4), (N, C) of one image
    kth = scores_c.topk(min(settings.pre_nms_top_k, len(scores_c)), dim=0).values[-1]  # (C,) each class's pre-NMS cut
    order = sorted(((float(sides[s][1][j]), s, j) for s in (0, 1) for j in unmatched[s]), reverse=True)
    excused: set[tuple[int, int]] = set()
    failures = []
    for score, s, j in order:
        box, label = sides[s][0][j], int(sides[s][2][j])
        if s == 1:  # an ONNX detection must be one of PyTorch's candidates
            same = _same_boxes(box[None], boxes_c, tolerance, px)[0] & ((scores_c[:, label] - score).abs()
                                                                         <= tolerance.score)
            if not same.any():
                failures.append((s, j, "not a PyTorch candidate"))
                continue
        near = [settings.score_threshold, float(kth[label])]
        if len(sides[s][1]) >= settings.max_detections:
            near.append(float(sides[s][1].min()))
        if any(abs(score - t) <= tolerance.score for t in near):
            excused.add((s, j))
            continue
        other = 1 - s
        boxes, scores, labels = sides[other]
        overlap = box_iou(box[None], boxes)[0]
        by = ((labels == label) & (scores >= score - tolerance.score)
              & (overlap > settings.iou_threshold - IOU_ROUNDING)).nonzero().squeeze(1).tolist()
        if any((e in unmatched[other] and abs(float(scores[e]) - score) <= tolerance.score)
               or (other, e) in excused or abs(float(overlap[e]) - settings.iou_threshold) <= IOU_ROUNDING
               for e in by):
            excused.add((s, j))
            continue
        failures.append((s, j, "kept on one side only"))
    return failures


def pytorch_decoded(module: nn.Module, images: Tensor, image_size: tuple[int, int],
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A ``DetectionModule``'s decoded outputs for uint8 ``images`` (B, 3, H, W): normalised as evaluation
    normalises, the network, ``head.decode_scores``. ``torch.float64``: the network in float64 on a copy
    (the heads decode its outputs in float32), the reference for PyTorch's own float32 error."""
    with torch.no_grad():
        if dtype == torch.float32:
            detector, x = module.detector, module.on_after_batch_transfer({"images": images}, 0)["images"]
        else:
            detector = copy.deepcopy(module.detector).to(dtype)
            x = (images.to(dtype) - module.mean.to(dtype)) / module.std.to(dtype)
        return detector.head.decode_scores(detector(x), image_size)


def run_check(path: str | Path, module: nn.Module, exported: ExportedDetector, images: Tensor, input_dtype: str,
              tolerance: Tolerance) -> CheckResult:
    """``path`` in ONNX Runtime against the checkpoint's ``module`` in PyTorch (``pytorch_decoded``; with
    NMS, ``multiclass_nms`` at the export's settings) on ``images`` (B, 3, H, W) uint8, as one batch.

    Past the fixed tolerances, PyTorch's own float32 error decides: the network runs again in float64, and
    the tolerances become ``FP64_FACTOR`` times PyTorch's largest distance to it where that is larger (an
    untrained deep network's activations reach 1e4, and a float32 sum of such terms is only as exact as the
    order it is added in: PyTorch and ONNX Runtime are then both that far from the exact values)."""
    session = onnx_session(path)
    feed = images.numpy() if input_dtype == "uint8" else images.float().numpy()
    outputs = [torch.from_numpy(o) for o in session.run(None, {"images": feed})]
    size = exported.image_size
    boxes, scores = pytorch_decoded(module, images, size)

    def compare(tol: Tolerance) -> CheckResult:
        if exported.nms is None:
            return compare_decoded(outputs[0], outputs[1], boxes, scores, size, tol)
        s = exported.nms
        preds = multiclass_nms(boxes, scores, s.score_threshold, s.iou_threshold, s.pre_nms_top_k, s.max_detections)
        return compare_detections(outputs[0], outputs[1], preds, (boxes, scores), s, tol, size)

    result = compare(tolerance)
    if result.ok:
        return result
    boxes64, scores64 = pytorch_decoded(module, images, size, torch.float64)
    box_error, score_error = float((boxes - boxes64).abs().max()), float((scores - scores64).abs().max())
    widened = replace(tolerance, box=max(tolerance.box, FP64_FACTOR * box_error / max(size)),
                      score=max(tolerance.score, FP64_FACTOR * score_error))
    again = compare(widened)
    return CheckResult(again.ok, [
        *(line.replace(FAILED, "  (over)") for line in result.lines),
        f"over the tolerances: PyTorch's own float32 error (its distance to the network in float64) is {box_error:.3g} "
        f"px on boxes, {score_error:.3g} on scores; at {FP64_FACTOR:g} times that:", *again.lines])
