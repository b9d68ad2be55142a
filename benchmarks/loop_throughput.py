"""Images/s of the real training loop (``trainer.fit``) next to the isolated training step, in one run.

    python benchmarks/loop_throughput.py                  # GPU: SSD300, batch 32, 300x300, bf16
    OMP_NUM_THREADS=1 python benchmarks/loop_throughput.py --device cpu --batch 4 --warmup 3 --iters 20
    OMP_NUM_THREADS=1 python benchmarks/loop_throughput.py --device cpu --batch 4 --size 320 --warmup 3 --iters 10 \
        --rounds 3 model=ssdlite         # a shared CPU: alternate the rows, sum the times

Rows, on the same model (``model=ssd300`` and the overrides) and the same random batches:
- isolated step: the step ``train_throughput.py`` times (forward, loss, backward, SGD step on a
  batch already on the device, synchronised around each step).
- trainer.fit: the DetectionModule as ``train.py`` builds it (configured optimizer and schedule,
  the project's callbacks of ``configs/callbacks/default.yaml``, the CSV logger, the trainer config)
  fed from a list of collated batches held in memory (pinned on a GPU, as the loader's workers
  deliver them). Timed from the end of batch ``--warmup`` - 1 to the end of the last batch, device
  synchronised at both ends only: every step's data fetch, transfer, hooks and logging are in,
  start-up and the final checkpoint are not. No validation. Each of ``--rounds`` runs a fresh fit.

The ratio (loop / isolated images/s, both over the total time of the same number of steps; the
isolated median, as train_throughput.py reports it, is in the JSON) is what the loop costs beyond the
step; target >= 0.90. Both rows use the trainer config's ``cudnn.benchmark`` (``trainer.benchmark``),
so the ratio measures the loop and nothing else. The CPU-time figures (this process's CPU seconds,
all its threads) are the fair ones on a CPU that other jobs share, where wall time measures them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, random_batch, step_parser  # noqa: E402
from train_throughput import ours_step  # noqa: E402


def now(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU) seconds, after the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def isolated_seconds(step, warmup: int, iters: int, device: torch.device) -> tuple[float, float, float]:
    """``common.time_steps``' timing (each step synchronised) returning (median wall, total wall,
    total CPU) seconds of the ``iters`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(iters):
        wall, cpu = now(device)
        step()
        wall_end, cpu_end = now(device)
        walls.append(wall_end - wall)
        cpus.append(cpu_end - cpu)
    return sorted(walls)[len(walls) // 2], sum(walls), sum(cpus)


class LoopTimer(L.Callback):
    """Wall and CPU time of training batches ``warmup`` .. ``warmup + iters - 1``, device-synchronised
    at the two ends only."""

    def __init__(self, warmup: int, iters: int):
        self.warmup, self.iters = warmup, iters
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.images = 0

    def _now(self, pl_module: L.LightningModule) -> tuple[float, float]:
        return now(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup == 0:
            self.start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.warmup <= batch_idx < self.warmup + self.iters:
            self.images += len(batch["images"])
        if batch_idx == self.warmup - 1:
            self.start = self._now(pl_module)
        elif batch_idx == self.warmup + self.iters - 1:
            self.end = self._now(pl_module)

    @property
    def seconds(self) -> tuple[float, float]:
        """(wall, CPU) seconds of the timed batches."""
        if self.start is None or self.end is None:
            raise RuntimeError("the loop ended before the timed batches")
        return self.end[0] - self.start[0], self.end[1] - self.start[1]


def loop_seconds(args, device: torch.device, out_dir: Path) -> tuple[tuple[float, float], int, dict]:
    """trainer.fit over warmup + iters batches; ((wall, CPU) seconds timed, images timed, what ran)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from detectors.tasks.train import instantiate_dict, instantiate_loggers

    # SGD, as the isolated step takes (model=ssd300 alone takes AdamW on a CPU)
    overrides = [f"paths.output_dir={out_dir}", "model=ssd300", "optimizer=sgd", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.data.classes = [f"class{i}" for i in range(args.num_classes)]
        steps = args.warmup + args.iters
        cfg.trainer.update(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
                           max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                           precision="bf16-mixed" if args.amp else "32-true")
    L.seed_everything(cfg.seed)
    module = hydra.utils.instantiate(cfg.model)
    # a few distinct collated batches (as collate_detection makes them, with image ids), held in memory
    pool = []
    for i in range(min(4, steps)):
        b = random_batch(args.batch, args.size, args.num_classes, args.boxes, "cpu", seed=i)
        b["image_ids"] = torch.arange(i * args.batch, (i + 1) * args.batch)
        pool.append({k: v.pin_memory() for k, v in b.items()} if device.type == "cuda" else b)
    loader = torch.utils.data.DataLoader([pool[i % len(pool)] for i in range(steps)], batch_size=None)
    timer = LoopTimer(args.warmup, args.iters)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[*callbacks, timer],
                                                 logger=instantiate_loggers(cfg.get("logger"), None) or False)
    trainer.fit(module, train_dataloaders=loader)
    ran = {"callbacks": [type(c).__name__ for c in trainer.callbacks if c is not timer],
           "loggers": [type(lg).__name__ for lg in trainer.loggers], "precision": str(trainer.precision),
           "steps": trainer.global_step}
    return timer.seconds, timer.images, ran


def trainer_cudnn_benchmark(overrides: list[str]) -> bool:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", *overrides])
    return bool(cfg.trainer.get("benchmark") or False)


def row(images: int, wall: float, cpu: float, steps: int) -> dict:
    return {"img_per_s": images / wall, "img_per_cpu_s": images / cpu, "ms_per_step": 1000 * wall / steps,
            "images": images}


def main(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--boxes", type=int, default=6, help="ground truths per image")
    p.add_argument("--amp", dest="amp", action="store_const", const=True,
                   help="bf16 autocast / bf16-mixed (default on a GPU; --no-amp: fp32)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the two rows this many times (--iters steps each), summing the times")
    p.set_defaults(amp=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    torch.backends.cudnn.benchmark = trainer_cudnn_benchmark(args.overrides)

    step = ours_step(args, device)
    totals = {"isolated step": [0.0, 0.0, 0], "trainer.fit": [0.0, 0.0, 0]}  # wall s, CPU s, images
    medians, round_ratios, round_cpu_ratios = [], [], []
    for n in range(args.rounds):  # alternating, so that a machine shared with other jobs weighs on both rows alike
        median, wall, cpu = isolated_seconds(step, args.warmup if n == 0 else 0, args.iters, device)
        medians.append(median)
        totals["isolated step"] = [totals["isolated step"][0] + wall, totals["isolated step"][1] + cpu,
                                   totals["isolated step"][2] + args.batch * args.iters]
        with tempfile.TemporaryDirectory() as out_dir:
            (loop_wall, loop_cpu), images, ran = loop_seconds(args, device, Path(out_dir))
        totals["trainer.fit"] = [totals["trainer.fit"][0] + loop_wall, totals["trainer.fit"][1] + loop_cpu,
                                 totals["trainer.fit"][2] + images]
        round_ratios.append(wall / loop_wall * images / (args.batch * args.iters))
        round_cpu_ratios.append(cpu / loop_cpu * images / (args.batch * args.iters))
    rows = {key: row(images, wall, cpu, args.iters * args.rounds) for key, (wall, cpu, images) in totals.items()}
    rows["isolated step"]["median_ms_per_step"] = 1000 * sorted(medians)[len(medians) // 2]
    ratio = rows["trainer.fit"]["img_per_s"] / rows["isolated step"]["img_per_s"]
    cpu_ratio = rows["trainer.fit"]["img_per_cpu_s"] / rows["isolated step"]["img_per_cpu_s"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = " ".join([o for o in args.overrides if o.startswith("model=")][-1:] or ["model=ssd300"])
    model = " ".join([model, *(o for o in args.overrides if not o.startswith("model="))])
    print(f"\nTraining throughput, isolated step vs trainer.fit: {model}, batch {args.batch}, {args.size}x{args.size}, "
          f"{'bf16' if args.amp else 'fp32'}, {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    print(f"trainer.fit ran {ran['steps']} steps with {', '.join(ran['callbacks'])}; "
          f"loggers {ran['loggers'] or 'none'}")
    print(f"{'':16s} {'img/s':>9s} {'ms/step':>9s} {'img/CPU-s':>10s} {'images':>7s}  ({args.rounds} x {args.iters} steps)")
    for key, r in rows.items():
        print(f"{key:16s} {r['img_per_s']:9.2f} {r['ms_per_step']:9.1f} {r['img_per_cpu_s']:10.2f} {r['images']:7d}")
    print(f"trainer.fit / isolated step: {ratio:.3f} (target >= 0.90; rounds: "
          f"{' '.join(f'{x:.3f}' for x in round_ratios)}); per CPU second of this process: {cpu_ratio:.3f}")
    result = {"device": name, "torch": torch.__version__, "batch": args.batch, "size": args.size, "amp": args.amp,
              "overrides": args.overrides, "threads": torch.get_num_threads(), "rows": rows, "ratio": ratio,
              "cpu_ratio": cpu_ratio, "round_ratios": round_ratios,
              "round_cpu_ratios": round_cpu_ratios, "loop": ran}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
