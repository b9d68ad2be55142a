"""Images/s of a full SSD300 training step, ours next to torchvision's ssd300_vgg16, in one run.

    python benchmarks/train_throughput.py                 # GPU: batch 32, 300x300, bf16 autocast, SGD
    python benchmarks/train_throughput.py --device cpu --batch 2 --warmup 1 --iters 1   # smoke run

Rows: ours (forward, batched matching, loss, backward, SGD step), ours with torch.compile on the
network (--compile: ``model.compile=true``), torchvision's full step, and torchvision's VGG16+extras backbone alone
(forward + backward): the floor any SSD300 step sits on. The rows are timed in turns, a step of each per round
(``common.time_interleaved``): medians of ``--iters`` rounds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours, random_batch, step_parser, time_interleaved  # noqa: E402


def ours_step(args, device, compile_net=False):
    # compile_net: the model's own switch (model.compile=true), as a training run would use it
    module = build_ours(["model=ssd300", *args.overrides, *(["model.compile=true"] if compile_net else [])],
                        args.num_classes).to(device)
    module.train()
    net = module.detector
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    batch = random_batch(args.batch, args.size, args.num_classes, args.boxes, device)

    def step():
        b = module.on_after_batch_transfer(batch, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            raw = net(b["images"])
            loss = module.detector.loss(raw, b, (args.size, args.size))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def torchvision_steps(args, device):
    from torchvision.models.detection import ssd300_vgg16

    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=args.num_classes + 1).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    batch = random_batch(args.batch, args.size, args.num_classes, args.boxes, device)
    images = list((batch["images"].float() / 255).unbind(0))
    targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(batch["boxes"], batch["labels"])]

    def full():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x = model.transform(images)[0].tensors

    def backbone():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            feats = model.backbone(x)
            loss = sum(f.float().mean() for f in feats.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return full, backbone


def main(argv=None):
    p = step_parser(__doc__)
    p.add_argument("--boxes", type=int, default=6, help="ground truths per image")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    steps = {"ours": ours_step(args, device)}
    if args.compile:
        steps["ours (torch.compile)"] = ours_step(args, device, True)
    steps["torchvision ssd300_vgg16"], steps["torchvision backbone fwd+bwd (floor)"] = torchvision_steps(args, device)
    rows = time_interleaved(steps, args.warmup, args.iters, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nSSD300 training step, batch {args.batch}, {args.size}x{args.size}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {name}, torch {torch.__version__}")
    print(f"{'':40s} {'img/s':>9s} {'ms/step':>9s}")
    result = {}
    for key, sec in rows.items():
        result[key] = args.batch / sec
        print(f"{key:40s} {args.batch / sec:9.1f} {sec * 1000:9.1f}")
    speedup = result["ours"] / result["torchvision ssd300_vgg16"]
    print(f"ours / torchvision: {speedup:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": args.batch,
                                         "img_per_s": result, "speedup": speedup}, indent=2))
    return result


if __name__ == "__main__":
    main()
