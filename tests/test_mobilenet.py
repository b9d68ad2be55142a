"""MobileNet v1/v2 backbones against independent references: torchvision's own mobilenet_v2 (maps,
channels, state dicts) and parameter counts worked out by hand from Howard et al. 2017, Table 1."""

import logging

import pytest
import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2, mobilenet_v3_small

from detectors.backbones.mobilenet import MobileNetV1, MobileNetV2


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def total_stride(features: nn.Sequential) -> int:
    stride = 1
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            stride *= m.stride[0]
    return stride


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so an eval-mode comparison also checks them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def torchvision_maps(features: nn.Sequential, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """torchvision's features run layer by layer; the outputs of the layers ``indices``."""
    outs = {}
    for i, layer in enumerate(features):
        x = layer(x)
        outs[i] = x
    return [outs[i] for i in indices]


# ---- MobileNetV2 against torchvision ---------------------------------------------------------

V2_TAP_INDEX = {2: 1, 4: 3, 8: 6, 16: 13, 32: 18}


@pytest.fixture(scope="module")
def v2_reference(tmp_path_factory):
    torch.manual_seed(0)
    reference = randomize_batchnorm(mobilenet_v2(weights=None)).eval()
    path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_v2_maps_equal_torchvisions_intermediate_outputs(v2_reference, caplog):
    reference, path = v2_reference
    with caplog.at_level(logging.INFO, logger="detectors.backbones.mobilenet"):
        ours = MobileNetV2(weights=str(path)).eval()
    assert ours.weights_source.startswith(f"file {path}")
    assert "backbone mobilenet_v2: weights from file" in caplog.text
    assert ours.strides == (8, 16, 32) and ours.out_channels == (32, 96, 1280)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        got = ours(x)
        want = torchvision_maps(reference.features, x, [6, 13, 18])
    assert [tuple(t.shape) for t in got] == [(1, 32, 12, 12), (1, 96, 6, 6), (1, 1280, 3, 3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_v2_all_taps_are_torchvisions_layers(v2_reference):
    reference, path = v2_reference
    ours = MobileNetV2(out_strides=(2, 4, 8, 16, 32), weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
        want = torchvision_maps(reference.features, x, list(V2_TAP_INDEX.values()))
    assert ours.out_channels == (16, 24, 32, 96, 1280)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_v2_width_half_channels_match_torchvision():
    reference = mobilenet_v2(weights=None, width_mult=0.5).eval()
    ours = MobileNetV2(out_strides=(2, 4, 8, 16, 32), width_mult=0.5).eval()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        want = torchvision_maps(reference.features, x, list(V2_TAP_INDEX.values()))
        got = ours(x)
    assert ours.out_channels == tuple(w.shape[1] for w in want) == (8, 16, 16, 48, 1280)
    assert [g.shape for g in got] == [w.shape for w in want]
    # the same layers: torchvision's width-0.5 features load into ours exactly
    assert n_params(ours) == n_params(reference.features)
    assert ours.features.state_dict().keys() == reference.features.state_dict().keys()


def test_v2_torchvision_weights_name_loads_through_the_enum(monkeypatch):
    torch.manual_seed(1)
    reference = randomize_batchnorm(mobilenet_v2(weights=None))
    member = MobileNet_V2_Weights.IMAGENET1K_V1
    calls = []

    def fake_get_state_dict(*args, **kwargs):  # no download: the enum path up to the state dict
        calls.append(kwargs)
        return reference.state_dict()

    monkeypatch.setattr(member, "get_state_dict", fake_get_state_dict)
    ours = MobileNetV2(weights="IMAGENET1K_V1")
    assert calls, "the enum member's get_state_dict was not used"
    assert "MobileNet_V2_Weights.IMAGENET1K_V1" in ours.weights_source
    for key, value in reference.features.state_dict().items():
        torch.testing.assert_close(ours.features.state_dict()[key], value, msg=key)


def test_v2_unknown_weights_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="MobileNet_V2_Weights name.*IMAGENET1K_V1, IMAGENET1K_V2"):
        MobileNetV2(weights="IMAGENET_TYPO")


def test_v2_torchvision_weights_need_width_one():
    with pytest.raises(ValueError, match="for width_mult 1.0 only, not 0.5"):
        MobileNetV2(width_mult=0.5, weights="IMAGENET1K_V1")


def test_v2_file_of_another_network_is_a_clear_error(tmp_path):
    path = tmp_path / "v3.pth"
    torch.save(mobilenet_v3_small(weights=None).state_dict(), path)  # features.N keys too, other shapes
    with pytest.raises(ValueError, match="do not fit mobilenet_v2"):
        MobileNetV2(weights=str(path))


def test_v2_state_dict_of_this_module_round_trips(tmp_path):
    torch.manual_seed(2)
    first = MobileNetV2(out_strides=(8, 16), attention="se")
    path = tmp_path / "own.pth"
    torch.save({"state_dict": {f"detector.backbone.{k}": v for k, v in first.state_dict().items()}}, path)
    second = MobileNetV2(out_strides=(8, 16), attention="se", weights=str(path))
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, msg=key)


# ---- MobileNetV1 against the paper -----------------------------------------------------------

# Table 1: conv 3x3/2 to 32, then depthwise separable blocks (out channels, stride)
TABLE1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def v1_params_by_hand(alpha: float) -> int:
    """Table 1 without avg pool / FC; channels max(8, int(c * alpha)); convs have no bias."""
    ch = lambda c: max(8, int(c * alpha))  # noqa: E731
    c = ch(32)
    total = 3 * 3 * 3 * c + 2 * c  # first conv 3x3x3 -> 32, its BN (gamma, beta)
    for out, _ in TABLE1:
        o = ch(out)
        total += 3 * 3 * c + 2 * c  # depthwise 3x3 on c channels + BN
        total += c * o + 2 * o  # pointwise 1x1 c -> o + BN
        c = o
    return total


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_v1_parameter_count_is_table_1s(alpha):
    ours = MobileNetV1(out_strides=(2, 4, 8, 16, 32), width_mult=alpha)
    assert n_params(ours) == v1_params_by_hand(alpha)


def test_v1_with_the_classifier_is_the_papers_4_2_million():
    # the paper's 4.2M counts the 1000-class FC on the 1024-d pooled feature: 1024 * 1000 + 1000
    ours = n_params(MobileNetV1(out_strides=(32,)))
    assert ours == 3_206_976
    assert abs(ours + 1024 * 1000 + 1000 - 4.2e6) / 4.2e6 < 0.02


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
@pytest.mark.parametrize("out_strides", [(8, 16, 32), (2, 4, 8, 16, 32), (16,), (4, 32)])
def test_v1_feature_shapes(size, out_strides):
    widths = {2: 64, 4: 128, 8: 256, 16: 512, 32: 1024}
    model = MobileNetV1(out_strides=out_strides).eval()
    assert model.strides == tuple(out_strides)
    assert model.out_channels == tuple(widths[s] for s in out_strides)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    h, w = size
    assert [tuple(o.shape) for o in outs] == [(1, widths[s], h // s, w // s) for s in out_strides]


def test_v1_loads_a_state_dict_file_and_refuses_names(tmp_path):
    torch.manual_seed(3)
    first = randomize_batchnorm(MobileNetV1(width_mult=0.5)).eval()
    path = tmp_path / "v1.pth"
    torch.save(first.state_dict(), path)
    second = MobileNetV1(width_mult=0.5, weights=str(path)).eval()
    assert second.weights_source.startswith(f"file {path}")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(first(x), second(x)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="do not fit mobilenet_v1"):
        MobileNetV1(weights=str(path))  # width 0.5 tensors for a width-1 model
    with pytest.raises(ValueError, match="no such file"):
        MobileNetV1(weights="IMAGENET1K_V1")


# ---- both: truncation, attention, the input spec ---------------------------------------------

BOTH = [MobileNetV1, MobileNetV2]
TAP_CHANNELS = {MobileNetV1: {2: 64, 4: 128, 8: 256, 16: 512, 32: 1024},
                MobileNetV2: {2: 16, 4: 24, 8: 32, 16: 96, 32: 1280}}


@pytest.mark.parametrize("cls", BOTH)
def test_truncated_after_the_deepest_requested_stride(cls):
    full, short = cls(), cls(out_strides=(8,))
    assert total_stride(short.features) == 8 and total_stride(full.features) == 32
    assert n_params(short) < n_params(full)
    with torch.no_grad():
        outs = short.eval()(torch.randn(1, 3, 64, 64))
    assert len(outs) == 1 and tuple(outs[0].shape) == (1, TAP_CHANNELS[cls][8], 8, 8)
    if cls is MobileNetV2:
        assert len(short.features) == 7  # torchvision's features.0 .. features.6


def attention_params_by_hand(kind: str, channels: list[int]) -> int:
    total = 0
    for c in channels:
        hidden = max(c // 16, 1)
        total += 2 * c * hidden + hidden + c  # two 1x1 convs with bias
        if kind == "cbam":
            total += 7 * 7 * 2 + 2  # spatial 7x7 conv on 2 maps (no bias) + BN of 1 channel
    return total


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("kind", ["se", "cbam"])
@pytest.mark.parametrize("out_strides", [(8, 16, 32), (8, 16)])
def test_attention_adds_the_hand_counted_parameters_and_learns(cls, kind, out_strides):
    torch.manual_seed(4)
    plain, att = cls(out_strides=out_strides), cls(out_strides=out_strides, attention=kind)
    existing = [c for s, c in TAP_CHANNELS[cls].items() if s <= max(out_strides)]  # every built tap
    assert n_params(att) - n_params(plain) == attention_params_by_hand(kind, existing)
    assert len(att.attention) == len(existing)
    x = torch.randn(2, 3, 64, 64)
    outs = att(x)
    with torch.no_grad():
        ref = plain.eval()(x)
    assert [o.shape for o in outs] == [r.shape for r in ref]
    sum(o.square().mean() for o in outs).backward()
    for name, p in att.attention.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cls", BOTH)
def test_input_spec_and_unknown_stride(cls):
    model = cls(out_strides=(8, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), min_size=40, size_divisor=8)
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25)
    assert model.min_size == 40 and model.size_divisor == 8
    with pytest.raises(ValueError, match="no map at stride 64"):
        cls(out_strides=(8, 64))
    with pytest.raises(ValueError, match="attention"):
        cls(attention="eca")


def test_expansion_taps_read_torchvisions_expansion_of_the_next_block():
    """SSDLite's stride-16 map: the 1x1 expansion (ReLU6 output) of features.14, the first stride-32
    block, computed by torchvision's own MobileNetV2 with the same weights; the deepest map is unchanged."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    ours = MobileNetV2(out_strides=[8, 16, 32], expansion_taps=True).eval()
    assert ours.out_channels == (192, 576, 1280) and ours.strides == (8, 16, 32)
    reference = mobilenet_v2().eval()
    reference.features.load_state_dict(ours.features.state_dict())
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        s8, s16, s32 = ours(x)
        expected8 = reference.features[7].conv[0](reference.features[:7](x))
        expected16 = reference.features[14].conv[0](reference.features[:14](x))
        torch.testing.assert_close(s8, expected8)
        torch.testing.assert_close(s16, expected16)
        torch.testing.assert_close(s32, reference.features(x))
    # the plain taps are the block outputs
    plain = MobileNetV2(out_strides=[16, 32]).eval()
    assert plain.out_channels == (96, 1280)
