"""Forward FLOPs of a detector per image, in total and per part (backbone, neck, head).

2 x multiply-adds as ``torch.utils.flop_counter`` counts them (convolutions, matmuls, ...; the
elementwise ops and the decoding are not counted), benchmarks/backbones.py's count. The forward runs
on the meta device (shapes only, no arithmetic: as ``DetectionModule._check_input_size`` runs it), on
the CPU where an op has no meta kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_gflops", "forward_gflops_by_part"]


def forward_gflops_by_part(detector: torch.nn.Module, input_size: Sequence[int]) -> dict[str, float]:
    """GFLOPs of one image of ``input_size`` (H, W) through ``detector`` in eval mode: ``{"total": ...}``
    and one entry per direct child module that does any counted work (``backbone``, ``neck``, ``head``).
    The detector's train/eval mode is restored."""
    was_training = detector.training
    detector.eval()
    counter = FlopCounterMode(display=False)
    tensors = {**dict(detector.named_parameters()), **dict(detector.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    try:
        try:
            with counter, torch.no_grad():
                functional_call(detector, meta, (torch.empty(1, 3, *input_size, device="meta"),))
        except NotImplementedError:
            counter = FlopCounterMode(display=False)
            device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
            with counter, torch.no_grad():
                detector(torch.zeros(1, 3, *input_size, device=device))
    finally:
        detector.train(was_training)
    # the counter names modules by the root's class and attribute path: "Detector.backbone", ...
    root = type(detector).__name__
    parts = {name[len(root) + 1:]: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()
             if name.startswith(root + ".") and "." not in name[len(root) + 1:]}
    return {"total": counter.get_total_flops() / 1e9, **{k: v for k, v in parts.items() if v > 0}}


def forward_gflops(detector: torch.nn.Module, input_size: Sequence[int]) -> float:
    """Forward GFLOPs of one image of ``input_size`` (H, W) (see ``forward_gflops_by_part``)."""
    return forward_gflops_by_part(detector, input_size)["total"]
