"""What a model's training step costs beyond its convolutions, in one run: the full step next to the
same network's forward + backward without the loss, and next to the backbone's alone (the floor).

    python benchmarks/step_breakdown.py --model yolov2                  # GPU: batch 32, 416x416, bf16
    python benchmarks/step_breakdown.py --device cpu --batch 4 --warmup 1 --iters 3 --no-amp --model yolov2

Rows, on the same random batch (``common.random_batch``: 6 boxes per image):
- full step: on_after_batch_transfer (normalise), forward, assignment + loss, backward, SGD step.
- network fwd+bwd: backbone + neck + head convolutions, forward and backward of the mean of the raw
  outputs (no assignment, no loss), plus the same SGD step.
- backbone fwd+bwd (floor): the backbone alone, forward and backward of the mean of its maps.
The issue's share, "head, assignment and loss", is (full - backbone) / full; "assignment and loss" alone
is (full - network) / full. Multi-scale and mixup are off: the batch stays at ``--size``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours, random_batch, step_parser, time_steps  # noqa: E402


def mean_of(raw) -> torch.Tensor:
    """The mean of every tensor in a head's raw output (a dataclass, a tensor or a list of them)."""
    if dataclasses.is_dataclass(raw):
        raw = [getattr(raw, f.name) for f in dataclasses.fields(raw)]
    tensors = [raw] if isinstance(raw, torch.Tensor) else [t for t in raw if isinstance(t, torch.Tensor)]
    return sum(t.float().mean() for t in tensors)


def steps(args, device):
    overrides = [f"model={args.model}", f"input_size=[{args.size},{args.size}]", "multiscale.sizes=null",
                 "mixup.prob=0", *args.overrides]
    module = build_ours(overrides, args.num_classes).to(device).train()
    net = module.detector
    opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    batch = random_batch(args.batch, args.size, args.num_classes, args.boxes, device)
    size = (args.size, args.size)

    def full():
        b = module.on_after_batch_transfer(batch, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = net.loss(net(b["images"], b), b, size)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def network():
        b = module.on_after_batch_transfer(batch, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = mean_of(net(b["images"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def backbone():
        b = module.on_after_batch_transfer(batch, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = sum(f.float().mean() for f in net.backbone(b["images"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return {"full step": full, "network fwd+bwd": network, "backbone fwd+bwd (floor)": backbone}


def main(argv=None):
    p = step_parser(__doc__)
    p.set_defaults(size=416)
    p.add_argument("--model", default="yolov2", help="a configs/model/ name")
    p.add_argument("--boxes", type=int, default=6, help="ground truths per image")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {name: args.batch / time_steps(fn, args.warmup, args.iters, device) for name, fn in steps(args, device).items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    full, network, floor = result["full step"], result["network fwd+bwd"], result["backbone fwd+bwd (floor)"]
    shares = {"head, assignment and loss": 1 - full / floor, "assignment and loss": 1 - full / network}
    print(f"\n{args.model} training step, batch {args.batch}, {args.size}x{args.size}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {name}, torch {torch.__version__}")
    print(f"{'':40s} {'img/s':>9s} {'ms/step':>9s}")
    for key, img_s in result.items():
        print(f"{key:40s} {img_s:9.1f} {args.batch / img_s * 1000:9.1f}")
    for key, share in shares.items():
        print(f"share of the step in {key}: {share:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "model": args.model,
                                         "batch": args.batch, "size": args.size, "amp": args.amp,
                                         "img_per_s": result, "shares": shares}, indent=2))
    return result, shares


if __name__ == "__main__":
    main()
