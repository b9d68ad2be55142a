"""The model at the start of training: parameters and forward GFLOPs per image, part by part."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary

from detectors.flops import forward_gflops_by_part

log = logging.getLogger(__name__)


class ModelSummary(LightningModelSummary):
    """Logs, when fitting starts (rank 0), a table such as

        part      type       params  trainable  GFLOPs/image
        backbone  VGG16      14.7 M     14.7 M         55.63
        neck      SSDExtras   8.2 M      8.2 M          4.63
        head      SSDHead     1.5 M      1.5 M          1.10
        total                24.4 M     24.4 M         61.35   at 300 x 300, 93.2 MB of parameters

    (SSD300, as train.py logs it)

    to the console and ``train.log``. Lightning's ModelSummary prints FLOPs only for a module with an
    ``example_input_array`` (0 in every row otherwise), which this module cannot take: its batch hooks
    expect the loader's batches. Here the detector runs once on the meta device (shapes only, no
    arithmetic: milliseconds) at ``input_size``; FLOPs are 2 x multiply-adds as
    ``torch.utils.flop_counter`` counts them, the decoding and NMS not included. A subclass of Lightning's,
    so the trainer adds no summary of its own.
    """

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        detector = pl_module.detector
        height, width = pl_module.input_size
        try:
            gflops = forward_gflops_by_part(detector, (height, width))
        except Exception as e:  # noqa: BLE001 (a count must never stop a run)
            log.warning("forward FLOPs not counted (%s: %s)", type(e).__name__, e)
            gflops = {}
        rows = [("part", "type", "params", "trainable", "GFLOPs/image")]
        for name, part in detector.named_children():
            # a part the count reached but that did no counted work (an identity neck) reads 0.00
            part_gflops = gflops.get(name, 0.0) if gflops else None
            rows.append((name, type(part).__name__, *_counts(part), _gflops(part_gflops)))
        megabytes = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 2**20
        rows.append(("total", "", *_counts(pl_module), _gflops(gflops.get("total"))))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                            *(cell.rjust(w) for cell, w in zip(row[2:], widths[2:]))]) for row in rows]
        lines[-1] += f"   at {height} x {width}, {megabytes:.1f} MB of parameters"
        log.info("model %s\n%s", type(detector.head).__name__, "\n".join(lines))


def _counts(module) -> tuple[str, str]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return _human(total), _human(trainable)


def _human(count: int) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            return f"{count / limit:.1f} {suffix}"
    return str(count)


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
