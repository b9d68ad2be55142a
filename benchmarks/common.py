"""Shared pieces of the benchmarks: timing, our model from the configs, a random detection batch."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import detectors  # noqa: F401  (resolvers)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def step_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every model benchmark takes (device, batch, size, timing, our config overrides)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the network")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("overrides", nargs="*", help="config overrides for our model, e.g. backbone=vgg16")
    return p


def build_ours(overrides: list[str], num_classes: int):
    """Our DetectionModule from the configs (as train.py builds it), without data or trainer."""
    import hydra

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", *overrides])
    with open_dict(cfg):
        cfg.data.classes = [f"class{i}" for i in range(num_classes)]
    return hydra.utils.instantiate(cfg.model)


def random_batch(batch: int, size: int, num_classes: int, boxes_per_image: int, device, seed: int = 0) -> dict:
    """uint8 images and padded targets as ``collate_detection`` makes them."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, boxes_per_image, 2, generator=g) * size * 0.7
    wh = torch.rand(batch, boxes_per_image, 2, generator=g) * size * 0.3 + 8
    return {
        "images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "boxes": torch.cat([xy, (xy + wh).clamp(max=size)], -1).to(device),
        "labels": torch.randint(0, num_classes, (batch, boxes_per_image), generator=g).to(device),
        "mask": torch.ones(batch, boxes_per_image, dtype=torch.bool, device=device),
        "weights": torch.ones(batch, boxes_per_image, device=device),
        "difficult": torch.zeros(batch, boxes_per_image, dtype=torch.bool, device=device),
        "num_skipped": torch.tensor(0, device=device),
    }


def time_steps(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call of ``step`` after ``warmup`` calls (device-synchronised)."""
    return time_interleaved({"step": step}, warmup, iters, device)["step"]


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per call of each of ``steps``, timed in turns (one call of each per round, ``iters``
    rounds after ``warmup``), so that a drift in the machine's pace (another VM on a shared host, the clock)
    falls on every row alike instead of on whichever ran last: the side-by-side rows of a noisy 2-core CPU."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
