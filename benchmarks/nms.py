"""Decode + NMS at scale: SSD300 (8732 priors), batch 32, 3 / 20 / 80 classes, SSD's eval settings
(score > 0.01, top 400 per class, IoU 0.45, 200 per image), every way of running the per-class NMS.

    python benchmarks/nms.py                                   # GPU if there is one, else the CPU
    python benchmarks/nms.py --device cpu --warmup 1 --iters 5 --json nms.json
    python benchmarks/nms.py --device cpu --batch 2 --classes 3 --warmup 0 --iters 1   # smoke run

Every row is the whole decode + top-k + NMS + per-image cut of one batch (ms per batch), from the
same random network outputs (``SSDRaw``) through our SSD300 head. Timing: each row's first call is
checked (below); then ``--warmup`` untimed calls and ``--iters`` rounds that call every row once in
turn (so load from other jobs on a shared machine falls on all rows alike), the median per row; a row
whose first call took over ``--slow-s`` is timed by that call alone. The rows:

* ours: ``SSDHead.predict`` as it is (``postprocess.multiclass_nms``, its rule picks the strategy).
* torchvision: ``SSD.postprocess_detections`` of ``ssd300_vgg16`` on the same outputs and priors (its
  own decoding; a Python loop over images and classes, one ``batched_nms`` per image).
* before: our decode + top-k, then one ``torchvision.ops.batched_nms`` over the whole batch (one group
  per image and class), as ``multiclass_nms`` did until 2026-12-02: torchvision takes the coordinate
  trick up to 1000 boxes on the CPU (``boxes.numel() > 4000``), 25 000 on the GPU, else its per-group loop.
* (a) one ``nms`` over the whole batch, each (image, class) shifted apart (``_batched_nms_coordinate_trick``)
* (b) torchvision's per-group loop (``_batched_nms_vanilla``: a search over the batch for every group)
* (b') per-group loop on contiguous slices (``grouped_nms(strategy="per_group")``)
* (c) per image: one ``nms`` with the classes shifted apart
* (d) per class: one ``nms`` with the images shifted apart
* (e) tensorised exact greedy on (groups, k, k) "suppresses" matrices, chunked: the fixed point
  (``grouped_nms(strategy="tensorised")``) and the plain loop over the k ranks.

Every row's kept boxes, scores and labels are compared with per-image torchvision NMS (a loop over
images and classes of ``torchvision.ops.nms`` on the same candidates). The exact strategies must equal
it (asserted); the coordinate-offset ones (before below its switch, a, c, d) shift boxes by up to
(groups x largest coordinate), which rounds the float32 coordinates, so they can keep other boxes near
the IoU threshold: their mismatches are counted and printed, not asserted. Rows whose single ``nms``
call would exceed ``--max-nms-boxes`` (quadratic in its boxes on the CPU, N^2/64 words on the GPU) are
skipped.

Score regimes: ``random`` (random-weight outputs: every prior scores about 1/(C+1) > 0.01, so every
group has its 400 candidates: the worst case) and ``realistic`` (background dominates; a few objects
per image light up the priors around them for their class, plus scattered low scores: about 1.5% of
priors x classes above 0.01, as a trained detector at an eval threshold of 0.01).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, nms
from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours

from detectors.boxes import clip_boxes
from detectors.heads.ssd import SSDRaw
from detectors.postprocess import (
    choose_strategy,
    grouped_nms,
    kept_per_image,
    per_class_top_k,
)

SIZE = 300
FEATURE_SHAPES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]  # SSD300's maps at 300x300
#: rows whose kept boxes must equal the reference (exact greedy NMS on each group's own coordinates)
EXACT = ("ours", "(b) per group, torchvision loop", "(b') per group, slices", "(e) tensorised, fixed point",
         "(e) tensorised, rank loop")
ROWS = ("decode + top-k + cut, no NMS", "ours", "torchvision postprocess", "before: one batched_nms",
        "(a) one nms, batch offsets",
        "(b) per group, torchvision loop", "(b') per group, slices", "(c) per image, class offsets",
        "(d) per class, image offsets", "(e) tensorised, fixed point", "(e) tensorised, rank loop")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, nargs="+", default=[3, 20, 80])
    p.add_argument("--regimes", nargs="+", default=["random", "realistic"], choices=["random", "realistic"])
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row after its checked first call")
    p.add_argument("--iters", type=int, default=5, help="timed rounds over the rows (median)")
    p.add_argument("--slow-s", type=float, default=10.0,
                   help="a row whose first call takes longer is timed by that call alone (marked *)")
    p.add_argument("--max-nms-boxes", type=int, default=None,
                   help="skip rows with a single nms call over more boxes (default 20000 on the CPU, 300000 on the GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def random_raw(batch: int, classes: int, regime: str, priors: Tensor, seed: int) -> SSDRaw:
    """SSD300 head outputs for ``batch`` images (see the module docstring for the two regimes)."""
    g = torch.Generator().manual_seed(seed)
    num = len(priors)
    offsets = torch.randn(batch, num, 4, generator=g) * 0.5
    if regime == "random":
        logits = torch.randn(batch, num, classes + 1, generator=g) * 0.5
        return SSDRaw(logits, offsets, FEATURE_SHAPES)
    background = 9.0  # e^9 ~ 8100 against e^N(0,1) per class: every class scores < 0.01 by itself
    logits = torch.randn(batch, num, classes + 1, generator=g)
    logits[..., 0] = background

    def lift(image, prior_idx, cls, score):  # the class logit that gives about this score
        logits[image, prior_idx, cls + 1] = background + torch.log(score / (1 - score))

    for b in range(batch):
        for _ in range(int(torch.randint(1, 11, (1,), generator=g))):  # 1-10 objects
            xy = torch.rand(2, generator=g) * SIZE * 0.8
            wh = torch.rand(2, generator=g) * SIZE * 0.6 + 16
            obj = torch.cat([xy, (xy + wh).clamp(max=SIZE)]).unsqueeze(0)
            iou = box_iou(priors, obj).squeeze(1)
            near = (iou > 0.3).nonzero().squeeze(1)
            cls = int(torch.randint(classes, (1,), generator=g))
            score = (0.1 + 0.85 * iou[near] + 0.05 * torch.rand(len(near), generator=g)).clamp(max=0.97)
            lift(b, near, cls, score)
            for other in torch.randint(classes, (2,), generator=g).tolist():  # confusion, low scores
                if other != cls:
                    lift(b, near, other, 0.011 + 0.05 * torch.rand(len(near), generator=g))
        clutter = (torch.rand(num, classes, generator=g) < 0.014).nonzero()  # scattered low scores
        lift(b, clutter[:, 0], clutter[:, 1], torch.exp(torch.empty(len(clutter)).uniform_(math.log(0.0105),
                                                                                         math.log(0.15), generator=g)))
    return SSDRaw(logits, offsets, FEATURE_SHAPES)


def run_once(step: Callable[[], list], device: torch.device) -> tuple[list, float]:
    """One call of ``step`` under inference mode: its result and its seconds (device-synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def decode(head, raw: SSDRaw) -> tuple[Tensor, Tensor]:
    """The first half of ``SSDHead.predict``: (B, A, 4) clipped boxes and (B, A, C) class scores."""
    priors = head.make_priors(raw, (SIZE, SIZE))
    scores = raw.cls_logits.float().softmax(-1)[..., 1:]
    return clip_boxes(head.coder.decode(raw.box_offsets.float(), priors), (SIZE, SIZE)), scores


def offsets_nms(boxes: Tensor, scores: Tensor, shift: Tensor, threshold: float) -> Tensor:
    """``_batched_nms_coordinate_trick`` with a given per-box group number ``shift``."""
    return _batched_nms_coordinate_trick(boxes, scores, shift, threshold)


def rank_loop(boxes: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """(e) as a loop over the k ranks: rank r, if not yet suppressed, suppresses its later boxes over
    the threshold; vectorised over the groups (the same IoU as ``grouped_nms``'s tensorised path)."""
    from detectors.postprocess import TENSORISED_CHUNK, _kernel_threshold

    k = valid.shape[-1]
    flat_boxes, flat_valid = boxes.reshape(-1, k, 4), valid.reshape(-1, k)
    kept = torch.zeros_like(flat_valid)
    used = flat_valid.any(0).nonzero()
    if len(used) == 0:
        return kept.view_as(valid)
    width = int(used[-1]) + 1
    active = flat_valid[:, :width].any(1).nonzero().squeeze(1)
    t = _kernel_threshold(threshold, boxes.device, boxes.dtype)
    budget = TENSORISED_CHUNK.get(boxes.device.type, TENSORISED_CHUNK["default"])
    later = torch.ones(width, width, dtype=torch.bool, device=boxes.device).triu_(1)
    for part in active.split(max(1, budget // (width * width))):
        x1, y1, x2, y2 = flat_boxes[part, :width].unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
        h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
        inter = w * h
        suppresses = (inter / (area[:, :, None] + area[:, None, :] - inter) > t) & later
        suppressed = ~flat_valid[part, :width]
        for r in range(width):
            suppressed |= suppresses[:, r] & ~suppressed[:, r:r + 1]
        kept[part, :width] = ~suppressed
    return kept.view_as(valid)


def nms_strategies(head, raw: SSDRaw, classes: int, cap: int):
    """name -> (step returning per-image results, or None when skipped; the largest nms call's boxes)."""
    thr, score_thr, top_k, max_det = head.nms_threshold, head.score_threshold, head.pre_nms_top_k, head.max_detections

    def candidates():
        top_scores, top_boxes = per_class_top_k(*decode(head, raw), top_k)
        return top_scores, top_boxes, top_scores > score_thr

    def from_indices(kept_index: Tensor, valid: Tensor, top_boxes: Tensor, top_scores: Tensor):
        kept_cand = torch.zeros(int(valid.sum()), dtype=torch.bool, device=valid.device)
        kept_cand[kept_index] = True
        kept = torch.zeros_like(valid)
        kept[valid] = kept_cand
        return kept_per_image(kept, top_boxes, top_scores, max_det)

    def flat(make_groups: Callable[[Tensor, Tensor], Tensor]):
        """A strategy on the compacted candidates: (boxes, scores, image, class) -> kept indices."""
        def step():
            top_scores, top_boxes, valid = candidates()
            image, cls = (valid.nonzero()[:, :2]).unbind(1)
            kept_index = make_groups(top_boxes[valid], top_scores[valid], image, cls)
            return from_indices(kept_index, valid, top_boxes, top_scores)
        return step

    def per(key: int):
        """One offsets nms per image (key 0: classes shifted) or per class (key 1: images shifted)."""
        def run(boxes, scores, image, cls):
            by, other = (image, cls) if key == 0 else (cls, image)
            out = [torch.empty(0, dtype=torch.long, device=boxes.device)]
            for value in torch.unique(by).tolist():
                idx = (by == value).nonzero().squeeze(1)
                out.append(idx[offsets_nms(boxes[idx], scores[idx], other[idx], thr)])
            return torch.cat(out)
        return run

    def masked(fn):
        def step():
            top_scores, top_boxes, valid = candidates()
            return kept_per_image(fn(top_boxes, top_scores, valid), top_boxes, top_scores, max_det)
        return step

    with torch.inference_mode():
        _, _, valid = candidates()
        total = int(valid.sum())
        per_image = int(valid.sum((1, 2)).max())
        per_class = int(valid.sum((0, 2)).max())
        above = int((decode(head, raw)[1] > score_thr).sum())
    rows = {
        "decode + top-k + cut, no NMS": (masked(lambda b, s, v: v), 0),
        "ours": (lambda: head.predict(raw, (SIZE, SIZE)), 0),
        "before: one batched_nms": (flat(lambda b, s, i, c: batched_nms(b, s, i * classes + c, thr)), 0),
        "(a) one nms, batch offsets": (flat(lambda b, s, i, c: offsets_nms(b, s, i * classes + c, thr)), total),
        "(b) per group, torchvision loop": (
            flat(lambda b, s, i, c: _batched_nms_vanilla(b, s, i * classes + c, thr)), 0),
        "(b') per group, slices": (masked(lambda b, s, v: grouped_nms(b, s, v, thr, "per_group")), 0),
        "(c) per image, class offsets": (flat(per(0)), per_image),
        "(d) per class, image offsets": (flat(per(1)), per_class),
        "(e) tensorised, fixed point": (masked(lambda b, s, v: grouped_nms(b, s, v, thr, "tensorised")), 0),
        "(e) tensorised, rank loop": (masked(lambda b, s, v: rank_loop(b, v, thr)), 0),
    }
    info = {"candidates": total, "above_threshold": above, "candidates_per_image_max": per_image,
            "candidates_per_class_max": per_class,
            "rule": choose_strategy(total, int((valid.sum(-1) > 0).sum()), valid.device, torch.float32)}
    return {name: (step if largest <= cap else None, largest) for name, (step, largest) in rows.items()}, info


def reference(head, raw: SSDRaw, on: torch.device | None = None) -> list[dict[str, Tensor]]:
    """Per-image torchvision NMS on our candidates: for every image and class ``torchvision.ops.nms``
    (what ``batched_nms`` does per image above its switch), then the image's best by score (stable).
    ``on``: run the nms calls there (e.g. the CPU kernel for candidates decoded on the GPU)."""
    boxes, scores = decode(head, raw)
    top_scores, top_boxes = per_class_top_k(boxes, scores, head.pre_nms_top_k)
    device = top_scores.device
    top_scores, top_boxes = top_scores.to(on or device), top_boxes.to(on or device)
    out = []
    for b in range(len(top_scores)):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for c in range(top_scores.shape[1]):
            s, bx = top_scores[b, c], top_boxes[b, c]
            cand = (s > head.score_threshold).nonzero().squeeze(1)
            keep = cand[nms(bx[cand], s[cand], head.nms_threshold)]
            kept_boxes.append(bx[keep])
            kept_scores.append(s[keep])
            kept_labels.append(torch.full((len(keep),), c, device=s.device))
        s = torch.cat(kept_scores)
        order = s.sort(descending=True, stable=True).indices[:head.max_detections]
        out.append({"boxes": torch.cat(kept_boxes)[order].to(device), "scores": s[order].to(device),
                    "labels": torch.cat(kept_labels)[order].to(device)})
    return out


def mismatches(got: list[dict[str, Tensor]], expected: list[dict[str, Tensor]]) -> int:
    """Per-image results that differ: boxes kept by one and not the other, counted per image (0: identical,
    boxes, scores, labels and their order)."""
    diff = 0
    for g, e in zip(got, expected, strict=True):
        if all(g[k].shape == e[k].shape and torch.equal(g[k], e[k]) for k in ("boxes", "scores", "labels")):
            continue
        a = {tuple(r) for r in torch.cat([g["boxes"], g["scores"][:, None], g["labels"][:, None]], 1).tolist()}
        b = {tuple(r) for r in torch.cat([e["boxes"], e["scores"][:, None], e["labels"][:, None]], 1).tolist()}
        diff += max(1, len(a ^ b))
    return diff


def torchvision_postprocess(classes: int, raw: SSDRaw, priors: Tensor, device: torch.device):
    """torchvision's ``SSD.postprocess_detections`` on the same outputs and priors, its settings as ours."""
    from torchvision.models.detection import ssd300_vgg16

    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=classes + 1).to(device).eval()
    head_outputs = {"bbox_regression": raw.box_offsets.float(), "cls_logits": raw.cls_logits.float()}
    anchors = [priors] * len(raw.box_offsets)
    sizes = [(SIZE, SIZE)] * len(raw.box_offsets)
    assert (model.score_thresh, model.topk_candidates, model.nms_thresh, model.detections_per_img) == (0.01, 400, 0.45, 200)
    return lambda: model.postprocess_detections(head_outputs, anchors, sizes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cap = args.max_nms_boxes or (20_000 if device.type == "cpu" else 300_000)
    results = []
    for classes in args.classes:
        head = build_ours(["model=ssd300"], classes).detector.head.to(device).eval()
        priors = head.priors(FEATURE_SHAPES, (SIZE, SIZE), device)
        for regime in args.regimes:
            raw = random_raw(args.batch, classes, regime, priors.cpu(), args.seed)
            raw = SSDRaw(raw.cls_logits.to(device), raw.box_offsets.to(device), raw.feature_shapes)
            with torch.inference_mode():
                expected = reference(head, raw)
                on_cpu = reference(head, raw, torch.device("cpu")) if device.type != "cpu" else expected
            steps, info = nms_strategies(head, raw, classes, cap)
            steps["torchvision postprocess"] = (torchvision_postprocess(classes, raw, priors, device), 0)
            row = {"classes": classes, "regime": regime, **info, "ms": {}, "mismatches": {}, "skipped": {},
                   "mismatches_vs_cpu_nms": {}}
            row["above_threshold_fraction"] = info["above_threshold"] / (args.batch * len(priors) * classes)
            timed = {}
            for name in ROWS:  # the first call: its kept boxes against the reference (and its time, for slow rows)
                step, largest = steps[name]
                if step is None:
                    row["skipped"][name] = f"one nms over {largest} boxes > --max-nms-boxes {cap}"
                    continue
                got, seconds = run_once(step, device)
                if name not in ("torchvision postprocess", "decode + top-k + cut, no NMS"):
                    row["mismatches"][name] = mismatches(got, expected)  # (torchvision's own decoding differs in bits)
                    if device.type != "cpu":  # against the CPU kernel on the same candidates
                        row["mismatches_vs_cpu_nms"][name] = mismatches(got, on_cpu)
                timed[name] = [seconds] if seconds > args.slow_s else []
            fast = [name for name, times in timed.items() if not times]
            for name in fast:
                for _ in range(args.warmup):
                    run_once(steps[name][0], device)
            for _ in range(args.iters):  # rounds over the rows, so load from other jobs hits every row alike
                for name in fast:
                    timed[name].append(run_once(steps[name][0], device)[1])
            row["ms"] = {name: 1000 * sorted(times)[len(times) // 2] for name, times in timed.items()}
            row["timed_once"] = [name for name in timed if name not in fast]
            row["detections_per_image"] = sum(len(p["scores"]) for p in expected) / args.batch
            results.append(row)
            print(f"{classes} classes, {regime}: {100 * row['above_threshold_fraction']:.1f}% of priors x classes "
                  f"score > {head.score_threshold}, {info['candidates']} candidates after the top-{head.pre_nms_top_k} "
                  f"cut, rule: {info['rule']}", flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "rows": results,
              "exact_checked": {name: all(r["mismatches"].get(name) == 0 for r in results) for name in EXACT}}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    bad = {f"{r['classes']}/{r['regime']}/{n}": r["mismatches"][n]
           for r in results for n in EXACT if r["mismatches"].get(n)}
    assert not bad, f"exact strategies differ from per-image torchvision NMS: {bad}"
    return report


def print_table(report: dict) -> None:
    rows = report["rows"]
    print(f"\ndecode + NMS, SSD300 (8732 priors), batch {report['batch']}, {report['device']}, torch {report['torch']}: "
          "ms per batch (median of rounds; * one call); x N: N kept boxes differ from per-image torchvision NMS; "
          "- skipped")
    heads = [f"{r['classes']} cls {r['regime']}" for r in rows]
    print(f"{'':34s}" + "".join(f"{h:>20s}" for h in heads))
    print(f"{'% priors x classes > threshold':34s}" + "".join(f"{100 * r['above_threshold_fraction']:>20.1f}" for r in rows))
    print(f"{'candidates after top-k':34s}" + "".join(f"{r['candidates']:>20d}" for r in rows))
    for name in ROWS:
        cells = []
        for r in rows:
            if name in r["skipped"]:
                cells.append("-")
            else:
                miss = r["mismatches"].get(name, 0)
                once = "*" if name in r["timed_once"] else ""
                cells.append(f"{r['ms'][name]:.1f}{once}" + (f" x{miss}" if miss else ""))
        print(f"{name:34s}" + "".join(f"{c:>20s}" for c in cells))
    print(f"{'ours: rule picks':34s}" + "".join(f"{r['rule']:>20s}" for r in rows))
    for r in rows:
        off = {name: n for name, n in r["mismatches_vs_cpu_nms"].items() if n}
        if r["mismatches_vs_cpu_nms"]:
            print(f"{r['classes']} cls {r['regime']}: kept boxes that differ from the CPU kernel's on the same "
                  f"candidates: {off or 'none'}")


if __name__ == "__main__":
    main()
