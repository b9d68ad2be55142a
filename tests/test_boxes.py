"""Box utilities against torchvision.ops."""

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from detectors.boxes import DeltaBoxCoder, batched_box_iou, clip_boxes, scale_boxes


def random_boxes(n, size=300.0, gen=None):
    xy = torch.rand(n, 2, generator=gen) * size * 0.8
    wh = torch.rand(n, 2, generator=gen) * size * 0.5 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_batched_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.stack([random_boxes(7, gen=g) for _ in range(3)])
    b = torch.stack([random_boxes(11, gen=g) for _ in range(3)])
    ours = batched_box_iou(a, b)
    for i in range(3):
        torch.testing.assert_close(ours[i], box_iou(a[i], b[i]))
    shared = batched_box_iou(a, b[0])
    torch.testing.assert_close(shared[2], box_iou(a[2], b[0]))


def test_iou_of_degenerate_boxes_is_zero_not_nan():
    a = torch.tensor([[[5.0, 5.0, 5.0, 5.0]]])
    assert batched_box_iou(a, a).item() == 0.0


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(100, gen=g)
    priors = torch.cat([torch.rand(100, 2, generator=g) * 300, torch.rand(100, 2, generator=g) * 200 + 5], dim=1)
    coder = DeltaBoxCoder.from_variances((0.1, 0.2))
    torch.testing.assert_close(coder.decode(coder.encode(boxes, priors), priors), boxes, rtol=1e-5, atol=1e-3)


def test_encoding_matches_the_paper_formula():
    coder = DeltaBoxCoder.from_variances((0.1, 0.2))
    prior = torch.tensor([[100.0, 100.0, 50.0, 40.0]])  # cx, cy, w, h
    box = torch.tensor([[80.0, 90.0, 140.0, 130.0]])  # centre (110, 110), size 60 x 40
    t = coder.encode(box, prior)
    expected = torch.tensor([[(110 - 100) / 50 / 0.1, (110 - 100) / 40 / 0.1,
                              torch.log(torch.tensor(60 / 50)) / 0.2, 0.0]])
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (10.0, 20.0, 5.0, 2.5)])
def test_delta_coder_equals_torchvision_box_coder(weights):
    """torchvision's detection BoxCoder (RPN: weights 1, RoI heads: 10, 10, 5, 5) is the reference."""
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(3)
    boxes, refs = random_boxes(50, gen=g), random_boxes(50, gen=g)
    reference = BoxCoder(weights)
    ours = DeltaBoxCoder(weights)
    refs_cxcywh = box_convert(refs, "xyxy", "cxcywh")
    deltas = ours.encode(boxes, refs_cxcywh)
    torch.testing.assert_close(deltas, reference.encode_single(boxes, refs), rtol=1e-5, atol=1e-5)
    shifted = deltas + torch.randn(deltas.shape, generator=g) * 0.3
    torch.testing.assert_close(ours.decode(shifted, refs_cxcywh), reference.decode_single(shifted, refs),
                               rtol=1e-5, atol=1e-3)


def test_clip_and_scale():
    b = torch.tensor([[-5.0, 10.0, 320.0, 290.0]])
    torch.testing.assert_close(clip_boxes(b, (300, 300)), torch.tensor([[0.0, 10.0, 300.0, 290.0]]))
    # 300x300 network frame back to a 480x640 (H, W) image
    torch.testing.assert_close(scale_boxes(torch.tensor([[30.0, 60.0, 150.0, 300.0]]), (300, 300), (480, 640)),
                               torch.tensor([[64.0, 96.0, 320.0, 480.0]]))
