"""SSD's neck adapts to any backbone: the levels (and so the priors) of SSD300, SSD512 and SSDLite
from every backbone's maps, against the papers' level sizes and hand-counted prior numbers."""

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import detectors  # noqa: F401  (resolvers)
from detectors.necks.ssd_extras import SSDExtras

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def detector(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", *overrides])
    with open_dict(cfg):
        cfg.data.classes = ["a", "b"]
    return hydra.utils.instantiate(cfg.model.detector).eval()


def level_shapes(net, size):
    with torch.no_grad():
        raw = net(torch.zeros(1, 3, size, size))
    return raw.feature_shapes, raw.box_offsets.shape[1]


@pytest.mark.parametrize("backbone", ["vgg16_bn", "darknet53", "mobilenet_v2", "mobilenet_v1", "darknet19"])
def test_ssd300_on_every_backbone_has_the_papers_levels_and_8732_priors(backbone):
    shapes, priors = level_shapes(detector(["model=ssd300", f"backbone={backbone}"]), 300)
    assert shapes == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    assert priors == 38 * 38 * 4 + 19 * 19 * 6 + 10 * 10 * 6 + 5 * 5 * 6 + 3 * 3 * 4 + 1 * 4 == 8732


def test_ssd512_levels_and_ssdlite_levels():
    shapes, priors = level_shapes(detector(["model=ssd512"]), 512)
    assert shapes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)] and priors == 24564
    # torchvision's ssdlite320: 20, 10, 5, 3, 2, 1 with 6 anchors each = 3234
    shapes, priors = level_shapes(detector(["model=ssdlite"]), 320)
    assert shapes == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)] and priors == 6 * (400 + 100 + 25 + 9 + 4 + 1)


def test_neck_channels_follow_the_backbone_and_conv7_replaces_the_deepest_map():
    neck = SSDExtras((256, 512, 1024), (8, 16, 32), num_levels=6, fc7={"channels": 1024, "dilation": 6})
    assert neck.out_channels == (256, 512, 1024, 256, 256, 256)  # the last three extra blocks
    assert len(neck.blocks) == 3
    lite = SSDExtras((96, 1280), (16, 32), num_levels=6, fc7=None, blocks=[[256, 512, 2, 1], [128, 256, 2, 1],
                     [128, 256, 2, 1], [64, 128, 2, 1]], l2norm_scale=None, depthwise=True)
    assert lite.out_channels == (96, 1280, 512, 256, 256, 128)


def test_too_few_backbone_maps_for_the_levels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"6 levels from 1 backbone maps.*out_strides with 2 to 6 strides"):
        SSDExtras((512,), (16,), num_levels=6)


def test_identity_neck_passes_the_maps_and_says_what_they_are():
    from detectors.necks.identity import IdentityNeck

    neck = IdentityNeck((256, 512), (8, 16))
    maps = [torch.zeros(1, 256, 4, 4), torch.zeros(1, 512, 2, 2)]
    assert neck(maps) is maps and neck.out_channels == (256, 512) and neck.strides == (8, 16)


def has_batch_norm(module):
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize("backbone,batch_norm", [("vgg16", False), ("vgg16_bn", True), ("mobilenet_v2", True)])
def test_the_neck_takes_batch_norm_from_the_built_backbone_and_its_levels_from_the_head(backbone, batch_norm):
    # no backbone key in the neck's config: Detector passes the backbone's uses_batch_norm (plain VGG16: the
    # paper's SSD without BN); the level count is one per entry of the head's aspect_ratios
    net = detector(["model=ssd300", f"backbone={backbone}", "head.priors.aspect_ratios=[[2],[2,3],[2,3],[2,3],[2]]"])
    assert net.backbone.uses_batch_norm is batch_norm and has_batch_norm(net.neck) is batch_norm
    assert len(net.neck.out_channels) == 5
    # an explicit neck.batch_norm wins over the backbone's
    assert has_batch_norm(detector(["model=ssd300", "backbone=vgg16", "neck.batch_norm=true"]).neck)
    # attention blocks carry BatchNorm (CBAM's spatial gate), which does not make a plain VGG16 a BN one
    assert not detector(["model=ssd300", "backbone=vgg16", "backbone.attention=cbam"]).backbone.uses_batch_norm
