"""Images/s of the training data pipeline: JPEG on disk -> decode -> augmentation -> collate, as the
training loader runs it (``DetectionDataModule.train_dataloader()``), per worker and with N workers.

    python benchmarks/data_throughput.py                      # BCCD train split, augment=ssd, 300x300
    python benchmarks/data_throughput.py --workers 0 4 8 16 --cache none ram --json $OUT/data.json
    python benchmarks/data_throughput.py --train-json $OUT/throughput.json   # + ratio to the SSD300 step

``--workers 0`` runs the pipeline in the main process with one OpenCV and one torch thread: one
core's throughput, the "per worker" figure. N workers run as training runs them (persistent, the
batch size and collate of the config). Each figure is the median of ``--repeats`` timings of
``--images`` images, after a warm-up that starts the workers. ``--train-json`` reads the JSON of
``benchmarks/train_throughput.py`` and prints the loader's throughput over the training step's:
data loading is no bottleneck at a ratio of 2 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from detectors.data.datamodule import DetectionDataModule  # noqa: E402
from detectors.data.formats.voc import VOCSource  # noqa: E402
from detectors.noise import silence_known_noise  # noqa: E402

DEFAULT_ROOT = os.environ.get("BCCD_ROOT", str(ROOT.parent / "shared" / "datasets" / "BCCD"))


class FirstRecords:
    """The first ``limit`` records of each split of a source (smoke runs)."""

    def __init__(self, source, limit: int):
        self.source, self.limit, self.classes = source, limit, source.classes

    def records(self, split: str):
        return self.source.records(split)[: self.limit]

    def load(self, record):
        return self.source.load(record)


def measure(source, args, workers: int, cache: str) -> tuple[float, float]:
    """Median images/s of the training loader with ``workers`` workers, and (in-process, ``workers``
    0) median images per CPU-second of this process: on a machine shared with other jobs the wall
    clock counts their share of the core too, the process's CPU time does not."""
    augment = dict(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "augment" / f"{args.augment}.yaml")))
    dm = DetectionDataModule(source, input_size=(args.size, args.size), augment=augment, batch_size=args.batch,
                             num_workers=workers, cache=cache, seed=0)
    loader = dm.train_dataloader()

    def batches():
        while True:
            yield from loader  # persistent workers carry over from epoch to epoch

    stream = batches()
    for _ in range(max(workers, 1)):  # start the workers, fill their prefetch queues
        next(stream)
    rates, cpu_rates = [], []
    for _ in range(args.repeats):
        start, cpu_start, images = time.perf_counter(), time.process_time(), 0
        while images < args.images:
            images += len(next(stream)["images"])
        rates.append(images / (time.perf_counter() - start))
        cpu_rates.append(images / (time.process_time() - cpu_start))
    stream.close()  # the loader and its workers end with this call's frame
    return sorted(rates)[len(rates) // 2], sorted(cpu_rates)[len(cpu_rates) // 2]


def main(argv: list[str] | None = None) -> dict[str, float]:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="a VOC-layout folder (default: BCCD)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--augment", default="ssd", help="a preset of configs/augment/")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts (default: 0, 1, 2, 4, ... up to the CPU count)")
    parser.add_argument("--cache", nargs="+", default=["none"], choices=["none", "ram"])
    parser.add_argument("--images", type=int, default=1024, help="images per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of the split only")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--train-json", default=None, help="train_throughput.py's JSON, for the ratio")
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    workers = args.workers or [0] + [2**k for k in range(cpus.bit_length()) if 2**k < cpus] + [cpus]
    source = VOCSource(args.root)
    if args.limit:
        source = FirstRecords(source, args.limit)
    print(f"{args.root} [{args.split}], augment={args.augment}, {args.size}x{args.size}, batch {args.batch}, "
          f"{cpus} CPUs, torch {torch.__version__}, OpenCV {cv2.__version__}")
    results: dict[str, float] = {}
    for cache in args.cache:
        for n in workers:
            if n == 0:  # one core: no OpenCV or torch thread pools
                threads = cv2.getNumThreads(), torch.get_num_threads()
                cv2.setNumThreads(1)
                torch.set_num_threads(1)
            rate, cpu_rate = measure(source, args, n, cache)
            key = f"cache={cache} workers={n}"
            results[key] = rate
            if n == 0:
                cv2.setNumThreads(threads[0])
                torch.set_num_threads(threads[1])
                results[f"{key} cpu"] = cpu_rate
            print(f"  {key:<24} {rate:8.1f} img/s" +
                  (f"  (in-process: one core; {cpu_rate:.1f} img per CPU-second)" if n == 0 else ""))
    if args.train_json:
        rows = json.loads(Path(args.train_json).read_text())["img_per_s"]
        step = max(float(rows.get("ours (torch.compile)", 0)), float(rows["ours"]))  # the faster of the two
        best = max(v for k, v in results.items() if not k.endswith(" cpu"))  # wall-clock rates only
        print(f"  SSD300 training step: {step:.1f} img/s; best loader / step = {best / step:.2f} (needs >= 2)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
