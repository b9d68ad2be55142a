"""COCO bbox evaluation at COCO-val scale: ours on the GPU, ours on the CPU, pycocotools and
faster-coco-eval on the same input in one run, with the 12 stats of each.

    python benchmarks/coco_eval.py                          # 5000 images, <= 15 GT, 100 detections, 80 classes
    python benchmarks/coco_eval.py --device cpu --images 50 --repeats 1     # smoke run

The case is random but COCO-shaped: image sizes 320-640 px, 0-15 GT per image of a few classes
each, GT sizes from 4 to 400 px (all three area ranges), 1% crowd GT, non-contiguous category ids
(80 of 1..90, as COCO), 100 detections per image (jittered copies of the GT, some with the wrong
class, and random boxes), float32 scores (so some ties, which decide the order of equal scores).

What is timed (median of ``--repeats`` for ours; the references run once, they take seconds to
minutes and vary little):

* ours: ``COCOMeanAP.update`` with every image's tensors (CPU tensors, copied to the device
  inside, as the metric receives them) and ``compute`` (matching, accumulate, the 12 stats).
  On the CPU with ``--cpu-threads`` torch threads (default 1, like the references).
* pycocotools / faster-coco-eval: index the ground truth, ``loadRes`` the detections,
  ``evaluate``, ``accumulate``, ``summarize`` (its printing silenced).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors.evaluation.coco import COCOMeanAP  # noqa: E402

STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def make_case(images: int, max_gt: int, dets: int, classes: int, seed: int = 0) -> dict:
    """A random COCO-shaped case, in each tool's native input form.

    Returns ``gt`` (a COCO dataset dict), ``results`` (COCO results list), ``preds``/``targets``
    (per-image tensor dicts for ``COCOMeanAP``, boxes xyxy float64 built from the same numbers).
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.sort(rng.choice(np.arange(1, 91), size=classes, replace=False)) if classes <= 90 \
        else np.arange(1, classes + 1)
    image_ids = np.sort(rng.choice(np.arange(1, 100 * images + 1), size=images, replace=False))
    gt = {"images": [], "annotations": [], "categories": [{"id": int(c), "name": f"c{c}"} for c in cat_ids]}
    results, preds, targets = [], [], []

    def clip_xywh(x, y, w, h, width, height):
        x, y = np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)
        return x, y, np.clip(w, 1, width - x), np.clip(h, 1, height - y)

    for img_id in image_ids:
        width, height = (int(v) for v in rng.integers(320, 641, size=2))
        gt["images"].append({"id": int(img_id), "width": width, "height": height})
        n = int(rng.integers(0, max_gt + 1))
        own = rng.choice(classes, size=min(classes, int(rng.integers(1, 5))), replace=False)
        side = np.exp(rng.uniform(np.log(4), np.log(400), size=(n, 1))) * rng.uniform(0.6, 1.6, size=(n, 2))
        gx, gy, gw, gh = clip_xywh(rng.uniform(0, width, n), rng.uniform(0, height, n), side[:, 0], side[:, 1],
                                   width, height)
        g_box = np.round(np.stack([gx, gy, gw, gh], 1), 2)
        g_lab = rng.choice(own, size=n)
        g_crowd = rng.random(n) < 0.01
        for b, lab, crowd in zip(g_box, g_lab, g_crowd):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": int(img_id),
                                      "category_id": int(cat_ids[lab]), "bbox": b.tolist(),
                                      "area": float(b[2] * b[3]), "iscrowd": int(crowd)})
        # detections: jittered GT copies (20% with another class) then random boxes
        n_copy = min(dets // 2, 3 * n) if n else 0
        src = rng.integers(0, max(n, 1), size=n_copy)
        jitter = rng.normal(0, 0.12, size=(n_copy, 4))  # relative to the GT's size: IoUs spread over 0.3-1
        cx = g_box[src, 0] + g_box[src, 2] * (0.5 + jitter[:, 0])
        cy = g_box[src, 1] + g_box[src, 3] * (0.5 + jitter[:, 1])
        cw, ch = g_box[src, 2] * np.exp(jitter[:, 2]), g_box[src, 3] * np.exp(jitter[:, 3])
        c_lab = np.where(rng.random(n_copy) < 0.2, rng.choice(own, size=n_copy), g_lab[src])
        n_rand = dets - n_copy
        r_side = np.exp(rng.uniform(np.log(4), np.log(400), size=(n_rand, 2)))
        dx = np.concatenate([cx - cw / 2, rng.uniform(0, width, n_rand)])
        dy = np.concatenate([cy - ch / 2, rng.uniform(0, height, n_rand)])
        dw, dh = np.concatenate([cw, r_side[:, 0]]), np.concatenate([ch, r_side[:, 1]])
        d_box = np.round(np.stack(clip_xywh(dx, dy, dw, dh, width, height), 1), 2)
        d_lab = np.concatenate([c_lab, rng.choice(own, size=n_rand)]).astype(np.int64)
        d_score = rng.random(dets).astype(np.float32).astype(np.float64)
        for b, lab, s in zip(d_box, d_lab, d_score):
            results.append({"image_id": int(img_id), "category_id": int(cat_ids[lab]), "bbox": b.tolist(),
                            "score": float(s)})

        def xyxy(b):
            return torch.from_numpy(np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1).reshape(-1, 4))

        preds.append({"boxes": xyxy(d_box), "scores": torch.from_numpy(d_score), "labels": torch.from_numpy(d_lab)})
        targets.append({"boxes": xyxy(g_box), "labels": torch.from_numpy(g_lab.astype(np.int64)),
                        "iscrowd": torch.from_numpy(g_crowd), "area": torch.from_numpy(g_box[:, 2] * g_box[:, 3])})
    return {"gt": gt, "results": results, "preds": preds, "targets": targets, "num_classes": classes}


