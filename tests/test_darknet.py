"""DarkNet-19 / DarkNet-53 backbones, checked against the papers' layer tables, darknet's file layout
and a functional re-implementation of both nets written here from the tables."""

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from detectors.backbones.darknet import DarkNet19, DarkNet53

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "backbone"

# ---- the papers' tables, written out here: (kernel, in channels, out channels) of every conv, in
# darknet's cfg order (the order of its .weights files) -------------------------------------------

# YOLOv2 Table 6 without the classifier's 1x1 conv 1000; a 2x2/2 max-pool follows convs 1, 2, 5, 8, 13
DARKNET19_CONVS = [
    (3, 3, 32),                                                              # 224 -> pool
    (3, 32, 64),                                                             # 112 -> pool
    (3, 64, 128), (1, 128, 64), (3, 64, 128),                                # 56 -> pool
    (3, 128, 256), (1, 256, 128), (3, 128, 256),                             # 28 -> pool
    (3, 256, 512), (1, 512, 256), (3, 256, 512), (1, 512, 256), (3, 256, 512),        # 14 -> pool
    (3, 512, 1024), (1, 1024, 512), (3, 512, 1024), (1, 1024, 512), (3, 512, 1024),   # 7
]
DARKNET19_POOL_AFTER = {1, 2, 5, 8, 13}
# YOLOv3 Table 1: conv 32, then per stage a stride-2 3x3 conv and n residual blocks (1x1 C/2, 3x3 C)
DARKNET53_STAGES = [(64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)]
DARKNET53_CONVS = [(3, 3, 32)]
for _c, _n in DARKNET53_STAGES:
    DARKNET53_CONVS += [(3, DARKNET53_CONVS[-1][2], _c)] + [(1, _c, _c // 2), (3, _c // 2, _c)] * _n


def conv_bn_params(convs):
    """Conv kernels k*k*cin*cout (no bias: BN's beta is the bias) + BN gamma and beta (2*cout)."""
    return sum(k * k * cin * cout + 2 * cout for k, cin, cout in convs)


def se_params(c):
    return 2 * c * (c // 16) + c // 16 + c


def cbam_params(c):
    return se_params(c) + 7 * 7 * 2 + 2  # + the 7x7 2->1 spatial conv + its BatchNorm


# the convs each net has up to the last layer of a stride (for truncated nets)
DARKNET19_CONVS_UPTO = {8: 8, 16: 13, 32: 18}
DARKNET53_CONVS_UPTO = {8: 1 + 3 + 5 + 17, 16: 1 + 3 + 5 + 17 + 17, 32: 52}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def convs_of(model):
    """The backbone's own convs/BNs in module order (attention blocks' layers left out)."""
    convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "attention" not in name]
    bns = [m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "attention" not in name]
    return convs, bns


# ---- parameter counts and layer tables ------------------------------------------------------------


def test_parameter_counts_match_the_papers_tables():
    assert len(DARKNET19_CONVS) == 18 and len(DARKNET53_CONVS) == 52
    # 19,817,376 and 40,584,928: the classifier-less nets (+ 1024*1000 + 1000 = 20.8M for DarkNet-19's
    # classifier, as darknet19.cfg reports)
    assert conv_bn_params(DARKNET19_CONVS) == 19_817_376
    assert conv_bn_params(DARKNET53_CONVS) == 40_584_928
    assert n_params(DarkNet19()) == conv_bn_params(DARKNET19_CONVS)
    assert n_params(DarkNet53()) == conv_bn_params(DARKNET53_CONVS)


@pytest.mark.parametrize("net,table", [(DarkNet19, DARKNET19_CONVS), (DarkNet53, DARKNET53_CONVS)])
def test_convs_are_the_tables_in_darknet_order(net, table):
    model = net()
    convs, bns = convs_of(model)
    assert [(c.kernel_size[0], c.in_channels, c.out_channels) for c in convs] == table
    assert all(c.bias is None and c.padding == (c.kernel_size[0] // 2,) * 2 for c in convs)
    assert [b.num_features for b in bns] == [cout for _, _, cout in table]
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}
    assert [(c.kernel_size[0], c.in_channels, c.out_channels) for c, _ in model.darknet_layers()] == table


def test_random_init_is_he_init_with_unit_batchnorm(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="detectors.backbones.darknet"):
        model = DarkNet19(out_strides=(8,))
    assert "backbone darknet19: weights from random init" in caplog.text
    convs, bns = convs_of(model)
    conv = convs[5]  # 3x3 128 -> 256: fan_out 9 * 256
    expected_std = math.sqrt(2 / (1 + 0.1 ** 2)) / math.sqrt(9 * 256)
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


# ---- maps, strides, truncation --------------------------------------------------------------------

CHANNELS = {DarkNet19: {1: 32, 2: 64, 4: 128, 8: 256, 16: 512, 32: 1024},
            DarkNet53: {2: 64, 4: 128, 8: 256, 16: 512, 32: 1024}}


@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
@pytest.mark.parametrize("out_strides", [(8, 16, 32), (16, 32), (32, 2, 4)])
def test_feature_shapes(net, out_strides):
    model = net(out_strides=out_strides).eval()
    strides = tuple(sorted(out_strides))
    assert model.strides == strides
    assert model.out_channels == tuple(CHANNELS[net][s] for s in strides)
    assert model.mean == (0.0, 0.0, 0.0) and model.std == (1.0, 1.0, 1.0)
    for h, w in [(64, 64), (96, 128), (70, 100)]:  # 70 x 100: not multiples of 32, maps round up
        with torch.no_grad():
            feats = model(torch.randn(1, 3, h, w))
        assert [tuple(f.shape) for f in feats] == [
            (1, CHANNELS[net][s], math.ceil(h / s), math.ceil(w / s)) for s in strides]


@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
def test_input_spec_passes_to_the_backbone(net):
    model = net(out_strides=(16,), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), min_size=64, size_divisor=32)
    assert (model.mean, model.std, model.min_size, model.size_divisor) == ((0.5,) * 3, (0.25,) * 3, 64, 32)


@pytest.mark.parametrize("net,bad", [(DarkNet19, 64), (DarkNet53, 1), (DarkNet53, 3)])
def test_unknown_stride_names_the_valid_ones(net, bad):
    valid = ", ".join(str(s) for s in CHANNELS[net])
    with pytest.raises(ValueError, match=rf"stride {bad}.*\[{valid}\]"):
        net(out_strides=(8, bad))


@pytest.mark.parametrize("net,table,upto", [(DarkNet19, DARKNET19_CONVS, DARKNET19_CONVS_UPTO),
                                            (DarkNet53, DARKNET53_CONVS, DARKNET53_CONVS_UPTO)])
def test_layers_past_the_deepest_stride_are_not_built(net, table, upto):
    model = net(out_strides=(8,))
    assert n_params(model) == conv_bn_params(table[:upto[8]])
    assert max(c.out_channels for c in convs_of(model)[0]) == 256
    model = net(out_strides=(8, 16))
    assert n_params(model) == conv_bn_params(table[:upto[16]])


# ---- darknet .weights files -----------------------------------------------------------------------


def write_darknet(path, table, seed, n_convs=None, minor=2, extra_floats=0):
    """A darknet weights file for the first ``n_convs`` convs of ``table``: header (major, minor,
    revision int32, seen int64 from version 0.2 on, int32 before), then per conv beta, gamma, rolling
    mean, rolling variance, kernel (cout, cin, k, k), little-endian float32. Returns what it wrote."""
    rng = np.random.default_rng(seed)
    params, chunks = [], []
    for k, cin, cout in table[:n_convs]:
        p = {"beta": rng.normal(0, 0.1, cout), "gamma": rng.uniform(0.5, 1.5, cout),
             "mean": rng.normal(0, 0.1, cout), "var": rng.uniform(0.5, 1.5, cout),
             "kernel": rng.normal(0, 1 / math.sqrt(k * k * cin), (cout, cin, k, k))}
        p = {key: v.astype("<f4") for key, v in p.items()}
        params.append(p)
        chunks += [p["beta"], p["gamma"], p["mean"], p["var"], p["kernel"].ravel()]
    chunks.append(rng.normal(size=extra_floats).astype("<f4"))
    seen = np.array([123456], dtype="<i8" if minor >= 2 else "<i4")
    with open(path, "wb") as f:
        f.write(np.array([0, minor, 0], dtype="<i4").tobytes() + seen.tobytes())
        for c in chunks:
            f.write(c.tobytes())
    return params


def assert_loaded(model, params):
    convs, bns = convs_of(model)
    for i, (conv, bn, p) in enumerate(zip(convs, bns, params)):
        for tensor, key in [(bn.bias, "beta"), (bn.weight, "gamma"), (bn.running_mean, "mean"),
                            (bn.running_var, "var"), (conv.weight, "kernel")]:
            assert torch.equal(tensor.detach(), torch.from_numpy(p[key])), f"conv {i} {key}"


def reference_forward(net, x, params):
    """The nets written from the tables with torch.nn.functional and the file's arrays (eval-mode BN)."""
    it = iter(params)

    def conv(x, stride=1):
        p = {k: torch.from_numpy(v) for k, v in next(it).items()}
        y = F.conv2d(x, p["kernel"], stride=stride, padding=p["kernel"].shape[-1] // 2)
        y = F.batch_norm(y, p["mean"], p["var"], p["gamma"], p["beta"], training=False, eps=1e-5)
        return F.leaky_relu(y, 0.1)

    if net is DarkNet19:
        for i in range(1, 19):
            x = conv(x)
            if i in DARKNET19_POOL_AFTER:
                x = F.max_pool2d(x, 2, 2)
        return x
    x = conv(x)
    for _, n in DARKNET53_STAGES:
        x = conv(x, stride=2)
        for _ in range(n):
            x = x + conv(conv(x))
    return x


@pytest.fixture(scope="module")
def full_files(tmp_path_factory):
    """Full darknet files of both nets (80 and 160 MB), written once."""
    d = tmp_path_factory.mktemp("darknet")
    return {DarkNet19: (d / "darknet19.weights", write_darknet(d / "darknet19.weights", DARKNET19_CONVS, 19)),
            DarkNet53: (d / "darknet53.weights", write_darknet(d / "darknet53.weights", DARKNET53_CONVS, 53))}


@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
def test_full_darknet_file_fills_every_conv_in_order(net, full_files, caplog):
    path, params = full_files[net]
    with caplog.at_level(logging.INFO, logger="detectors.backbones.darknet"):
        model = net(weights=str(path)).eval()
    n = len(params)
    assert model.weights_source == f"darknet file {path} ({n} of {n} convs)"
    assert f"weights from darknet file {path}" in caplog.text
    assert_loaded(model, params)
    # the same numbers through the functional nets: the layer order, the residual adds and the
    # activations are darknet's (64x64: both pool roundings agree)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours, ref = model(x)[-1], reference_forward(net, x, params)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("net,upto", [(DarkNet19, DARKNET19_CONVS_UPTO), (DarkNet53, DARKNET53_CONVS_UPTO)])
def test_truncated_backbone_reads_the_front_of_a_full_file(net, upto, full_files):
    path, params = full_files[net]
    model = net(out_strides=(8,), weights=str(path))
    assert model.weights_source.endswith(f"({upto[8]} of {upto[8]} convs)")
    assert_loaded(model, params[:upto[8]])


def test_full_file_of_the_other_net_is_an_error(full_files):
    with pytest.raises(ValueError, match="floats more than the 18 convs"):
        DarkNet19(weights=str(full_files[DarkNet53][0]))
    with pytest.raises(ValueError, match="ends inside conv"):
        DarkNet53(weights=str(full_files[DarkNet19][0]))


def test_version_0_1_header_has_a_32_bit_seen(tmp_path):
    path = tmp_path / "old.weights"
    params = write_darknet(path, DARKNET19_CONVS, 1, n_convs=3, minor=1)
    assert path.stat().st_size == 16 + 4 * sum(4 * co + k * k * ci * co for k, ci, co in DARKNET19_CONVS[:3])
    model = DarkNet19(out_strides=(8,), weights=str(path))
    assert model.weights_source.endswith("(3 of 8 convs)")
    assert_loaded(model, params)


@pytest.mark.parametrize("net,table,name", [(DarkNet19, DARKNET19_CONVS, "darknet19_448.conv.10"),
                                            (DarkNet53, DARKNET53_CONVS, "darknet53.conv.10")])
def test_partial_conv_n_file_fills_the_first_convs(net, table, name, tmp_path):
    path = tmp_path / name
    params = write_darknet(path, table, 7, n_convs=10)
    torch.manual_seed(3)
    untouched = net()
    torch.manual_seed(3)
    model = net(weights=str(path))
    assert model.weights_source == f"darknet file {path} (10 of {len(table)} convs)"
    assert_loaded(model, params)
    rest, rest_before = convs_of(model)[0][10:], convs_of(untouched)[0][10:]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(rest, rest_before))


def test_file_ending_inside_a_conv_is_an_error(tmp_path):
    path = tmp_path / "cut.conv.2"
    write_darknet(path, DARKNET53_CONVS, 2, n_convs=2)
    data = path.read_bytes()
    path.write_bytes(data[:-4 * 100])  # the second conv's kernel short of 100 floats
    with pytest.raises(ValueError, match="ends inside conv 1"):
        DarkNet53(weights=str(path))


def test_missing_darknet_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no such darknet file"):
        DarkNet53(weights=str(tmp_path / "darknet53.conv.74"))


# ---- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,per_block", [("se", se_params), ("cbam", cbam_params)])
@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
def test_attention_blocks(net, kind, per_block):
    if net is DarkNet19:  # on every stage output up to stride 32
        places, table = [32, 64, 128, 256, 512, 1024], DARKNET19_CONVS
    else:  # in every residual block
        places, table = [c for c, n in DARKNET53_STAGES for _ in range(n)], DARKNET53_CONVS
    # seed 1: the 32-channel SE/CBAM of DarkNet-19 has 2 hidden ReLU units, and for some draws (seed 0)
    # both start negative for every image, so that MLP's first layer gets no gradient at init: SE's
    # design, not a wiring fault; this test is about the wiring
    torch.manual_seed(1)
    model = net(attention=kind)
    assert n_params(model) == conv_bn_params(table) + sum(per_block(c) for c in places)
    x = torch.randn(2, 3, 64, 64)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2)]
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    attention = [(name, p) for name, p in model.named_parameters() if "attention" in name]
    assert sum(p.numel() for _, p in attention) == sum(per_block(c) for c in places)
    for name, p in attention:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        DarkNet53(attention="eca")


