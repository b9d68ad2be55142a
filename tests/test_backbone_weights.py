"""VGG16 weight loading: torchvision state dicts from a local file, clear errors otherwise."""

import pytest
import torch
from torchvision.models import vgg16, vgg16_bn

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


def test_ssd300_feature_shapes():
    with torch.no_grad():
        feats = VGG16(batch_norm=True).eval()(torch.zeros(1, 3, 300, 300))
    assert [tuple(f.shape[1:]) for f in feats] == [(512, 38, 38), (1024, 19, 19)]