def run_ours(case: dict, device: torch.device, repeats: int) -> tuple[dict, float, float]:
    """(stats, median seconds of update + compute, median seconds of compute alone)."""
    totals, computes, stats = [], [], None
    for _ in range(repeats):
        metric = COCOMeanAP(num_classes=case["num_classes"]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metric.update(case["preds"], case["targets"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = metric.compute()
        stats = {k: float(out[k]) for k in STATS}  # .item() syncs the device
        t2 = time.perf_counter()
        totals.append(t2 - t0)
        computes.append(t2 - t1)
    return stats, float(np.median(totals)), float(np.median(computes))


def run_reference(case: dict, tool: str) -> tuple[dict, float, float]:
    """(stats, seconds of index + loadRes + evaluate + accumulate + summarize, seconds without the loading)."""
    gt, results = copy.deepcopy(case["gt"]), copy.deepcopy(case["results"])  # loadRes writes into its input
    quiet = contextlib.redirect_stdout(io.StringIO())
    t0 = time.perf_counter()
    with quiet:
        if tool == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        else:
            from faster_coco_eval import COCO, COCOeval_faster

            coco_gt = COCO(gt)
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        t1 = time.perf_counter()
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    t2 = time.perf_counter()
    return dict(zip(STATS, (float(s) for s in evaluator.stats[:12]))), t2 - t0, t2 - t1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of 'ours (device)'; ours on the CPU always runs too")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--max-gt", type=int, default=15)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3, help="runs of ours (median); references run once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads of 'ours (cpu)'; 1 as the references (the metric's many small ops gain "
                        "nothing from more, and lose much when the cores are shared)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pycocotools", "faster-coco-eval"],
                   help="leave a reference out")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    case = make_case(args.images, args.max_gt, args.dets, args.classes, args.seed)
    print(f"case: {args.images} images, {len(case['gt']['annotations'])} GT, {len(case['results'])} detections, "
          f"{args.classes} classes (built in {time.perf_counter() - t0:.1f} s)")
    rows = {}
    warmup = {**case, "preds": case["preds"][:20], "targets": case["targets"][:20]}
    if device.type != "cpu":
        run_ours(warmup, device, 1)  # CUDA context, kernels, allocator
        rows[f"ours ({device.type})"] = run_ours(case, device, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    run_ours(warmup, torch.device("cpu"), 1)  # first-call costs (thread pool, dispatch)
    rows["ours (cpu)"] = run_ours(case, torch.device("cpu"), args.repeats)
    torch.set_num_threads(threads)
    for tool in ("pycocotools", "faster-coco-eval"):
        if tool not in args.skip:
            rows[tool] = run_reference(case, tool)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nCOCO bbox eval, {name}, torch {torch.__version__}, ours (cpu) on {args.cpu_threads} thread(s)")
    print(f"{'':18s} {'total s':>9s} {'eval s':>9s} " + " ".join(f"{s:>10s}" for s in STATS))
    for key, (stats, total, evaluate) in rows.items():
        print(f"{key:18s} {total:9.3f} {evaluate:9.3f} " + " ".join(f"{stats[s]:10.6f}" for s in STATS))
    reference = rows.get("pycocotools", rows.get("faster-coco-eval"))
    diffs, identical = {}, {}
    if reference is not None:
        ref_name = "pycocotools" if "pycocotools" in rows else "faster-coco-eval"
        for key, (stats, _, _) in rows.items():
            diffs[key] = max(abs(stats[s] - reference[0][s]) for s in STATS)
            # ours returns float32 stats, and faster-coco-eval sums in another order (1e-17 apart):
            # identical = the same float32 numbers
            identical[key] = all(np.float32(stats[s]) == np.float32(reference[0][s]) for s in STATS)
        print(f"max |stat - {ref_name}|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        print(f"all 12 stats identical to {ref_name} (as float32): "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in identical.items()))
    speedups = {}
    if "faster-coco-eval" in rows:
        for key in rows:
            if key.startswith("ours"):
                speedups[f"{key} / faster-coco-eval"] = rows["faster-coco-eval"][1] / rows[key][1]
    if "pycocotools" in rows:
        speedups["ours (cpu) / pycocotools"] = rows["pycocotools"][1] / rows["ours (cpu)"][1]
    print("speed-up (total time): " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items()))
    result = {"device": name, "torch": torch.__version__, "cpu_threads": args.cpu_threads, "images": args.images,
              "detections": len(case["results"]), "ground_truth": len(case["gt"]["annotations"]),
              "classes": args.classes,
              "rows": {k: {"stats": s, "total_s": t, "eval_s": e} for k, (s, t, e) in rows.items()},
              "max_abs_diff_vs_reference": diffs, "identical": identical, "speedup": speedups}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
