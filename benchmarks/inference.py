"""End-to-end SSD300 inference images/s, ours next to torchvision's ssd300_vgg16 (eval mode), in one run.

    python benchmarks/inference.py                      # GPU: batch 32, 300x300, bf16 autocast
    python benchmarks/inference.py --compile            # also ours with torch.compile on the network
    python benchmarks/inference.py --device cpu --batch 2 --warmup 0 --iters 1 --no-amp   # smoke run

Both sides start from the same uint8 batch already on the device and end with per-image boxes,
scores and labels after NMS, with the same decoding settings (score > 0.01, the top 400
candidates per class, per-class NMS at IoU 0.45, at most 200 detections per image):

* ours: normalise (``on_after_batch_transfer``), network, ``SSDHead.predict`` (decode, top-k,
  one ``batched_nms`` over the whole batch, no per-image loop).
* torchvision: ``model(images)`` in eval mode: its transform (normalise, resize), network and
  ``postprocess_detections`` (a Python loop over images and classes).

Two more rows time decode + NMS alone on fixed network outputs (ours ``predict``, torchvision's
``postprocess_detections``): the part where the per-image loop costs, apart from the network.

Random weights make every prior a candidate (softmax ~1/(C+1) > 0.01 everywhere): the worst
case for NMS on both sides, and the same work for both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_ours, random_batch, step_parser, time_steps  # noqa: E402


def build_models(args, device: torch.device):
    """Ours (from the configs, as train.py builds it) and torchvision's ssd300_vgg16, both in eval mode."""
    from torchvision.models.detection import ssd300_vgg16

    ours = build_ours(["model=ssd300", *args.overrides], args.num_classes).to(device).eval()
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=args.num_classes + 1).to(device).eval()
    return ours, theirs


def ours_step(module, batch: dict, args, device: torch.device, compile_net: bool = False):
    """One inference call of ours on a fixed batch; returns (step, dict holding the last predictions)."""
    net = torch.compile(module.detector) if compile_net else module.detector
    out = {}

    @torch.inference_mode()
    def step():
        images = module.on_after_batch_transfer(batch, 0)["images"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            raw = net(images)
        out["preds"] = module.detector.predict(raw, (args.size, args.size))

    return step, out


def torchvision_step(model, batch: dict, args, device: torch.device):
    """One eval-mode call of torchvision's ssd300_vgg16 (transform + network + postprocess)."""
    out = {}

    @torch.inference_mode()
    def step():
        images = list((batch["images"].float() / 255).unbind(0))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            out["preds"] = model(images)

    return step, out


def postprocess_steps(module, model, batch: dict, args):
    """Decode + NMS alone on fixed network outputs: ours (``SSDHead.predict``, batched) and
    torchvision's ``postprocess_detections`` (a loop over images and classes)."""
    with torch.inference_mode():
        raw = module.detector(module.on_after_batch_transfer(batch, 0)["images"])
        images, _ = model.transform(list((batch["images"].float() / 255).unbind(0)))
        features = list(model.backbone(images.tensors).values())
        head_outputs = model.head(features)
        anchors = model.anchor_generator(images, features)

    @torch.inference_mode()
    def ours():
        module.detector.predict(raw, (args.size, args.size))

    @torch.inference_mode()
    def torchvision():
        model.postprocess_detections(head_outputs, anchors, images.image_sizes)

    return {"ours decode+NMS only": ours, "torchvision postprocess only": torchvision}


def main(argv=None) -> dict:
    args = step_parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    module, model = build_models(args, device)
    batch = random_batch(args.batch, args.size, args.num_classes, 1, device)
    steps = {"ours": ours_step(module, batch, args, device)}
    if args.compile:
        steps["ours (torch.compile)"] = ours_step(module, batch, args, device, compile_net=True)
    steps["torchvision ssd300_vgg16"] = torchvision_step(model, batch, args, device)
    seconds, detections = {}, {}
    for name, (step, out) in steps.items():
        seconds[name] = time_steps(step, args.warmup, args.iters, device)
        detections[name] = sum(len(p["scores"]) for p in out["preds"]) / args.batch
    for name, step in postprocess_steps(module, model, batch, args).items():
        seconds[name] = time_steps(step, args.warmup, args.iters, device)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nSSD300 inference (normalise, forward, decode, NMS), batch {args.batch}, {args.size}x{args.size}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {gpu}, torch {torch.__version__}")
    print(f"{'':28s} {'img/s':>9s} {'ms/batch':>9s} {'dets/img':>9s}")
    img_per_s = {}
    for name, sec in seconds.items():
        img_per_s[name] = args.batch / sec
        dets = f"{detections[name]:9.1f}" if name in detections else ""
        print(f"{name:28s} {img_per_s[name]:9.1f} {sec * 1000:9.1f} {dets}")
    speedup = img_per_s["ours"] / img_per_s["torchvision ssd300_vgg16"]
    post = img_per_s["ours decode+NMS only"] / img_per_s["torchvision postprocess only"]
    print(f"ours / torchvision: {speedup:.2f}x end to end, {post:.2f}x decode+NMS alone")
    result = {"device": gpu, "torch": torch.__version__, "batch": args.batch, "size": args.size, "amp": args.amp,
              "img_per_s": img_per_s, "detections_per_image": detections, "speedup": speedup,
              "postprocess_speedup": post}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
