"""The training summary's numbers: forward FLOPs per part against a hand count, and the logged table
(parameters and GFLOPs per image, no zero FLOPs column) when a run starts."""

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from detectors.callbacks.model_summary import ModelSummary
from detectors.detector import Detector
from detectors.flops import forward_gflops, forward_gflops_by_part


class Backbone(nn.Module):
    out_channels = (8,)
    strides = (2,)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, images):
        return [self.conv(images)]


class Head(nn.Module):
    def __init__(self, in_channels, strides):
        super().__init__()
        self.conv = nn.Conv2d(in_channels[0], 5, 1)

    def forward(self, features, targets=None):
        return self.conv(features[0])


def toy_detector():
    return Detector(Backbone(), nn.Identity(), Head)


def test_flops_per_part_are_the_hand_counted_multiply_adds():
    h, w = 32, 48
    # stride-2 3x3 conv over 3 channels to 8 at 16 x 24, then a 1x1 conv 8 -> 5; a FLOP is half a
    # multiply-add (torch.utils.flop_counter's convention, torchvision's model tables count MACs)
    backbone = 2 * (h // 2) * (w // 2) * 8 * 3 * 3 * 3
    head = 2 * (h // 2) * (w // 2) * 5 * 8
    parts = forward_gflops_by_part(toy_detector(), (h, w))
    assert parts == pytest.approx({"total": (backbone + head) / 1e9, "backbone": backbone / 1e9,
                                   "head": head / 1e9})  # the identity neck does no work: no row
    assert forward_gflops(toy_detector(), (h, w)) == pytest.approx((backbone + head) / 1e9)


def test_the_count_keeps_the_mode_and_leaves_the_weights_on_their_device():
    detector = toy_detector().train()
    forward_gflops_by_part(detector, (32, 32))
    assert detector.training
    assert all(p.device.type == "cpu" for p in detector.parameters())


def test_the_summary_logs_parameters_and_gflops_of_every_part(caplog):
    detector = toy_detector()
    module = nn.Module()
    module.detector = detector
    module.input_size = (32, 48)
    trainer = SimpleNamespace(is_global_zero=True)
    with caplog.at_level(logging.INFO, logger="detectors.callbacks.model_summary"):
        ModelSummary().on_fit_start(trainer, module)
    lines = caplog.text.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["backbone"], ["head"], ["total"])}
    params_backbone = 8 * 3 * 9 + 8
    params_head = 5 * 8 + 5
    assert row["backbone"][:4] == ["backbone", "Backbone", str(params_backbone), str(params_backbone)]
    assert float(row["backbone"][4]) == pytest.approx(2 * 16 * 24 * 8 * 27 / 1e9, abs=0.005)
    assert row["head"][:4] == ["head", "Head", str(params_head), str(params_head)]
    assert row["total"][1:3] == [str(params_backbone + params_head)] * 2
    assert "at 32 x 48" in caplog.text
    # the neck (Identity) has no parameters and does no work
    assert any(line.split()[:2] == ["neck", "Identity"] and line.split()[-1] == "0.00" for line in lines)


def test_a_count_that_fails_still_prints_the_parameters(caplog, monkeypatch):
    import detectors.callbacks.model_summary as summary

    def fail(*args):
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(summary, "forward_gflops_by_part", fail)
    module = nn.Module()
    module.detector = toy_detector()
    module.input_size = (32, 32)
    with caplog.at_level(logging.INFO, logger="detectors.callbacks.model_summary"):
        ModelSummary().on_fit_start(SimpleNamespace(is_global_zero=True), module)
    assert "forward FLOPs not counted (RuntimeError: no meta kernel)" in caplog.text
    total = next(line for line in caplog.text.splitlines() if line.startswith("total"))
    assert total.split()[:3] == ["total", "269", "269"] and total.split()[3] == "-"


def test_a_real_detectors_parts_add_up_and_equal_a_per_layer_count():
    """SSDLite on MobileNetV2 (depthwise convs: groups), built from the configs as train.py builds it, at a
    non-square size: each part's GFLOPs (counted on the meta device) equal 2 x the multiply-adds of its own
    convolutions and linear layers, taken from their real outputs in a CPU forward by hooks; the parts add up
    to the total."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_model_matrix import build

    size = (256, 320)
    detector = build("ssdlite", "mobilenet_v2", f"input_size=[{size[0]},{size[1]}]").detector.eval()
    counted: dict[str, int] = {}

    def count(name):
        def hook(layer, inputs, out):
            if isinstance(layer, nn.Conv2d):
                kh, kw = layer.kernel_size
                macs = out[0].numel() * (layer.in_channels // layer.groups) * kh * kw
            else:
                macs = out[0].numel() * layer.in_features
            counted[name.split(".")[0]] = counted.get(name.split(".")[0], 0) + 2 * macs
        return hook

    layers = [(n, m) for n, m in detector.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert any(m.groups > 1 for _, m in layers if isinstance(m, nn.Conv2d))  # depthwise ones are in the count
    handles = [m.register_forward_hook(count(n)) for n, m in layers]
    with torch.no_grad():
        detector(torch.zeros(1, 3, *size))
    for h in handles:
        h.remove()
    parts = forward_gflops_by_part(detector, size)
    assert set(parts) == {"total", "backbone", "neck", "head"}
    for part in ("backbone", "neck", "head"):
        assert parts[part] == pytest.approx(counted[part] / 1e9, rel=1e-9), part
    assert parts["total"] == pytest.approx(parts["backbone"] + parts["neck"] + parts["head"], rel=1e-9)
