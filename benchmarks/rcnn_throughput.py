"""Images/s of a Faster R-CNN training step on VGG16's conv5_3 (stride 16), ours next to torchvision's
``FasterRCNN`` on the same trunk, in one run.

    python benchmarks/rcnn_throughput.py                     # GPU: batch 8, 608 x 1008, bf16 autocast, SGD
    python benchmarks/rcnn_throughput.py --device cpu --batch 2 --height 256 --width 384 --warmup 1 --iters 2 --no-amp

Rows, on the same random batch (6 boxes an image):
- ours: ``model=faster_rcnn backbone=vgg16`` (plain VGG16 to conv5_3 as torchvision's; the paper's anchors
  128/256/512 for this input size; fc6/fc7 of 1024, torchvision's TwoMLPHead width): normalise, forward
  (RPN, proposals, RoI sampling, RoIAlign, RoI head), both stages' losses, backward, SGD step; everything
  batched over the padded batch.
- torchvision: ``FasterRCNN`` on ``vgg16().features[:30]`` (conv5_3 + ReLU) with the same anchors, RoIAlign 7x7
  and its default 1024-wide TwoMLPHead, its transform told the input is already at its size (no resize); its
  sampling, proposal filtering and post-processing loop over images.
- backbone floor: the VGG16 trunk alone, forward and backward of the mean of its map.
"Two-stage overhead" is what a step costs beyond the floor (RPN, proposals, sampling, RoI head, losses).
Input sides must be multiples of 16 (our RoIs are clipped to the map's extent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours, random_batch, step_parser, time_interleaved  # noqa: E402


def ours_step(args, device):
    size = [args.height, args.width]
    overrides = ["model=faster_rcnn", "backbone=vgg16", f"input_size={size}", "head.anchor_sizes=[128,256,512]",
                 "head.fc_width=1024", "multiscale.sizes=null", *args.overrides]
    module = build_ours(overrides, args.num_classes).to(device).train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    batch = rect_batch(args, device)

    def step():
        b = module.on_after_batch_transfer(batch, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = module.detector.loss(module.detector(b["images"], b), b, (args.height, args.width))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def torchvision_steps(args, device):
    from torchvision.models import vgg16
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    trunk = vgg16(weights=None).features[:30]
    trunk.out_channels = 512
    model = FasterRCNN(
        trunk, num_classes=args.num_classes + 1,
        min_size=min(args.height, args.width), max_size=max(args.height, args.width),
        rpn_anchor_generator=AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
    ).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    batch = rect_batch(args, device)
    images = list((batch["images"].float() / 255).unbind(0))
    targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(batch["boxes"], batch["labels"])]

    def full():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x = model.transform(images)[0].tensors
    assert tuple(x.shape[-2:]) == (args.height, args.width), "torchvision resized the batch"

    def backbone():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = trunk(x).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return full, backbone


def rect_batch(args, device) -> dict:
    """``common.random_batch`` at (height, width): a square one cropped to the rectangle, boxes clipped."""
    side = max(args.height, args.width)
    batch = random_batch(args.batch, side, args.num_classes, args.boxes, device)
    batch["images"] = batch["images"][..., : args.height, : args.width].contiguous()
    limit = torch.tensor([args.width, args.height, args.width, args.height], device=device, dtype=torch.float32)
    boxes = torch.minimum(batch["boxes"] * (min(args.height, args.width) / side), limit)
    batch["boxes"] = boxes
    return batch


def main(argv=None):
    p = step_parser(__doc__)
    p.set_defaults(batch=8)
    p.add_argument("--height", type=int, default=608)
    p.add_argument("--width", type=int, default=1008)
    p.add_argument("--boxes", type=int, default=6, help="ground truths per image")
    args = p.parse_args(argv)
    if args.height % 16 or args.width % 16:
        p.error("--height and --width must be multiples of 16")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = {"ours": ours_step(args, device)}
    steps["torchvision FasterRCNN"], steps["VGG16 conv5_3 fwd+bwd (floor)"] = torchvision_steps(args, device)
    rows = time_interleaved(steps, args.warmup, args.iters, device)  # in turns: a drift hits every row alike
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nFaster R-CNN training step, VGG16 conv5_3, batch {args.batch}, {args.height}x{args.width}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {name}, torch {torch.__version__}")
    print(f"{'':40s} {'img/s':>9s} {'ms/step':>9s}")
    result = {key: args.batch / sec for key, sec in rows.items()}
    for key, sec in rows.items():
        print(f"{key:40s} {result[key]:9.2f} {sec * 1000:9.1f}")
    floor = rows["VGG16 conv5_3 fwd+bwd (floor)"]
    overhead = {"ours": rows["ours"] - floor, "torchvision": rows["torchvision FasterRCNN"] - floor}
    speedup = result["ours"] / result["torchvision FasterRCNN"]
    print(f"ours / torchvision: {speedup:.2f}x; two-stage overhead (step - floor) ms: ours "
          f"{overhead['ours'] * 1000:.1f}, torchvision {overhead['torchvision'] * 1000:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": args.batch,
                                         "size": [args.height, args.width], "amp": args.amp, "img_per_s": result,
                                         "overhead_s": overhead, "speedup": speedup}, indent=2))
    return result


if __name__ == "__main__":
    main()
