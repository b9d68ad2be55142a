"""VGG16 against torchvision: its state dicts load, the trunk computes what torchvision's does, and
VGG16 + SSD's neck equals torchvision's SSD300 feature extractor; clear errors for wrong weights."""

import pytest
import torch
from torchvision.models import vgg16, vgg16_bn

from detectors.necks.ssd_extras import SSDExtras

from detectors.backbones.vgg import VGG16


@pytest.mark.parametrize("batch_norm,factory", [(True, vgg16_bn), (False, vgg16)])
def test_loads_a_torchvision_state_dict_from_a_file(tmp_path, batch_norm, factory):
    reference = factory(weights=None)
    path = tmp_path / "vgg.pth"
    torch.save(reference.state_dict(), path)
    ours = VGG16(batch_norm=batch_norm, weights=str(path))
    assert f"file {path}" in ours.weights_source
    for key, value in reference.features.state_dict().items():
        torch.testing.assert_close(ours.features.state_dict()[key], value, msg=key)
    # the trunk computes what torchvision's does up to conv5_3 (before its pool5)
    x = torch.randn(1, 3, 64, 64)
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x), reference.features[:-1](x))


def test_weights_of_the_other_variant_are_a_clear_error(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(vgg16(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit vgg16_bn"):
        VGG16(batch_norm=True, weights=str(path))


def test_unknown_weights_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a file nor a VGG16_BN_Weights name"):
        VGG16(batch_norm=True, weights="IMAGENET_TYPO")


@pytest.mark.parametrize("out_strides,expected", [
    ((8, 16), [(512, 38, 38), (512, 19, 19)]),
    ((16,), [(512, 19, 19)]),  # conv5_3, as Faster R-CNN reads it
    ((4, 8, 16, 32), [(256, 75, 75), (512, 38, 38), (512, 19, 19), (512, 10, 10)]),
])
def test_feature_shapes_at_the_strides_asked_for(out_strides, expected):
    net = VGG16(batch_norm=True, out_strides=out_strides).eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 300, 300))
    assert [tuple(f.shape[1:]) for f in feats] == expected
    assert net.out_channels == tuple(e[0] for e in expected) and net.strides == out_strides


def test_layers_past_the_deepest_map_are_not_built():
    full, cut = VGG16(out_strides=(8, 16, 32)), VGG16(out_strides=(8,))
    assert len(cut.features) < len(full.features)
    # conv5_1 .. conv5_3 (3 x (3*3*512*512 + 512)) and their BN (3 x 2 x 512) are gone
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in cut.parameters()) == \
        3 * (9 * 512 * 512 + 512) + 3 * 1024
    with pytest.raises(ValueError, match=r"no map at stride 64.*\[1, 2, 4, 8, 16, 32\]"):
        VGG16(out_strides=(8, 64))


def test_torchvision_weight_enum_path(monkeypatch):
    """The enum name resolves through torchvision's VGG16_BN_Weights (the download is replaced by a
    state dict, as no network is reachable here)."""
    from torchvision.models import VGG16_BN_Weights

    reference = vgg16_bn(weights=None)
    monkeypatch.setattr(type(VGG16_BN_Weights.IMAGENET1K_V1), "get_state_dict",
                        lambda self, *a, **k: reference.state_dict())
    ours = VGG16(batch_norm=True, weights="IMAGENET1K_V1")
    assert ours.weights_source.startswith("torchvision VGG16_BN_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(ours.features[0].weight, reference.features[0].weight)


def test_vgg16_with_ssd_neck_equals_torchvision_ssd300_feature_extractor():
    """Plain VGG16 + SSD300's neck (no BN, conv6/conv7, L2Norm 20) is torchvision's SSD300 backbone:
    with the same weights copied conv by conv, the six maps are equal."""
    from torchvision.models.detection.ssd import _vgg_extractor

    reference = _vgg_extractor(vgg16(weights=None), False, 5).eval()
    ours = torch.nn.Sequential(
        VGG16(batch_norm=False, out_strides=(8, 16)),
        SSDExtras((512, 512), (8, 16), num_levels=6, fc7={"channels": 1024, "dilation": 6}, batch_norm=False),
    ).eval()
    ref_convs = [m for m in reference.modules() if isinstance(m, torch.nn.Conv2d)]
    our_convs = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in our_convs] == [tuple(c.weight.shape) for c in ref_convs]
    torch.manual_seed(0)
    with torch.no_grad():
        for ref, own in zip(ref_convs, our_convs):
            ref.weight.normal_(0, (2 / ref.weight[0].numel()) ** 0.5)
            ref.bias.normal_(0, 0.01)
            own.weight.copy_(ref.weight)
            own.bias.copy_(ref.bias)
        x = torch.randn(1, 3, 300, 300)
        expected = list(reference(x).values())
        got = ours[1](ours[0](x))
    assert [tuple(f.shape[1:]) for f in got] == [(512, 38, 38), (1024, 19, 19), (512, 10, 10), (256, 5, 5),
                                                 (256, 3, 3), (256, 1, 1)]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_a_missing_weights_file_and_a_failed_download_say_what_to_do(monkeypatch, tmp_path):
    from torchvision.models import VGG16_Weights

    with pytest.raises(ValueError, match=r"weights file .*vgg_typo.pth not found"):
        VGG16(batch_norm=False, weights=str(tmp_path / "vgg_typo.pth"))

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(ValueError, match=r"could not be downloaded .*backbone.weights=/path/to/file.pth"):
        VGG16(batch_norm=False, weights="IMAGENET1K_V1")
