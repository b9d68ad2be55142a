"""Forward + backward images/s of every backbone, ours next to torchvision's model of the same
architecture where torchvision has it, with parameter counts and GFLOPs, in one run.

    python benchmarks/backbones.py                                  # GPU: batch 32, sizes 300 and 416, bf16
    python benchmarks/backbones.py --device cpu --batch 2 --warmup 1 --iters 3 --no-amp   # the CPU table

Each backbone runs its whole trunk and returns its stride-32 map, as torchvision's counterparts do (every
tap returned would add gradients torchvision's side has not): they run the same layers: ``vgg16(_bn).features`` (pool5 included) and ``mobilenet_v2.features``. Our VGG16 pools in
ceil mode (SSD300's 38x38 conv4_3 at 300 px), torchvision's in floor mode: at 300 px ours computes
conv5 on 19x19 maps where torchvision's has 18x18; at 416 (and any multiple of 32) the two are the same. The loss is the
sum of the means of the returned maps, so backward runs through every layer. GFLOPs are forward
FLOPs per image (2 x multiply-adds, torch.utils.flop_counter), at the row's size. Each model is timed
twice per size, in two rounds of opposite order, and its faster timing is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_steps  # noqa: E402

BACKBONES = ["vgg16", "vgg16_bn", "darknet19", "darknet53", "mobilenet_v1", "mobilenet_v2"]


def ours(name: str) -> torch.nn.Module:
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "backbone" / f"{name}.yaml")
    cfg.out_strides = [32]  # the whole trunk
    return hydra.utils.instantiate(cfg)


def torchvision_counterpart(name: str) -> torch.nn.Module | None:
    from torchvision import models

    if name in ("vgg16", "vgg16_bn"):
        return getattr(models, name)(weights=None).features
    if name == "mobilenet_v2":
        return models.mobilenet_v2(weights=None).features
    return None


def gflops(net: torch.nn.Module, size: int, device) -> float:
    x = torch.zeros(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 1e9


def step_fn(net: torch.nn.Module, batch: int, size: int, device, amp: bool):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
            maps = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(m.float().mean() for m in maps)
        loss.backward()
        for p in net.parameters():
            p.grad = None

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 416])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print("| backbone | size | params (M) | GFLOPs | ours img/s | torchvision img/s | ours / torchvision |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.backbones:
        nets = {"ours": ours(name).to(device).train(), "torchvision": torchvision_counterpart(name)}
        if nets["torchvision"] is not None:
            nets["torchvision"] = nets["torchvision"].to(device).train()
        for net in nets.values():
            if net is not None:
                net.to(memory_format=torch.channels_last)
        params = sum(q.numel() for q in nets["ours"].parameters()) / 1e6
        for size in args.sizes:
            row = {"backbone": name, "size": size, "params_m": params, "gflops": gflops(nets["ours"], size, device)}
            # two rounds in opposite orders, the faster of each model's two timings: the first model timed
            # on an idle GPU also pays its clock ramp-up (an H200 idles at 345 MHz), which took 3-7% off
            # whichever ran first in a single round
            present = [who for who, net in nets.items() if net is not None]
            row.update({who: None for who in nets if who not in present})
            for order in (present, present[::-1]):
                for who in order:
                    sec = time_steps(step_fn(nets[who], args.batch, size, device, args.amp), args.warmup, args.iters,
                                     device)
                    row[who] = max(row.get(who) or 0.0, args.batch / sec)
            ratio = f"{row['ours'] / row['torchvision']:.2f}x" if row["torchvision"] else "n/a (no torchvision model)"
            tv = f"{row['torchvision']:.1f}" if row["torchvision"] else "n/a"
            print(f"| {name} | {size} | {params:.2f} | {row['gflops']:.2f} | {row['ours']:.1f} | {tv} | {ratio} |",
                  flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "batch": args.batch, "amp": args.amp, "rows": rows},
                                        indent=1))
    return rows


if __name__ == "__main__":
    main()
