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


def test_torch_counts_conv_flops_as_twice_the_multiply_adds():
    # the convention the summary's column states, checked on torch itself
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        nn.Conv2d(2, 3, 1, bias=False)(torch.zeros(1, 2, 4, 4))
    assert counter.get_total_flops() == 2 * 16 * 3 * 2
