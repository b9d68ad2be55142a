"""SSD multibox loss: hard negative mining, agreement with a per-image reference, overfitting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from detectors.anchors import SSDPriors
from detectors.heads.ssd import SSDHead, SSDRaw
from detectors.losses import hard_negative_mask


@pytest.mark.parametrize("seed", range(5))
def test_hard_negatives_are_the_top_losses_at_three_to_one(seed):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(4, 200, generator=g)
    positive = torch.rand(4, 200, generator=g) < torch.tensor([[0.0], [0.01], [0.1], [0.4]])
    neg = hard_negative_mask(loss, positive, neg_pos_ratio=3)
    for b in range(4):
        n_pos, n_avail = int(positive[b].sum()), int((~positive[b]).sum())
        assert int(neg[b].sum()) == min(3 * n_pos, n_avail)
        assert not (neg[b] & positive[b]).any()
        unselected = loss[b][~positive[b] & ~neg[b]]
        if neg[b].any() and len(unselected):
            assert loss[b][neg[b]].min() >= unselected.max()


def test_min_negatives_and_exclusions():
    loss = torch.arange(10.0).view(1, 10)
    positive = torch.zeros(1, 10, dtype=torch.bool)
    exclude = torch.zeros(1, 10, dtype=torch.bool)
    exclude[0, 9] = True
    neg = hard_negative_mask(loss, positive, 3, min_negatives=2, exclude=exclude)
    assert neg[0].nonzero().flatten().tolist() == [7, 8]


def reference_multibox_loss(head, raw, boxes_list, labels_list, image_size, excluded=None):
    """ssd.pytorch's MultiBoxLoss, one image at a time, written with plain loops over images.
    ``excluded``: per image, a (A,) bool of priors that are neither positive nor mined as negatives."""
    priors = head.priors(raw.feature_shapes, image_size)
    total_cls, total_box, total_pos = 0.0, 0.0, 0
    for b, (gt, lab) in enumerate(zip(boxes_list, labels_list)):
        from tests.test_matching import reference_match

        idx, pos = reference_match(priors, gt, head.iou_threshold)
        pos = torch.tensor(pos)
        idx = torch.tensor(idx)
        out = torch.zeros_like(pos) if excluded is None else excluded[b]
        target_cls = torch.where(pos, lab[idx] + 1 if len(lab) else torch.zeros_like(idx), 0) if len(lab) else torch.zeros(len(pos), dtype=torch.long)
        ce = F.cross_entropy(raw.cls_logits[b], target_cls, reduction="none")
        n_pos = int(pos.sum())
        n_neg = min(3 * n_pos, int((~pos & ~out).sum()))
        neg_losses = ce.clone()
        neg_losses[pos | out] = -1
        neg = torch.zeros_like(pos)
        neg[neg_losses.argsort(descending=True)[:n_neg]] = True
        total_cls += ce[pos].sum() + ce[neg].sum()
        if n_pos:
            matched = gt[idx[pos]]
            p = priors[pos]
            m = box_convert(matched, "xyxy", "cxcywh")
            enc = torch.cat([(m[:, :2] - p[:, :2]) / (0.1 * p[:, 2:]), torch.log(m[:, 2:] / p[:, 2:]) / 0.2], 1)
            total_box += F.smooth_l1_loss(raw.box_offsets[b][pos], enc, reduction="sum")
        total_pos += n_pos
    return total_cls / max(total_pos, 1), total_box / max(total_pos, 1)


def small_head(num_classes=3):
    priors = SSDPriors(aspect_ratios=[[2], [2, 3]], min_scale=0.3, max_scale=0.8, first_scale=None)
    return SSDHead([8, 8], num_classes, priors)


def test_batched_loss_equals_per_image_reference():
    torch.manual_seed(0)
    head = small_head()
    shapes = [(8, 8), (4, 4)]
    feats = [torch.randn(3, 8, h, w) for h, w in shapes]
    raw = head(feats)
    boxes_list = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]),
                  torch.zeros(0, 4),
                  torch.tensor([[10.0, 10.0, 14.0, 13.0]])]
    labels_list = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    targets = {"boxes": torch.zeros(3, 2, 4), "labels": torch.full((3, 2), -1), "mask": torch.zeros(3, 2, dtype=torch.bool),
               "weights": torch.zeros(3, 2)}
    for b, (bx, lb) in enumerate(zip(boxes_list, labels_list)):
        targets["boxes"][b, :len(bx)] = bx
        targets["labels"][b, :len(bx)] = lb
        targets["mask"][b, :len(bx)] = True
        targets["weights"][b, :len(bx)] = 1
    ours = head.loss(raw, targets, (64, 64))
    ref_cls, ref_box = reference_multibox_loss(head, raw, boxes_list, labels_list, (64, 64))
    torch.testing.assert_close(ours["loss_cls"], ref_cls.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["loss_box"], ref_box.float(), rtol=1e-5, atol=1e-5)


def test_per_box_weights_scale_the_positive_terms():
    torch.manual_seed(1)
    head = small_head()
    raw = head([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)])
    targets = {"boxes": torch.tensor([[[5.0, 5.0, 40.0, 40.0]]]), "labels": torch.tensor([[1]]),
               "mask": torch.ones(1, 1, dtype=torch.bool), "weights": torch.ones(1, 1)}
    full = head.loss(raw, targets, (64, 64))
    half = head.loss(raw, {**targets, "weights": torch.full((1, 1), 0.5)}, (64, 64))
    torch.testing.assert_close(half["loss_box"], full["loss_box"] * 0.5)
    assert half["loss_cls"] < full["loss_cls"]


def test_difficult_objects_are_ignored_not_negative():
    """An image with a normal and a difficult object, the priors of the difficult one made the hardest
    negatives there are (background loss ~16, the others' ~1): were they background, mining would take
    them. The loss must be SSD's on the normal object with those priors left out by hand, and not the
    loss with the difficult object removed (its priors background) or kept as a normal object."""
    from tests.test_matching import reference_match

    torch.manual_seed(2)
    head, size = small_head(), (64, 64)
    raw = head([torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)])
    priors = head.priors(raw.feature_shapes, size)
    normal, difficult = torch.tensor([[2.0, 3.0, 30.0, 40.0]]), torch.tensor([[36.0, 34.0, 62.0, 62.0]])
    # the difficult object's priors, found on their own: its best prior and those at IoU >= 0.5
    by_difficult = torch.tensor(reference_match(priors, difficult, head.iou_threshold)[1])
    by_normal = torch.tensor(reference_match(priors, normal, head.iou_threshold)[1])
    assert by_difficult.sum() >= 2 and not (by_difficult & by_normal).any()
    logits = raw.cls_logits.detach().clone()
    logits[0, by_difficult, 0], logits[0, by_difficult, 2] = -8.0, 8.0
    raw = SSDRaw(logits, raw.box_offsets, raw.feature_shapes)

    # image 0: normal (label 0) + difficult (label 1); image 1: the normal object alone
    targets = {"boxes": torch.stack([torch.cat([normal, difficult]), torch.cat([normal, torch.zeros(1, 4)])]),
               "labels": torch.tensor([[0, 1], [0, -1]]), "mask": torch.tensor([[True, True], [True, False]]),
               "weights": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
               "difficult": torch.tensor([[False, True], [False, False]])}
    ours = head.loss(raw, targets, size)
    none_out = torch.zeros_like(by_difficult)
    ref_cls, ref_box = reference_multibox_loss(head, raw, [normal, normal], [torch.tensor([0])] * 2, size,
                                               excluded=[by_difficult, none_out])
    torch.testing.assert_close(ours["loss_cls"], ref_cls.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["loss_box"], ref_box.float(), rtol=1e-5, atol=1e-5)
    assert ours["num_positives"].item() == 2 * by_normal.sum().item()

    # removed (its priors background): they are mined, and the loss is much higher
    removed = head.loss(raw, {**targets, "mask": targets["mask"] & ~targets["difficult"]}, size)
    as_background_cls, _ = reference_multibox_loss(head, raw, [normal, normal], [torch.tensor([0])] * 2, size)
    torch.testing.assert_close(removed["loss_cls"], as_background_cls.float(), rtol=1e-5, atol=1e-5)
    assert removed["loss_cls"] > ours["loss_cls"] + 1.0
    # kept as a normal object: its priors become positives (more of them, another loss)
    kept = head.loss(raw, {k: v for k, v in targets.items() if k != "difficult"}, size)
    assert kept["num_positives"] > ours["num_positives"]
    assert not torch.isclose(kept["loss_cls"], ours["loss_cls"], rtol=1e-3)


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        a = self.a(x)
        return [a, self.b(a)]


def test_loss_falls_when_overfitting_one_batch_including_an_empty_image():
    torch.manual_seed(0)
    backbone, head = TinyBackbone(), small_head()
    images = torch.rand(2, 3, 64, 64)
    targets = {"boxes": torch.tensor([[[4.0, 4.0, 30.0, 28.0]], [[0.0, 0.0, 0.0, 0.0]]]),
               "labels": torch.tensor([[2], [-1]]), "mask": torch.tensor([[True], [False]]),
               "weights": torch.tensor([[1.0], [0.0]])}
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(150):
        out = head.loss(head(backbone(images)), targets, (64, 64))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.2 * losses[0]
    # the overfit model finds the object
    pred = head.predict(head(backbone(images)), (64, 64))[0]
    assert pred["labels"][0].item() == 2 and pred["scores"][0] > 0.5
