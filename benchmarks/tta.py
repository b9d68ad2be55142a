"""Test-time augmentation against plain evaluation on a checkpoint's split: mAP@0.5, mAP@[.5:.95] and the
images/s of the prediction step (normalised batch on the device -> boxes in the original frame; the loader
is not timed: its batches are read once, before any timing), each setting timed on the same batches in one
process, so the ratio holds on a shared machine as far as it holds anywhere.

    python benchmarks/tta.py CKPT [--split test] [--settings plain nms wbf] [--precision auto|bf16|32]

Settings: plain (no TTA); nms / wbf (the default views, 0.83 / 1.0 / 1.17 and each flipped, merged so);
flip (1.0 and its flip, NMS). The mAP is the module's own metrics (COCOMeanAP, VOCMeanAP): evaluate.py's numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from omegaconf import open_dict

import detectors  # noqa: F401  (resolvers)
from detectors.checkpoints import load_checkpoint, restore_model
from detectors.config import auto_precision
from detectors.tta import TTA

SETTINGS = {"plain": None, "flip": {"scales": [1.0], "flip": True, "merge": "nms"},
            "nms": {"merge": "nms"}, "wbf": {"merge": "wbf"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--settings", nargs="+", default=["plain", "nms", "wbf"], choices=list(SETTINGS))
    p.add_argument("--precision", default="auto", help="auto: bf16 autocast where evaluate.py uses it")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    ckpt, run = load_checkpoint(args.ckpt)
    with open_dict(run):
        run.data.batch_size = run.data.eval_batch_size = args.batch
        run.data.num_workers = 0
    datamodule = hydra.utils.instantiate(run.data)
    datamodule.setup("test" if args.split == "test" else "validate")
    loader = datamodule.test_dataloader() if args.split == "test" else datamodule.val_dataloader()
    module = restore_model(ckpt, run, args.ckpt).eval()
    batches = [module.on_after_batch_transfer(b, 0) for b in loader]
    bf16 = args.precision == "bf16" or (args.precision == "auto" and auto_precision() == "bf16-mixed")
    plain = module.predictions_in_original_frame
    rows = {}
    for name in args.settings:
        module.__dict__.pop("predictions_in_original_frame", None)
        if SETTINGS[name] is not None:
            TTA(module, **SETTINGS[name]).install()
        assert (module.predictions_in_original_frame == plain) == (SETTINGS[name] is None)
        images, seconds = 0, 0.0
        with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()):
            for batch in batches:
                start = time.perf_counter()
                preds, targets = module.predict_original_frame(batch)
                seconds += time.perf_counter() - start
                module.coco_map.update(preds, targets)
                module.voc_map.update(preds, targets)
                images += len(preds)
        metrics = module.compute_metrics()
        rows[name] = {"map_50": float(metrics["map_50"]), "map": float(metrics["map"]),
                      "images_per_second": images / seconds, "images": images}
        print(f"{name:>5}: mAP@0.5 {rows[name]['map_50']:.4f}  mAP@[.5:.95] {rows[name]['map']:.4f}  "
              f"{rows[name]['images_per_second']:.2f} img/s ({images} images, {'bf16' if bf16 else 'fp32'})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