# ---- state-dict files and configs -----------------------------------------------------------------


@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
def test_state_dict_file_round_trip(net, tmp_path):
    torch.manual_seed(0)
    saved = net(out_strides=(16, 32))
    saved(torch.randn(2, 3, 64, 64))  # moves BN's running statistics off their defaults
    path = tmp_path / "backbone.pth"
    torch.save(saved.state_dict(), path)
    torch.manual_seed(1)
    loaded = net(out_strides=(16, 32), weights=str(path))
    assert loaded.weights_source.startswith(f"file {path} (")
    x = torch.randn(1, 3, 64, 96)
    saved.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(saved(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("net", [DarkNet19, DarkNet53])
def test_plain_weights_load_into_an_attention_variant(net, tmp_path):
    """The attention blocks are no part of the plain net's weights: they start random, the rest loads."""
    plain = net(out_strides=(8,))
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    model = net(out_strides=(8,), attention="cbam", weights=str(path))
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_state_dict_of_another_network_is_an_error(tmp_path):
    path = tmp_path / "darknet19.pth"
    torch.save(DarkNet19(out_strides=(8,)).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit darknet53"):
        DarkNet53(out_strides=(8,), weights=str(path))


@pytest.mark.parametrize("name,cls", [("darknet19", DarkNet19), ("darknet53", DarkNet53)])
def test_config_instantiates(name, cls):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.out_strides = [16, 32]  # smaller to build
    model = hydra.utils.instantiate(cfg)
    assert isinstance(model, cls) and model.strides == (16, 32) and model.out_channels == (512, 1024)
    assert model.mean == (0.0, 0.0, 0.0) and model.std == (1.0, 1.0, 1.0)
