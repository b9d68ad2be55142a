"""SSD priors against independent references: the paper's counts and scales, the reference SSD300's
prior table (through a copy of ssd.pytorch's PriorBox) and torchvision's DefaultBoxGenerator."""

import math

import pytest
import torch

from detectors.anchors import SSDPriors

SSD300_SHAPES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def test_ssd300_has_8732_priors():
    priors = SSDPriors()(SSD300_SHAPES, (300, 300))
    assert priors.shape == (8732, 4)
    assert SSDPriors().num_priors_per_cell == [4, 6, 6, 6, 4, 4]


# The reference SSD300 (the authors' Caffe model; ssd.pytorch's VOC config copies it): per level the
# prior sizes in px and the step between cell centres. Its min_sizes come from the paper's ratios with
# the step rounded down to whole percent (20, 37, 54, 71, 88 % of 300); ours are the paper's formula
# exactly (0.2, 0.375, 0.55, 0.725, 0.9): the same min sizes at conv4_3 and conv7 (30, 60 px), 1.5 to
# 6 px larger above (and max sizes 1.5 to 7.5 px larger from conv7 on).
REFERENCE_SSD300 = dict(feature_maps=[38, 19, 10, 5, 3, 1], steps=[8, 16, 32, 64, 100, 300],
                        min_sizes=[30, 60, 111, 162, 213, 264], max_sizes=[60, 111, 162, 213, 264, 315],
                        aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]])


def reference_prior_box(feature_maps, steps, min_sizes, max_sizes, aspect_ratios, image_size=300, clip=True):
    """ssd.pytorch's PriorBox.forward (layers/functions/prior_box.py), as written there: square
    images, cxcywh as fractions of the image, clamped to [0, 1]."""
    from itertools import product

    mean = []
    for k, f in enumerate(feature_maps):
        for i, j in product(range(f), repeat=2):
            f_k = image_size / steps[k]
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            s_k = min_sizes[k] / image_size
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in aspect_ratios[k]:
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    output = torch.tensor(mean, dtype=torch.float64).view(-1, 4)
    return output.clamp_(max=1, min=0) if clip else output


def test_scales_are_the_papers_and_where_they_differ_from_the_reference_table():
    """The paper (sec. 2.2): 0.1 at conv4_3, then linear from 0.2 to 0.9 over the other five levels."""
    scales = SSDPriors().scales()
    assert scales[:6] == pytest.approx([0.1, 0.2, 0.375, 0.55, 0.725, 0.9])
    # against the reference model's sizes at 300 px: the min size of each level and the next one's
    # (its max size, for the extra square prior; past the last level the reference takes 315 px, ours
    # one more step of the formula, 322.5 px)
    ours_px = [s * 300 for s in scales]
    ref = REFERENCE_SSD300
    assert [a - b for a, b in zip(ours_px[:6], ref["min_sizes"])] == pytest.approx([0, 0, 1.5, 3, 4.5, 6])
    assert [a - b for a, b in zip(ours_px[1:7], ref["max_sizes"])] == pytest.approx([0, 1.5, 3, 4.5, 6, 7.5])


def level_slices(shapes, per_cell):
    start = 0
    for (h, w), n in zip(shapes, per_cell):
        yield slice(start, start + h * w * n)
        start += h * w * n


def test_ssd300_priors_against_the_reference_prior_box():
    """Ours next to ssd.pytorch's PriorBox with the reference SSD300 table, level by level: the same
    boxes in the same order where the two tables agree, and the differences named where they do not.

    - sizes: equal at conv4_3 (30 and 60 px in both tables); above, ours are the paper's (see
      REFERENCE_SSD300), so the priors' widths and heights differ there.
    - centres: ours put a level's cells evenly over the image ((j + 0.5) / f of it, as torchvision's
      DefaultBoxGenerator without steps); the reference steps 8, 16, 32, 64 px, which overshoots 300 px
      on 38, 19, 10, 5 cells (304, 304, 320, 320 px), so its centres drift up to 20 px off ours. On
      the 3x3 and 1x1 maps (steps 100 and 300) the two agree.
    """
    ours = SSDPriors()(SSD300_SHAPES, (300, 300)).double() / 300
    reference = reference_prior_box(**REFERENCE_SSD300)
    assert reference.shape == ours.shape == (8732, 4)
    levels = list(level_slices(SSD300_SHAPES, [4, 6, 6, 6, 4, 4]))
    torch.testing.assert_close(ours[levels[0], 2:], reference[levels[0], 2:], rtol=0, atol=1e-6)
    for k in (4, 5):
        torch.testing.assert_close(ours[levels[k], :2], reference[levels[k], :2], rtol=0, atol=1e-6)
    for k in (0, 1, 2, 3):
        drift = (ours[levels[k], :2] - reference[levels[k], :2]).abs().max() * 300
        assert 0.05 < drift <= 20.0, k
    for k in (1, 2, 3, 4, 5):
        assert not torch.allclose(ours[levels[k], 2:], reference[levels[k], 2:], atol=1e-6), k
    # the same reference, given our sizes and evenly spread centres, makes exactly our priors, clipping
    # included (ratio 2 at scale 0.9 on the 1x1 map: 0.9 * sqrt(2) of the image, capped at the image)
    ours_table = dict(REFERENCE_SSD300, steps=[300 / f for f in REFERENCE_SSD300["feature_maps"]],
                      min_sizes=[s * 300 for s in SSDPriors().scales()[:6]],
                      max_sizes=[s * 300 for s in SSDPriors().scales()[1:7]])
    torch.testing.assert_close(ours, reference_prior_box(**ours_table), rtol=0, atol=1e-6)
    assert float(ours[-2, 2]) == 1.0 and (ours[:, 2:] == 1.0).sum() >= 3


def test_priors_follow_feature_shapes_and_non_square_inputs():
    shapes = [(64, 48), (32, 24), (16, 12), (8, 6), (6, 4), (4, 2)]
    p = SSDPriors()(shapes, (512, 384))
    assert p.shape[0] == sum(h * w * n for (h, w), n in zip(shapes, [4, 6, 6, 6, 4, 4]))
    # where the boxes lie: test_priors_equal_torchvision_default_box_generator (this case included)


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
    ({}, [(64, 48), (32, 24), (16, 12), (8, 6), (6, 4), (4, 2)], (512, 384)),
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
