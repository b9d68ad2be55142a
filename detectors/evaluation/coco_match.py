"""Tensor re-implementation of pycocotools' ``COCOeval`` (iouType="bbox", useCats=1).

The three stages mirror ``COCOeval.evaluate`` / ``accumulate`` / ``summarize``:

* :func:`match_detections` - the greedy per (image, category) matching of
  ``evaluateImg`` for every image, category, IoU threshold and area range at
  once. The match is sequential in detection rank, so the only Python loop is
  over rank (at most ``max_dets[-1]`` iterations).
* :func:`accumulate` - precision at the 101 recall thresholds and recall, all
  categories at once with segmented cumulative sums and one ``searchsorted``.
* :func:`summarize` - the 12 standard stats, -1 for empty buckets.

Everything works on whatever device the inputs are on (CPU or CUDA) and in
float64, like pycocotools, so IoUs and recalls compare bit for bit against it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Built with numpy exactly as pycocotools' Params does, so thresholds match to the bit
# (torch.linspace rounds some values differently and ties at a threshold would flip).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_NAMES = ("all", "small", "medium", "large")


def coco_box_iou(dets: Tensor, gts: Tensor, crowd: Tensor) -> Tensor:
    """IoU as pycocotools' ``maskUtils.iou`` computes it for boxes (no +1 pixel).

    Args:
        dets: ``(..., 4)`` xyxy boxes, one detection per leading index.
        gts: ``(..., G, 4)`` xyxy ground-truth boxes.
        crowd: ``(..., G)`` bool; for a crowd GT the union is the detection area.

    Returns:
        ``(..., G)`` float64 IoU, in the same operation order as the C code.
    """
    d = dets.double().unsqueeze(-2)
    g = gts.double()
    w = torch.minimum(d[..., 2], g[..., 2]) - torch.maximum(d[..., 0], g[..., 0])
    h = torch.minimum(d[..., 3], g[..., 3]) - torch.maximum(d[..., 1], g[..., 1])
    overlap = (w > 0) & (h > 0)
    inter = torch.where(overlap, w * h, torch.zeros_like(w))
    det_area = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
    gt_area = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = torch.where(crowd, det_area.expand_as(inter), det_area + gt_area - inter)
    # where(), not a division guard: pycocotools leaves IoU 0 when boxes do not overlap.
    return torch.where(overlap, inter / union, torch.zeros_like(inter))


def _segment_starts(sorted_keys: Tensor) -> Tensor:
    """``(N,)`` index of the first row of each row's run of equal keys."""
    n = sorted_keys.numel()
    idx = torch.arange(n, device=sorted_keys.device)
    new_run = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    new_run[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.where(new_run, idx, torch.zeros_like(idx)).cummax(0).values


def match_detections(
    det_boxes: Tensor,
    det_key: Tensor,
    det_rank: Tensor,
    gt_boxes: Tensor,
    gt_key: Tensor,
    gt_crowd: Tensor,
    gt_ignore: Tensor,
    return_gt_index: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Greedy COCO matching of ``evaluateImg`` for all (image, category) groups at once.

    Args:
        det_boxes: ``(N, 4)`` detections, sorted by ``det_key`` then score (rank).
        det_key: ``(N,)`` int64 group key ``image * C + label`` (sorted).
        det_rank: ``(N,)`` rank of the detection inside its group (0 = best score).
        gt_boxes: ``(M, 4)`` ground truth sorted by ``gt_key``, input order inside a group.
        gt_key: ``(M,)`` int64 group key of each GT (sorted).
        gt_crowd: ``(M,)`` bool iscrowd.
        gt_ignore: ``(M, A)`` bool, per area range: crowd or area outside the range.
        return_gt_index: also return which GT each detection matched.

    Returns:
        ``matched`` ``(N, T, A)`` bool (dtMatches != 0) and ``matched_ignored``
        ``(N, T, A)`` bool (the matched GT was ignored, so the detection is too);
        with ``return_gt_index`` also ``gt_index`` ``(N, T, A)`` int64, the row of the
        matched GT in ``gt_boxes`` (-1: none), for analyses that need the pairs.
    """
    device = det_boxes.device
    n_det, n_area = det_boxes.shape[0], gt_ignore.shape[1]
    iou_thr = torch.tensor(np.minimum(IOU_THRESHOLDS, 1 - 1e-10), dtype=torch.float64, device=device)
    n_thr = iou_thr.numel()
    matched = torch.zeros(n_det, n_thr, n_area, dtype=torch.bool, device=device)
    matched_ignored = torch.zeros_like(matched)
    if return_gt_index:  # only on request: (N, T, A) int64 is 8x the flags
        gt_index = torch.full(matched.shape, -1, dtype=torch.int64, device=device)
        done = (matched, matched_ignored, gt_index)
    else:
        done = (matched, matched_ignored)
    if n_det == 0 or gt_key.numel() == 0:
        return done

    group_keys, gt_group, gt_count = torch.unique_consecutive(gt_key, return_inverse=True, return_counts=True)
    pos = torch.searchsorted(group_keys, det_key).clamp(max=group_keys.numel() - 1)
    det_rows = torch.nonzero(group_keys[pos] == det_key).squeeze(1)  # detections with a GT to match
    if det_rows.numel() == 0:
        return done
    det_group = pos[det_rows]

    # Order groups by how many detections they hold, so at rank r the groups
    # still active are a prefix and the work shrinks as r grows.
    n_det_group = torch.bincount(det_group, minlength=group_keys.numel())
    group_order = torch.argsort(n_det_group, descending=True, stable=True)
    new_index = torch.empty_like(group_order)
    new_index[group_order] = torch.arange(group_order.numel(), device=device)
    n_groups = int((n_det_group > 0).sum())
    active = (n_det_group[group_order][:n_groups, None] > torch.arange(int(n_det_group.max()), device=device))
    active_counts = active.sum(0).tolist()  # one host sync for the whole loop

    # Padded GT table (groups, G) for the groups that have detections.
    g_max = int(gt_count[group_order[:n_groups]].max())
    gt_slot = torch.arange(gt_key.numel(), device=device) - _segment_starts(gt_key)
    gt_row = new_index[gt_group]
    keep = gt_row < n_groups
    gt_row, gt_slot = gt_row[keep], gt_slot[keep]
    pad_boxes = torch.zeros(n_groups, g_max, 4, dtype=torch.float64, device=device)
    pad_boxes[gt_row, gt_slot] = gt_boxes[keep].double()
    pad_valid = torch.zeros(n_groups, g_max, dtype=torch.bool, device=device)
    pad_valid[gt_row, gt_slot] = True
    pad_crowd = torch.zeros_like(pad_valid)
    pad_crowd[gt_row, gt_slot] = gt_crowd[keep]
    pad_ignore = torch.ones(n_groups, n_area, g_max, dtype=torch.bool, device=device)
    pad_ignore[gt_row, :, gt_slot] = gt_ignore[keep]
    pad_index = torch.full((n_groups, g_max), -1, dtype=torch.int64, device=device)
    pad_index[gt_row, gt_slot] = torch.nonzero(keep).squeeze(1)

    det_table = torch.full((n_groups, len(active_counts)), -1, dtype=torch.long, device=device)
    det_table[new_index[det_group], det_rank[det_rows]] = det_rows

    taken = torch.zeros(n_groups, n_thr, n_area, g_max, dtype=torch.bool, device=device)
    for rank, n in enumerate(active_counts):
        rows = det_table[:n, rank]
        iou = coco_box_iou(det_boxes[rows], pad_boxes[:n], pad_crowd[:n]).masked_fill(~pad_valid[:n], -1.0)
        n_cand = int((iou >= iou_thr[0]).sum(1).max())
        if n_cand == 0:
            continue
        # Best-first candidate order: IoU descending and, among equal IoU, the later
        # GT first, since pycocotools' `if iou < best: continue` keeps the last tie.
        best = torch.sort(iou.flip(1), dim=1, descending=True, stable=True)
        cand = (g_max - 1) - best.indices[:, :n_cand]  # (n, K) GT slots
        above = best.values[:, None, :n_cand] >= iou_thr[None, :, None]  # (n, T, K)
        crowd = pad_crowd[:n].gather(1, cand)[:, None, None, :]
        free = ~taken[:n].gather(3, cand[:, None, None, :].expand(n, n_thr, n_area, n_cand)) | crowd
        ignored = pad_ignore[:n].gather(2, cand[:, None, :].expand(n, n_area, n_cand))[:, None]  # (n,1,A,K)
        ok = above[:, :, None, :] & free  # (n, T, A, K)
        # pycocotools sorts ignored GT last and stops at the first ignored one once a
        # regular GT matched: a regular candidate always wins over an ignored one.
        ok_regular, ok_ignored = ok & ~ignored, ok & ignored
        has_regular = ok_regular.any(3)
        first = torch.where(
            has_regular[..., None],
            ok_regular.to(torch.uint8).argmax(3, keepdim=True),  # argmax returns the first maximum
            ok_ignored.to(torch.uint8).argmax(3, keepdim=True),
        )
        hit = has_regular | ok_ignored.any(3)  # (n, T, A)
        slot = cand.gather(1, first.view(n, -1)).view(n, n_thr, n_area, 1)
        taken_n = taken[:n]
        taken_n.scatter_(3, slot, taken_n.gather(3, slot) | hit[..., None])
        matched[rows] = hit
        matched_ignored[rows] = hit & ~has_regular
        if return_gt_index:
            found = pad_index[:n].gather(1, slot.view(n, -1)).view(n, n_thr, n_area)
            gt_index[rows] = torch.where(hit, found, torch.full_like(found, -1))
    return done


def accumulate(
    tp: Tensor,
    fp: Tensor,
    labels: Tensor,
    ranks: Tensor,
    num_gt: Tensor,
    max_dets: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """Precision and recall tables of ``COCOeval.accumulate``.

    Args:
        tp: ``(N, T, A)`` bool, matched to a regular GT and not ignored.
        fp: ``(N, T, A)`` bool, unmatched and not ignored.
        labels: ``(N,)`` int64 category of each detection.
        ranks: ``(N,)`` rank in its (image, category) group, all below ``max_dets[-1]``.
        num_gt: ``(K, A)`` int64 count of non-ignored GT (``npig``).
        max_dets: ascending detection limits; precision is for the last one only.

    Rows must be in (category, score descending, image, rank) order: pycocotools'
    stable sort of the per-image concatenation breaks score ties that way.

    Returns:
        ``precision`` ``(T, R, K, A)`` at ``max_dets[-1]`` and ``recall`` ``(T, K, A, M)``,
        float64, -1 where a category has no non-ignored GT.
    """
    device = tp.device
    n, n_thr, n_area = tp.shape
    n_cls = num_gt.shape[0]
    rows = n_thr * n_area  # one row per (IoU threshold, area range), t-major
    rec_thr = torch.tensor(RECALL_THRESHOLDS, dtype=torch.float64, device=device)
    has_gt = num_gt > 0  # (K, A)

    # Work on TP events only. Precision only drops between two TPs, so the monotone
    # envelope at any position is the max over the TPs at or after it, and
    # searchsorted(rc, r) lands either on a TP or where precision is 0 anyway.
    tp_rows = tp.reshape(n, rows).T  # (rows, N)
    fp_cum = fp.reshape(n, rows).T.cumsum(1, dtype=torch.int32)
    ev_row, ev_col = tp_rows.nonzero(as_tuple=True)  # sorted by (row, column)
    count = torch.bincount(labels, minlength=n_cls)
    seg_start = count.cumsum(0) - count  # first column of each category
    ev_cls = labels[ev_col]
    start = seg_start[ev_cls]
    fp_before = torch.where(start > 0, fp_cum[ev_row, (start - 1).clamp(min=0)], torch.zeros_like(start, dtype=torch.int32))
    ev_fp = (fp_cum[ev_row, ev_col] - fp_before).double()
    group = ev_row * n_cls + ev_cls  # (row, category), non-decreasing along the events
    n_ev = torch.bincount(group, minlength=rows * n_cls)
    g_start = n_ev.cumsum(0) - n_ev
    ev_tp = (torch.arange(group.numel(), device=device) - g_start[group] + 1).double()  # cumulative tp
    pr = ev_tp / (ev_fp + ev_tp + np.spacing(1))  # the same float64 expression as pycocotools

    # Envelope: reverse cumulative max restarted at each group, done exactly by a
    # cummax over integer keys (group dominates, then the rank of the precision)
    # whose argmax indices pick the precision values themselves.
    n_events = pr.numel()
    if n_events:
        _, pr_rank = torch.unique(pr, sorted=True, return_inverse=True)
        key = (rows * n_cls - 1 - group) * n_events + pr_rank
        arg = key.flip(0).cummax(0).indices
        env = pr[(n_events - 1) - arg.flip(0)]
    else:
        env = pr

    # searchsorted(rc, r, 'left') finds the first detection with tp/npig >= r, i.e.
    # the j*-th TP with j* = min{j : fl(j/npig) >= r}; testing with the very division
    # pycocotools does resolves ties at a threshold identically. j* = 0 lands on the
    # first detection, whose envelope equals the first TP's (or 0 without any TP).
    npig = num_gt.double()[..., None, None]  # (K, A, 1, 1)
    j0 = torch.ceil(rec_thr * npig[..., 0]).to(torch.int64)  # (K, A, R)
    cand = (j0[..., None] + torch.arange(-2, 3, device=device)).clamp(min=1)
    cand = torch.minimum(cand, num_gt.clamp(min=1)[..., None, None])
    reach = (cand.double() / npig) >= rec_thr[:, None]
    j_star = torch.where(reach, cand, cand.amax(3, keepdim=True)).amin(3)  # (K, A, R)
    j_row = j_star[:, torch.arange(rows, device=device) % n_area].permute(1, 0, 2)  # (rows, K, R)
    found = j_row <= n_ev.view(rows, n_cls, 1)
    idx = (g_start.view(rows, n_cls, 1) + j_row - 1).clamp(0, max(n_events - 1, 0))
    value = env[idx] if n_events else torch.zeros(idx.shape, dtype=torch.float64, device=device)
    precision = torch.where(found, value, torch.zeros_like(value)).view(n_thr, n_area, n_cls, -1)
    precision = precision.permute(0, 3, 2, 1)  # (T, R, K, A) as pycocotools
    precision = torch.where(has_gt, precision, torch.full_like(precision, -1.0))

    # Recall: rc[-1] = TPs among the first maxDet per image / npig.
    ev_rank = ranks[ev_col]
    hits = torch.stack(
        [torch.bincount(group[ev_rank < m], minlength=rows * n_cls) for m in max_dets], dim=-1
    ).view(n_thr, n_area, n_cls, -1)
    recall = hits.double() / num_gt.T[None, :, :, None].double()
    recall = torch.where(has_gt.T[None, :, :, None], recall, torch.full_like(recall, -1.0))
    return precision, recall.permute(0, 2, 1, 3)  # (T, K, A, M)


def _mean_valid(s: Tensor) -> Tensor:
    """Mean of the entries > -1, or -1 when there are none (pycocotools' summarize)."""
    valid = s > -1
    if not bool(valid.any()):
        return torch.tensor(-1.0, dtype=torch.float64, device=s.device)
    return s[valid].mean()


def summarize(precision: Tensor, recall: Tensor, max_dets: tuple[int, ...]) -> dict[str, Tensor]:
    """The 12 stats of ``COCOeval.summarize`` plus per-category AP and AR.

    Args:
        precision: ``(T, R, K, A)`` from :func:`accumulate` (at ``max_dets[-1]``).
        recall: ``(T, K, A, M)``.
        max_dets: the detection limits, ascending.

    Returns:
        Named float64 scalars ``map, map_50, map_75, map_{small,medium,large},
        mar_{max_dets[i]}, mar_{small,medium,large}`` and ``map_per_class`` ``(K,)``,
        ``mar_{max_dets[-1]}_per_class`` ``(K,)``, ``map_50_per_class`` ``(K,)`` (AP at IoU 0.5).
    """
    t50 = int(np.where(IOU_THRESHOLDS == 0.5)[0][0])
    t75 = int(np.where(IOU_THRESHOLDS == 0.75)[0][0])
    last = len(max_dets) - 1
    out = {
        "map": _mean_valid(precision[..., 0]),
        "map_50": _mean_valid(precision[t50, ..., 0]),
        "map_75": _mean_valid(precision[t75, ..., 0]),
    }
    for a, name in enumerate(AREA_NAMES[1:], start=1):
        out[f"map_{name}"] = _mean_valid(precision[..., a])
    for m, limit in enumerate(max_dets):
        out[f"mar_{limit}"] = _mean_valid(recall[..., 0, m])
    for a, name in enumerate(AREA_NAMES[1:], start=1):
        out[f"mar_{name}"] = _mean_valid(recall[..., a, last])
    # Per category: a category without GT has every entry at -1, so the mean is -1 too.
    out["map_per_class"] = precision[..., 0].mean((0, 1))
    out["map_50_per_class"] = precision[t50, :, :, 0].mean(0)  # AP@0.5 per category, for the report table
    out[f"mar_{max_dets[-1]}_per_class"] = recall[:, :, 0, last].mean(0)
    return out


def coco_evaluate(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_image: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_image: Tensor,
    gt_crowd: Tensor,
    gt_area: Tensor,
    num_classes: int,
    max_dets: tuple[int, ...] = (1, 10, 100),
) -> dict[str, Tensor]:
    """pycocotools ``evaluate(); accumulate(); summarize()`` on flat tensors.

    Args:
        det_boxes: ``(N, 4)`` xyxy. det_scores: ``(N,)``. det_labels: ``(N,)`` in ``[0, K)``.
        det_image: ``(N,)`` image index; images are ordered by this index (pycocotools
            orders them by image id, which decides score ties across images).
        gt_boxes: ``(M, 4)`` xyxy. gt_labels, gt_image: ``(M,)``. gt_crowd: ``(M,)`` bool.
        gt_area: ``(M,)`` area used for the area ranges (COCO's ``area`` field).
        num_classes: K; categories with no GT give -1, like pycocotools.
        max_dets: ascending detection limits per image and category.

    Returns:
        See :func:`summarize`.
    """
    device = det_boxes.device
    n_cls = num_classes
    last = max_dets[-1]
    # Detections in (image, category, score desc, input order): pycocotools' stable
    # mergesort on -score within each (image, category), then cut to maxDet.
    by_score = torch.argsort(-det_scores, stable=True)
    det_key = det_image.long() * n_cls + det_labels.long()
    order = by_score[torch.argsort(det_key[by_score], stable=True)]
    det_key = det_key[order]
    rank = torch.arange(det_key.numel(), device=device) - _segment_starts(det_key)
    kept = rank < last
    order, det_key, rank = order[kept], det_key[kept], rank[kept]
    det_boxes, det_labels = det_boxes[order].double(), det_labels[order].long()
    # Accumulation order (category, score desc, image, rank) of the kept rows: the
    # global stable score order already breaks ties by (image, input order).
    position = torch.full_like(det_scores, -1, dtype=torch.int64)
    position[order] = torch.arange(order.numel(), device=device)
    acc = position[by_score]
    acc = acc[acc >= 0]
    acc = acc[torch.argsort(det_labels[acc], stable=True)]

    gt_key = gt_image.long() * n_cls + gt_labels.long()
    gt_order = torch.argsort(gt_key, stable=True)
    gt_key, gt_boxes, gt_labels = gt_key[gt_order], gt_boxes[gt_order], gt_labels[gt_order].long()
    gt_crowd, gt_area = gt_crowd[gt_order].bool(), gt_area[gt_order].double()

    area_lo = torch.tensor([r[0] for r in AREA_RANGES], dtype=torch.float64, device=device)
    area_hi = torch.tensor([r[1] for r in AREA_RANGES], dtype=torch.float64, device=device)
    gt_ignore = gt_crowd[:, None] | (gt_area[:, None] < area_lo) | (gt_area[:, None] > area_hi)  # (M, A)

    matched, matched_ignored = match_detections(det_boxes, det_key, rank, gt_boxes, gt_key, gt_crowd, gt_ignore)
    det_area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
    det_outside = (det_area[:, None] < area_lo) | (det_area[:, None] > area_hi)  # (N, A)
    tp = matched & ~matched_ignored
    fp = ~matched & ~det_outside[:, None, :]  # unmatched detections outside the range are ignored

    num_gt = torch.zeros(n_cls, len(AREA_RANGES), dtype=torch.int64, device=device)
    num_gt.index_add_(0, gt_labels, (~gt_ignore).to(torch.int64))
    precision, recall = accumulate(tp[acc], fp[acc], det_labels[acc], rank[acc], num_gt, tuple(max_dets))
    return summarize(precision, recall, tuple(max_dets))
