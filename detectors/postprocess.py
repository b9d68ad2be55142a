"""decode -> top-k -> per-class NMS -> per-image results, shared by every head.

A head decodes its raw outputs into boxes and per-class scores for the whole batch; this keeps the
best ``pre_nms_top_k`` candidates per class and image above a score threshold, runs exact greedy NMS
inside every (image, class) group (what ``torchvision.ops.nms`` keeps on that group's candidates),
and cuts each image to its ``max_detections`` best: descending score, ties lower class first, then
top-k rank.

How the NMS runs (``choose_strategy``): on the CPU one ``nms`` call per non-empty (image, class) group
on its contiguous slice of the candidates, the fastest exact way there (the kernel skips boxes already
suppressed); off the CPU the tensorised exact greedy from ``TENSORISED_MIN_GROUPS`` groups on, since
every ``nms`` call on a GPU costs a host sync (``TENSORISED_MIN_GROUPS = None`` keeps the per-group
calls). Every one of ``STRATEGIES`` keeps exactly what per-group ``torchvision.ops.nms`` keeps. The
coordinate-offset ways (one ``nms`` over groups shifted apart, ``batched_nms``'s trick) are not exact: a
shift of up to groups x (largest coordinate + 1) rounds float32 coordinates, which flips IoU decisions
near the threshold (``tests/test_postprocess.py`` has one). The timings, and what ran before:
BENCHMARKS.md, "Decode + NMS strategies" (``benchmarks/nms.py``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torchvision.ops import nms

#: the ways ``grouped_nms`` can run; every one keeps exactly what per-group ``torchvision.ops.nms`` keeps.
#: ``scan`` is never chosen by the rule: a caller that must not wait for the device (a training step) asks for it
STRATEGIES = ("per_group", "tensorised", "scan")
#: IoU entries per chunk of groups in the tensorised path, per device type: on the CPU a chunk whose
#: temporaries stay in cache (2^20 entries; BENCHMARKS.md, "Decode + NMS strategies"); on a GPU 2^25
#: (128 MiB per float32 temporary, three at the peak)
TENSORISED_CHUNK = {"cpu": 1 << 20, "default": 1 << 25}
#: off the CPU, the tensorised path from this many non-empty groups on (None: never)
TENSORISED_MIN_GROUPS: int | None = 8


def multiclass_nms(boxes: Tensor, scores: Tensor, score_threshold: float, nms_threshold: float,
                   pre_nms_top_k: int, max_detections: int) -> list[dict[str, Tensor]]:
    """Per-class NMS over a batch.

    Args:
        boxes: (B, A, 4) xyxy, shared by every class (SSD, YOLO), or (B, A, C, 4) class-specific
            (an R-CNN head's per-class regression).
        scores: (B, A, C) per-class scores of foreground classes 0..C-1.
        score_threshold: candidates at or below it are dropped.
        nms_threshold: IoU above which a lower-scored box of the same image and class is suppressed.
        pre_nms_top_k: candidates kept per image and class before NMS.
        max_detections: boxes kept per image after NMS.

    Returns:
        one dict per image: boxes (N, 4), scores (N,) descending (ties: lower class first, then the
        top-k rank), labels (N,) 0..C-1.
    """
    top_scores, top_boxes = per_class_top_k(boxes, scores, pre_nms_top_k)
    kept = grouped_nms(top_boxes, top_scores, top_scores > score_threshold, nms_threshold)
    return kept_per_image(kept, top_boxes, top_scores, max_detections)


def per_class_top_k(boxes: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` anchors of every image and class, in descending score order:
    scores (B, C, k) and their boxes (B, C, k, 4)."""
    batch, num_anchors, classes = scores.shape
    k = min(k, num_anchors)
    top_scores, top_idx = scores.transpose(1, 2).topk(k, dim=2)  # (B, C, k)
    if boxes.dim() == 3:
        top_boxes = boxes.gather(1, top_idx.reshape(batch, classes * k, 1).expand(-1, -1, 4)).view(batch, classes, k, 4)
    else:  # (B, A, C, 4) -> (B, C, A, 4), then the class's own boxes of its top-k
        per_class = boxes.transpose(1, 2)
        top_boxes = per_class.gather(2, top_idx.unsqueeze(-1).expand(-1, -1, -1, 4))
    return top_scores, top_boxes


def grouped_nms(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float,
                strategy: str | None = None) -> Tensor:
    """Greedy NMS inside every group (one row of the leading dimensions: an image and class).

    Args:
        boxes: (..., k, 4) xyxy; scores: (..., k) in descending order along the last dimension (top-k's
            output); valid: (..., k) bool, the candidates (others neither kept nor suppressing).
        strategy: one of ``STRATEGIES``, or None for the module's rule (``choose_strategy``). ``scan`` reads
            nothing back from the device (no host sync: what a training step needs); the rule and the
            other strategies read the candidate counts (and ``tensorised`` its convergence) on the host.

    Returns:
        (..., k) bool: the candidates that ``torchvision.ops.nms`` keeps on each group's candidates.
    """
    flat_valid, flat_boxes = valid.flatten(0, -2), boxes.flatten(0, -3)  # (groups, k), (groups, k, 4)
    counts = None
    if strategy is None:
        counts = flat_valid.sum(1).tolist()
        strategy = choose_strategy(sum(counts), sum(n > 0 for n in counts), boxes.device, boxes.dtype)
    if strategy == "scan":  # first: nothing read from the device when asked for by name
        kept = _scan(flat_boxes, flat_valid, iou_threshold)
    elif strategy == "per_group":
        if counts is None:
            counts = flat_valid.sum(1).tolist()
        kept = _per_group(flat_boxes, scores.flatten(0, -2), flat_valid, counts, iou_threshold)
    elif strategy == "tensorised":
        kept = _tensorised(flat_boxes, flat_valid, iou_threshold)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    return kept.view_as(valid)


def choose_strategy(candidates: int, groups: int, device: torch.device, dtype: torch.dtype) -> str:
    """The rule of the module docstring: the ``STRATEGIES`` entry for ``candidates`` boxes in ``groups``
    non-empty (image, class) groups of ``dtype`` boxes on ``device``."""
    if (device.type != "cpu" and TENSORISED_MIN_GROUPS is not None and groups >= TENSORISED_MIN_GROUPS
            and dtype in (torch.float32, torch.float64)):
        return "tensorised"
    return "per_group"


def _per_group(boxes: Tensor, scores: Tensor, valid: Tensor, counts: list[int], iou_threshold: float) -> Tensor:
    """One ``torchvision.ops.nms`` call per non-empty group, on its candidates only (contiguous once
    compacted, so no search over the batch per group as ``batched_nms``'s own loop does)."""
    cand_boxes, cand_scores = boxes[valid], scores[valid]
    kept_cand = torch.zeros(len(cand_scores), dtype=torch.bool, device=boxes.device)
    start = 0
    for n in counts:
        if n == 1:
            kept_cand[start] = True
        elif n:
            kept_cand[start + nms(cand_boxes[start:start + n], cand_scores[start:start + n], iou_threshold)] = True
        start += n
    kept = torch.zeros_like(valid)
    kept[valid] = kept_cand
    return kept


def _tensorised(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy NMS vectorised over groups: the (g, k, k) matrix of "i suppresses j" per chunk of
    groups, then the fixed point of ``kept[j] = valid[j] and no kept i < j suppresses j``.

    The IoU is the one torchvision's CPU kernel computes, operation for operation in the boxes' dtype
    (areas (x2 - x1) * (y2 - y1); inter = max(0, min x2 - max x1) * max(0, min y2 - max y1);
    inter / (area_i + area_j - inter) > threshold, the threshold as the kernel compares it), so the
    kept boxes are the CPU kernel's bit for bit, on any device. (The CUDA kernel computes the same
    expression; if nvcc fuses a multiply-add in it, its IoU can differ in the last bit, so a pair
    within an ulp of the threshold could be decided otherwise: the GPU benchmark counts that.)

    The fixed point exists once and is the greedy result (rank j depends only on ranks < j);
    iterating from ``valid`` reaches it in at most (longest chain of suppressions) + 1 steps, each
    one batched matrix-vector product.
    """
    kept = torch.zeros_like(valid)
    used = valid.any(0).nonzero()
    if len(used) == 0:
        return kept
    width = int(used[-1]) + 1  # past the last candidate of any group: padding only
    active = valid[:, :width].any(1).nonzero().squeeze(1)  # non-empty groups
    threshold = _kernel_threshold(iou_threshold, boxes.device, boxes.dtype)
    budget = TENSORISED_CHUNK.get(boxes.device.type, TENSORISED_CHUNK["default"])
    chunk = max(1, budget // (width * width))
    later = torch.ones(width, width, dtype=torch.bool, device=boxes.device).triu_(1)  # j after i
    for part in active.split(chunk):
        v = valid[part, :width]
        x1, y1, x2, y2 = boxes[part, :width].unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        w = torch.minimum(x2[:, :, None], x2[:, None, :]).sub_(torch.maximum(x1[:, :, None], x1[:, None, :]))
        h = torch.minimum(y2[:, :, None], y2[:, None, :]).sub_(torch.maximum(y1[:, :, None], y1[:, None, :]))
        inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
        del h
        union = (area[:, :, None] + area[:, None, :]).sub_(inter)
        suppresses = inter.div_(union) > threshold
        del union, inter, w
        suppresses &= later
        suppresses &= v[:, :, None] & v[:, None, :]
        matrix = suppresses.float()  # 0/1 and sums <= k: exact in float32
        keep = v
        while True:  # at most width + 1 steps; typically a handful (exact under autocast too: only == 0 counts)
            hit = torch.bmm(keep.to(matrix.dtype).unsqueeze(1), matrix).squeeze(1)
            new = v & (hit == 0)
            if torch.equal(new, keep):
                break
            keep = new
        kept[part, :width] = keep
    return kept


def _scan(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy NMS with no host read: the (groups, k, k) "i suppresses j" matrix (the IoU of
    ``_tensorised``, the CPU kernel's arithmetic, so the same decisions), then the greedy pass itself,
    vectorised over the groups: for rank r = 0 .. k - 2, if r is still in (valid and not suppressed), it
    suppresses its later boxes over the threshold. A fixed k - 1 steps whatever the data (no
    convergence test, no count, no width cut read from the device), each two kernels over (groups, k - r):
    what torchvision's kernel does per group, with no host decision. Every shape is set by the input's.

    Its cost is the k (k + 1) / 2 IoUs of every group (the CPU kernel skips suppressed boxes) plus the k
    small steps; on a GPU the steps are 2 (k - 1) kernel launches. Memory: groups x k x k bools (32 MB for
    the RPN's 8 x 2000) and IoU temporaries of one block of ranks.
    """
    groups, k = valid.shape
    removed = ~valid  # not a candidate: neither kept nor suppressing
    if groups == 0 or k < 2:
        return ~removed
    threshold = _kernel_threshold(iou_threshold, boxes.device, boxes.dtype)
    # by blocks of ranks (rows) for every group at once, each against its later ranks only (columns from the
    # block's first rank on: the upper triangle, about half the IoUs); a block's temporaries within the
    # tensorised path's budget (on the CPU they stay in cache: 2x faster than whole k x k matrices)
    budget = TENSORISED_CHUNK.get(boxes.device.type, TENSORISED_CHUNK["default"])
    rows = max(1, budget // (groups * k))
    suppresses = torch.empty(groups, k, k, dtype=torch.bool, device=boxes.device)  # below the blocks: unused
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        i, j = slice(r0, r1), slice(r0, None)  # the block's ranks; theirs and every later one
        w = torch.minimum(x2[:, i, None], x2[:, None, j]).sub_(torch.maximum(x1[:, i, None], x1[:, None, j]))
        h = torch.minimum(y2[:, i, None], y2[:, None, j]).sub_(torch.maximum(y1[:, i, None], y1[:, None, j]))
        inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
        del h
        union = (area[:, i, None] + area[:, None, j]).sub_(inter)
        torch.gt(inter.div_(union), threshold, out=suppresses[:, i, j])
        del union, inter, w
    # only j > r is read: the diagonal and what lies below it need no mask
    for r in range(k - 1):
        later = removed[:, r + 1:]  # a view: updated in place
        later |= torch.gt(suppresses[:, r, r + 1:], removed[:, r:r + 1])  # suppresses and r not removed
    return ~removed


@lru_cache(maxsize=None)  # a pure function of its arguments; computed once, not in every step
def _kernel_threshold(threshold: float, device: torch.device, dtype: torch.dtype) -> float:
    """The threshold t' for which ``iou > t'`` in ``dtype`` decides as torchvision's kernel on ``device``:
    the CUDA kernel takes the threshold as a float (rounded to nearest); the CPU kernel compares its
    ``dtype`` IoU with the double, the same as comparing with the largest ``dtype`` value <= it."""
    if device.type == "cuda":
        return float(torch.tensor(threshold, dtype=torch.float32))
    t = torch.tensor(threshold, dtype=dtype)
    if float(t) > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


def kept_per_image(kept: Tensor, boxes: Tensor, scores: Tensor, max_detections: int) -> list[dict[str, Tensor]]:
    """kept (B, C, k) bool, boxes (B, C, k, 4), scores (B, C, k) -> per image its ``max_detections``
    best kept boxes, scores, labels: descending score, ties in (class, rank) order."""
    batch, classes, k = kept.shape
    index = kept.flatten().nonzero().squeeze(1)  # (image, class, rank) order
    kept_scores = scores.flatten()[index]
    order = kept_scores.sort(descending=True, stable=True).indices
    index, kept_scores = index[order], kept_scores[order]
    fields = {"boxes": boxes.reshape(-1, 4)[index], "scores": kept_scores, "labels": index // k % classes}
    return split_per_image(torch.arange(len(index), device=kept.device), index // (classes * k), batch,
                           max_detections, fields)


def split_per_image(kept: Tensor, images: Tensor, batch: int, max_detections: int,
                    fields: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """``kept``: indices into ``fields`` in descending score order (batched_nms's output); ``images``:
    the image of every candidate. Returns, per image, its best ``max_detections`` entries of each field."""
    # a stable sort by image keeps the score order inside each image
    kept = kept[torch.sort(images[kept], stable=True).indices]
    images_of_kept = images[kept]
    counts = torch.bincount(images_of_kept, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=kept.device) - starts[images_of_kept]
    kept = kept[rank < max_detections]
    sizes = counts.clamp(max=max_detections).tolist()
    split = {name: values[kept].split(sizes) for name, values in fields.items()}
    return [{name: split[name][i] for name in fields} for i in range(batch)]
