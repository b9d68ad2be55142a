"""Batch norms folded into their convolutions (predict.py's inference): the folded network gives the unfolded
one's outputs and detections, for torchvision's BatchNorm2d (VGG16-BN, MobileNetV2) and darknet's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from detectors.fold_batch_norm import fold_batch_norms
from detectors.layers import DarknetBatchNorm2d
from test_model_matrix import build, size_of


def with_running_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running means and variances and affine parameters, as a trained network has (fresh ones are 0, 1,
    1, 0: a fold that ignored any of them would still pass)."""
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.3)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module


def tensors_of(raw) -> list[torch.Tensor]:
    """The floating tensors of a head's raw output (a tensor, a tuple or list, or a dataclass of them)."""
    if isinstance(raw, torch.Tensor):
        return [raw] if raw.is_floating_point() else []
    if dataclasses.is_dataclass(raw):
        raw = [getattr(raw, f.name) for f in dataclasses.fields(raw)]
    elif isinstance(raw, dict):
        raw = list(raw.values())
    return [t for item in raw if isinstance(item, (torch.Tensor, list, tuple, dict)) or dataclasses.is_dataclass(item)
            for t in tensors_of(item)] if isinstance(raw, (list, tuple)) else []


@pytest.mark.parametrize("model,backbone,overrides", [
    ("ssd300", "vgg16_bn", []),
    ("ssdlite", "mobilenet_v2", []),
    ("yolov3_tiny", "darknet_tiny", ["backbone.darknet_bn=true", "neck.darknet_bn=true"]),
])
def test_folded_network_predicts_as_the_unfolded_one(model, backbone, overrides):
    torch.manual_seed(0)
    detector = with_running_statistics(build(model, backbone, *overrides).detector).eval()
    batch_norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    darknet = any(isinstance(m, DarknetBatchNorm2d) for m in batch_norms)
    assert darknet == bool(overrides)
    h, w = size_of(model)
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = detector(images)
        preds_before = detector.predict(before, (h, w))
        folded = fold_batch_norms(detector)
        after = detector(images)
        preds_after = detector.predict(after, (h, w))
    left = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    assert folded > 0 and folded + len(left) == len(batch_norms)
    pairs = list(zip(tensors_of(before), tensors_of(after), strict=True))
    assert pairs
    for a, b in pairs:
        assert torch.allclose(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((b - a).abs().max())
    # the detections: the same count and scores (which of two near-equal boxes NMS keeps may differ by rounding
    # on untrained weights, so the boxes are not compared one by one)
    for p, q in zip(preds_before, preds_after, strict=True):
        assert len(p["scores"]) == len(q["scores"])
        assert torch.allclose(p["scores"].sort().values, q["scores"].sort().values, atol=1e-4)


@pytest.mark.parametrize("darknet_bn", [False, True])
def test_a_block_with_tiny_variances_folds_with_its_own_normalisation(darknet_bn):
    """Dead channels (variance 1e-8 .. 1e-4): darknet's sqrt(var) + 1e-6 and torch's sqrt(var + 1e-5) differ
    there by up to 30x, so folding with the other formula fails this."""
    from detectors.layers import ConvBN

    block = with_running_statistics(ConvBN(3, 16, 3, darknet_bn=darknet_bn))
    block.bn.running_var[::3] = torch.logspace(-8, -4, len(block.bn.running_var[::3]))
    block.eval()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = block(x)
        assert fold_batch_norms(block) == 1 and isinstance(block.bn, nn.Identity)
        after = block(x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_folding_a_training_network_is_refused():
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
