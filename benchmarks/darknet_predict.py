"""CPU images/s of an imported darknet model's prediction, ours next to OpenCV's DNN on the same cfg, weights and
images, in one run.

    python benchmarks/darknet_predict.py                          # yolov3-tiny and yolov3 at 416, random weights
    python benchmarks/darknet_predict.py --cfgs yolov3-tiny --weights-dir DIR   # DIR/<cfg>.weights (real ones)
    python benchmarks/darknet_predict.py --images 2 --iters 1     # smoke run

Both sides start from the same letterboxed float32 image (1, 3, 416, 416) in 0..1 and end with the image's
boxes, scores and labels after per-class NMS (score > 0.25, each class's best 300, IoU 0.45, the best 100), one
image at a time:

* ours: the checkpoint's network (``python -m detectors.weights darknet``'s model: DarkNet + neck + head, darknet's
  batch norm) and ``head.predict`` (decode, threshold, batched NMS), float32, ``torch.inference_mode``; once with
  the weights contiguous, once in channels_last (the images stay contiguous, as predict.py's loader gives them),
  once in channels_last with the batch norms folded into the convolutions (predict.py's default).
* OpenCV: ``cv2.dnn.readNetFromDarknet`` on the cfg and weights, ``net.forward`` of the yolo layers (decoded boxes
  and scores), then per class ``cv2.dnn.NMSBoxes`` (random weights put ~90k class scores above 0.25 at 416: one
  NMS over all of them, ``NMSBoxesBatched``, takes minutes).

Without ``--weights-dir`` the weights are random in darknet's format (tests/test_darknet_import.py's writer): the
network's cost is the same as with trained weights, the NMS sees more candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DARKNET = ROOT.parent / "shared" / "darknet"
BCCD = ROOT.parent / "shared" / "datasets" / "BCCD" / "JPEGImages"


def letterboxed(paths: list[Path], size: int) -> list[np.ndarray]:
    """Each image (RGB, 0..1) letterboxed to size x size with fill 0.5 (darknet's), as (1, 3, size, size)."""
    import cv2

    out = []
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        scale = min(size / h, size / w)
        nh, nw = round(h * scale), round(w * scale)
        canvas = np.full((size, size, 3), 0.5, np.float32)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top:top + nh, left:left + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) / 255.0
        out.append(np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]))
    return out


def time_per_image(fn, blobs: list[np.ndarray], iters: int) -> float:
    fn(blobs[0])  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        for blob in blobs:
            fn(blob)
    return iters * len(blobs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfgs", nargs="+", default=["yolov3-tiny", "yolov3"])
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--weights-dir", type=Path, help="<cfg>.weights files; default: random weights")
    p.add_argument("--images", type=int, default=8, help="BCCD images (640x480)")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of both (torch and OpenCV)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import cv2

    from detectors.fold_batch_norm import fold_batch_norms
    from detectors.weights.darknet import load_darknet_model
    from test_darknet_import import small_cfg, write_random_weights

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    blobs = letterboxed(sorted(BCCD.glob("*.jpg"))[:args.images], args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cfgs:
            cfg = small_cfg(name, Path(tmp), args.size)
            weights = args.weights_dir / f"{name}.weights" if args.weights_dir else Path(tmp) / f"{name}.weights"
            if not args.weights_dir:
                write_random_weights(cfg, weights)
            model, _ = load_darknet_model(cfg, weights)
            head = model.detector.head
            head.score_threshold, head.nms_threshold = 0.25, 0.45

            @torch.inference_mode()
            def ours(blob: np.ndarray) -> dict:
                return head.predict(model.detector(torch.from_numpy(blob)), (args.size, args.size))[0]

            net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
            outs = list(net.getUnconnectedOutLayersNames())

            def opencv(blob: np.ndarray) -> list[tuple[int, int]]:
                net.setInput(blob)
                rows_ = np.concatenate(net.forward(outs))
                xywh = rows_[:, :4] * args.size
                xywh[:, :2] -= xywh[:, 2:] / 2
                kept = []
                for label in np.nonzero((rows_[:, 5:] > 0.25).any(0))[0]:  # per class, its best 300 as ours
                    scores = rows_[:, 5 + label]
                    top = np.argsort(-scores)[:300]
                    top = top[scores[top] > 0.25]
                    keep = cv2.dnn.NMSBoxes(xywh[top].tolist(), scores[top].tolist(), 0.25, 0.45)
                    kept += [(int(top[k]), int(label)) for k in np.asarray(keep, dtype=int).reshape(-1)]
                return sorted(kept, key=lambda k: -rows_[k[0], 5 + k[1]])[:100]

            row = {"cfg": name, "size": args.size, "ours_img_s": time_per_image(ours, blobs, args.iters)}
            model.to(memory_format=torch.channels_last)  # oneDNN's preferred layout on the CPU
            row["ours_channels_last_img_s"] = time_per_image(ours, blobs, args.iters)
            fold_batch_norms(model.eval())  # as predict.py runs it (fold_batch_norm=true)
            row["ours_folded_channels_last_img_s"] = time_per_image(ours, blobs, args.iters)
            row |= {"opencv_img_s": time_per_image(opencv, blobs, args.iters), "threads": args.threads,
                   "torch": torch.__version__, "opencv": cv2.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, net
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
