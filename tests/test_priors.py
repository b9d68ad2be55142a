"""SSD priors against the paper's numbers and hand-computed values."""

import math

import pytest
import torch

from detectors.anchors import SSDPriors

SSD300_SHAPES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def test_ssd300_has_8732_priors():
    priors = SSDPriors()(SSD300_SHAPES, (300, 300))
    assert priors.shape == (8732, 4)
    assert SSDPriors().num_priors_per_cell == [4, 6, 6, 6, 4, 4]


def test_scales_are_linear_from_0_2_to_0_9_with_0_1_first():
    scales = SSDPriors().scales()
    assert scales[0] == pytest.approx(0.1)
    assert scales[1:6] == pytest.approx([0.2, 0.375, 0.55, 0.725, 0.9])
    assert scales[6] == pytest.approx(1.075)  # one step past the last, for its extra square prior


def test_hand_computed_first_cell_of_conv4_3():
    p = SSDPriors()(SSD300_SHAPES, (300, 300))
    cx = cy = 0.5 / 38 * 300
    expected = [
        [cx, cy, 30.0, 30.0],  # s = 0.1
        [cx, cy, math.sqrt(0.1 * 0.2) * 300, math.sqrt(0.1 * 0.2) * 300],  # extra sqrt(s_k s_k+1)
        [cx, cy, 30 * math.sqrt(2), 30 / math.sqrt(2)],  # ratio 2
        [cx, cy, 30 / math.sqrt(2), 30 * math.sqrt(2)],  # ratio 1/2
    ]
    torch.testing.assert_close(p[:4], torch.tensor(expected), rtol=0, atol=1e-4)
    # second cell moves right by one stride of 300/38
    assert float(p[4, 0]) == pytest.approx(1.5 / 38 * 300, abs=1e-4)


def test_hand_computed_last_level_is_clipped_to_the_image():
    p = SSDPriors()(SSD300_SHAPES, (300, 300))
    last = p[-4:]
    assert torch.allclose(last[:, :2], torch.tensor(150.0))
    assert float(last[0, 2]) == pytest.approx(0.9 * 300, abs=1e-3)
    assert float(last[1, 2]) == pytest.approx(min(math.sqrt(0.9 * 1.075), 1.0) * 300, abs=1e-3)
    # ratio 2 at scale 0.9: w = 0.9 * sqrt(2) > 1, capped at the image width
    assert float(last[2, 2]) == pytest.approx(300.0)
    assert float(last[2, 3]) == pytest.approx(0.9 / math.sqrt(2) * 300, abs=1e-3)


def test_priors_follow_feature_shapes_and_non_square_inputs():
    shapes = [(64, 48), (32, 24), (16, 12), (8, 6), (6, 4), (4, 2)]
    p = SSDPriors()(shapes, (512, 384))
    assert p.shape[0] == sum(h * w * n for (h, w), n in zip(shapes, [4, 6, 6, 6, 4, 4]))
    # centres of the first level span the image in x with the level's own stride
    assert float(p[:4 * 48, 0].max()) == pytest.approx((47.5 / 48) * 384, abs=1e-3)


def test_cache_returns_same_tensor_and_level_mismatch_is_an_error():
    gen = SSDPriors()
    a = gen(SSD300_SHAPES, (300, 300))
    assert gen(SSD300_SHAPES, (300, 300)) is a
    with pytest.raises(ValueError, match="6 levels"):
        gen(SSD300_SHAPES[:5], (300, 300))


SSD512_SHAPES = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
SSD512 = dict(aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]], min_scale=0.15, max_scale=0.9,
              first_scale=0.07)
SSDLITE = dict(aspect_ratios=[[2, 3]] * 6, min_scale=0.2, max_scale=0.95, first_scale=None)
SSDLITE_SHAPES = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]


def test_ssd512_has_24564_priors_and_the_reference_scales():
    """Hand count: 64^2 * 4 + 32^2 * 6 + 16^2 * 6 + 8^2 * 6 + 4^2 * 6 + 2^2 * 4 + 1 * 4 = 24564; the
    reference SSD512's min sizes 35.84, 76.8, 153.6, ... 460.8 px are 0.07, 0.15, 0.3, ... 0.9 of 512."""
    gen = SSDPriors(**SSD512)
    assert 64**2 * 4 + 32**2 * 6 + 16**2 * 6 + 8**2 * 6 + 4**2 * 6 + 2**2 * 4 + 4 == 24564
    assert gen(SSD512_SHAPES, (512, 512)).shape == (24564, 4)
    assert [s * 512 for s in gen.scales()] == pytest.approx([35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6])


@pytest.mark.parametrize("config,shapes,size", [
    ({}, SSD300_SHAPES, (300, 300)), (SSD512, SSD512_SHAPES, (512, 512)), (SSDLITE, SSDLITE_SHAPES, (320, 320)),
    ({}, [(48, 64), (24, 32), (12, 16), (6, 8), (4, 6), (2, 4)], (384, 512)),
])
def test_priors_equal_torchvision_default_box_generator(config, shapes, size):
    """torchvision's DefaultBoxGenerator, given our scales, places the same boxes in the same order.
    (Its ssd300_vgg16 uses other scales, [0.07, 0.15, 0.33, ...], COCO's; ours are the paper's VOC ones.)"""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_convert

    ours = SSDPriors(**config)
    reference = DefaultBoxGenerator(ours.aspect_ratios, scales=ours.scales(), steps=None, clip=True)
    images = ImageList(torch.zeros(1, 3, *size), [size])
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    expected = reference(images, feats)[0]
    torch.testing.assert_close(box_convert(ours(shapes, size), "cxcywh", "xyxy"), expected, rtol=0, atol=1e-3)
