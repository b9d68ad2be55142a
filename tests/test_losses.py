"""The configurable loss terms against torchvision.ops and hand-worked values, and the heads' choice of them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss, sigmoid_focal_loss

from detectors.losses import box_regression_loss, choose_losses, objectness_loss, sigmoid_class_loss, softmax_focal_loss


def random_boxes(g, n):
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 1], -1)


def test_giou_of_a_hand_worked_pair():
    # (0,0,2,2) and (1,1,3,3): IoU 1/7, enclosing box 3x3, so GIoU = 1/7 - (9 - 7) / 9
    loss = box_regression_loss("giou", torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
    assert loss.item() == pytest.approx(1 - (1 / 7 - 2 / 9))


def test_iou_family_against_torchvision():
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(g, 20), random_boxes(g, 20)
    assert torch.allclose(box_regression_loss("iou", a, b), 1 - box_iou(a, b).diagonal(), atol=1e-6)
    assert torch.allclose(box_regression_loss("diou", a, b), distance_box_iou_loss(a, b), atol=1e-6)
    assert torch.allclose(box_regression_loss("ciou", a, b), complete_box_iou_loss(a, b), atol=1e-6)
    assert (box_regression_loss("iou", a, a) < 1e-6).all()  # a box against itself: no loss


def test_offset_losses_against_torch():
    g = torch.Generator().manual_seed(1)
    p, t = torch.randn(3, 7, 4, generator=g), torch.randn(3, 7, 4, generator=g)
    assert torch.allclose(box_regression_loss("smooth_l1", p, t, beta=0.5),
                          F.smooth_l1_loss(p, t, beta=0.5, reduction="none").sum(-1))
    assert torch.allclose(box_regression_loss("l1", p, t), (p - t).abs().sum(-1))
    assert torch.allclose(box_regression_loss("sse", p, t), F.mse_loss(p, t, reduction="none").sum(-1) / 2)


def test_focal_with_gamma_zero_is_bce_and_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(10, 5, generator=g), (torch.rand(10, 5, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(sigmoid_class_loss("focal", logits, targets, alpha=-1, gamma=0.0), bce, atol=1e-6)
    assert torch.allclose(sigmoid_class_loss("bce", logits, targets), bce)
    assert torch.allclose(sigmoid_class_loss("focal", logits, targets, 0.25, 2.0),
                          sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction="none"))
    labels = torch.randint(0, 5, (10,), generator=g)
    assert torch.allclose(softmax_focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels, reduction="none"),
                          atol=1e-6)


def test_softmax_focal_down_weights_the_easy_rows():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # an easy and a hard row, both label 0
    labels = torch.zeros(2, dtype=torch.long)
    p = torch.softmax(logits, -1)[:, 0]
    expected = -((1 - p) ** 2) * torch.log(p)
    assert torch.allclose(softmax_focal_loss(logits, labels, 2.0), expected)


def test_objectness_sse_is_darknets_half_squared_error():
    logits, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    expected = 0.5 * (torch.sigmoid(logits) - targets) ** 2
    assert torch.allclose(objectness_loss("sse", logits, targets), expected)


def test_a_loss_a_head_cannot_take_is_refused_in_one_line():
    allowed = {"box": ("smooth_l1", "giou"), "cls": ("ce",), "obj": ()}
    chosen = choose_losses("SSD", {"box": "giou", "cls": None, "focal_gamma": 1.5}, {"box": "smooth_l1", "cls": "ce"},
                           allowed)
    assert (chosen.box, chosen.cls, chosen.obj, chosen.focal_gamma) == ("giou", "ce", None, 1.5)
    with pytest.raises(ValueError, match=r"loss.box=l2 does not fit the SSD head: it takes loss.box among"):
        choose_losses("SSD", {"box": "l2"}, {"box": "smooth_l1", "cls": "ce"}, allowed)
    with pytest.raises(ValueError, match=r"loss.obj=bce does not fit the SSD head: it has no obj term"):
        choose_losses("SSD", {"obj": "bce"}, {"box": "smooth_l1", "cls": "ce"}, allowed)


def test_ssd_iou_loss_uses_the_decoded_boxes_of_the_positives():
    from detectors.anchors import SSDPriors
    from detectors.heads.ssd import SSDHead

    torch.manual_seed(0)
    head = SSDHead([8], 2, priors=SSDPriors([[2]], 0.3, 0.6, None), losses={"box": "giou", "cls": "focal"})
    raw = head([torch.randn(1, 8, 4, 4)])
    boxes = torch.tensor([[[10.0, 12.0, 40.0, 50.0]]])
    targets = {"boxes": boxes, "labels": torch.tensor([[1]]), "mask": torch.tensor([[True]]),
               "weights": torch.tensor([[1.0]])}
    losses = head.loss(raw, targets, (64, 64))
    from detectors.assign import match_priors

    priors = head.make_priors(raw, (64, 64))
    match = match_priors(priors, boxes, targets["mask"], head.iou_threshold)
    decoded = head.coder.decode(raw.box_offsets, priors)[match.positive]
    from torchvision.ops import generalized_box_iou_loss

    expected = generalized_box_iou_loss(decoded, boxes[0, :1].expand_as(decoded), reduction="sum") / match.positive.sum()
    assert losses["loss_box"].item() == pytest.approx(expected.item(), rel=1e-5)
    # sigmoid scores at prediction: each class its own sigmoid, starting near RetinaNet's prior of 0.01
    with torch.no_grad():
        scores = torch.sigmoid(head([torch.zeros(1, 8, 4, 4)]).cls_logits[..., 1:])
    assert torch.allclose(scores, torch.full_like(scores, 0.01), atol=1e-6) and math.isfinite(losses["loss"].item())


def test_iou_losses_of_padding_targets_are_finite_with_finite_gradients():
    """Slots without a ground truth read padding (all-zero boxes): their loss is masked by the heads, but a
    NaN in it would still poison the gradient through the mask."""
    g = torch.Generator().manual_seed(3)
    pred = random_boxes(g, 6).requires_grad_(True)
    target = torch.cat([random_boxes(g, 3), torch.zeros(3, 4)])
    for name in ("iou", "giou", "diou", "ciou"):
        loss = box_regression_loss(name, pred, target)
        assert torch.isfinite(loss).all() and (loss[3:] < 1e-6).all(), name
        (loss * torch.tensor([1.0, 1, 1, 0, 0, 0])).sum().backward()
        assert torch.isfinite(pred.grad).all() and (pred.grad[3:] == 0).all(), name
        pred.grad = None
