"""Faster R-CNN's pieces against hand-worked cases and torchvision's own: anchors, the RPN's labels (thresholds
and the best-anchor rule), the batched sampler's quotas, proposal selection (torchvision's
``filter_proposals``), the RoIAlign call, both losses (torchvision's ``compute_loss`` and ``fastrcnn_loss``
per image), and predict's contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_convert, box_iou, roi_align

from detectors.anchors import RPNAnchors
from detectors.assign import match_by_threshold, sample_balanced
from detectors.boxes import DeltaBoxCoder
from detectors.heads.faster_rcnn import FasterRCNNHead, FasterRCNNRaw
from detectors.heads.roi import RoIBoxHead, RoISamples, roi_loss, sample_rois, to_rois
from detectors.heads.rpn import rpn_loss, rpn_targets, select_proposals
from detectors.losses import choose_losses

TORCHVISION_LOSSES = choose_losses("test", {"smooth_l1_beta": 1 / 9}, {"box": "smooth_l1", "cls": "ce", "obj": "bce"},
                                   {"box": ("smooth_l1",), "cls": ("ce",), "obj": ("bce",)})


def random_boxes(generator, shape, size=(128, 160), min_wh=4.0, max_wh=60.0):
    h, w = size
    xy = torch.rand(*shape, 2, generator=generator) * torch.tensor([w, h]) * 0.7
    wh = torch.rand(*shape, 2, generator=generator) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], -1)


def padded_targets(generator, batch=3, max_gt=5, num_classes=3, size=(128, 160)):
    """Random padded targets, image i having i (mod max_gt + 1) boxes (the first none), padding zeros."""
    boxes = random_boxes(generator, (batch, max_gt), size)
    counts = torch.arange(batch) % (max_gt + 1)
    mask = torch.arange(max_gt)[None, :] < counts[:, None]
    return {"boxes": boxes * mask[..., None], "mask": mask,
            "labels": torch.randint(0, num_classes, (batch, max_gt), generator=generator),
            "weights": torch.ones(batch, max_gt), "difficult": torch.zeros(batch, max_gt, dtype=torch.bool)}


# ---- anchors --------------------------------------------------------------------------------------------

def test_anchors_of_a_hand_worked_map():
    anchors = RPNAnchors(sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0))((2, 3), 16)
    assert anchors.shape == (2 * 3 * 6, 4) and RPNAnchors().num_anchors_per_cell == 9
    r = math.sqrt(0.5)
    # within a cell: ratio-major, then size; ratio = h / w, area = size^2
    expected_wh = [(32 / r, 32 * r), (64 / r, 64 * r), (32, 32), (64, 64), (32 * r, 32 / r), (64 * r, 64 / r)]
    cell = anchors.view(2, 3, 6, 4)
    torch.testing.assert_close(cell[1, 2, :, 2:], torch.tensor(expected_wh))
    # cell (row 1, col 2) is centred at x = 2.5 * 16, y = 1.5 * 16
    torch.testing.assert_close(cell[1, 2, :, :2], torch.tensor([[40.0, 24.0]]).expand(6, 2))
    torch.testing.assert_close(cell[0, 0, :, :2], torch.tensor([[8.0, 8.0]]).expand(6, 2))
    gen = RPNAnchors()  # cached by shape
    assert gen((5, 7), 16) is gen((5, 7), 16)


def test_anchors_are_torchvisions_shifted_to_the_cell_centres():
    """torchvision's AnchorGenerator: the same shapes and order, rounded, on the cells' top-left corners."""
    sizes, ratios = (128, 256, 512), (0.5, 1.0, 2.0)
    generator = AnchorGenerator((sizes,), (ratios,))
    feat = torch.zeros(1, 1, 4, 5)
    from torchvision.models.detection.image_list import ImageList

    theirs = generator(ImageList(torch.zeros(1, 3, 64, 80), [(64, 80)]), [feat])[0]
    ours = box_convert(RPNAnchors(sizes, ratios)((4, 5), 16), "cxcywh", "xyxy")
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours - 8.0, theirs, atol=0.5, rtol=0)


# ---- the RPN's labels -------------------------------------------------------------------------------------

def test_rpn_labels_of_a_hand_built_case():
    """Six 16 px anchors in a row (a 1 x 6 map, one anchor per cell): x in [0, 16], [16, 32], ..., [80, 96].
    Image 0: GT1 = anchor 0 (IoU 1: positive); GT2 = [20, 44] overlaps anchors 1 and 2 equally (3/7 each, under
    0.7: both positive by the best-anchor rule, ties included); GT3 = [50, 74] overlaps anchor 3 by 0.538 (its
    best: positive) and anchor 4 by 1/3 (between 0.3 and 0.7, not a best: ignored); anchor 5 overlaps nothing
    (negative). Image 1: no objects but a difficult one on anchor 0 (ignored), the rest negative."""
    anchors = RPNAnchors(sizes=(16,), aspect_ratios=(1.0,))((1, 6), 16)
    xyxy = box_convert(anchors, "cxcywh", "xyxy")
    boxes = torch.tensor([[[0, 0, 16, 16], [20, 0, 44, 16], [50, 0, 74, 16], [0, 0, 0, 0]],
                          [[0, 0, 16, 16], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    difficult = torch.tensor([[False] * 4, [True, False, False, False]])
    match = match_by_threshold(xyxy, boxes, mask, 0.7, 0.3, best_match=True)
    assert match.positive[0].tolist() == [True, True, True, True, False, False]
    assert match.negative[0].tolist() == [False, False, False, False, False, True]
    assert match.gt_index[0, :4].tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(match.iou[0], torch.tensor([1.0, 3 / 7, 3 / 7, 7 / 13, 1 / 3, 0.0]))
    # without the rule only the IoU >= 0.7 anchor is positive, and the tied ones are ignored
    plain = match_by_threshold(xyxy, boxes, mask, 0.7, 0.3)
    assert plain.positive[0].tolist() == [True, False, False, False, False, False]

    targets = {"boxes": boxes, "mask": mask, "difficult": difficult, "weights": torch.ones(2, 4)}
    t = rpn_targets(xyxy, targets, 0.7, 0.3, num_samples=256, positive_fraction=0.5)  # every candidate fits
    assert t.positive.tolist() == [[True, True, True, True, False, False], [False] * 6]
    assert t.negative.tolist() == [[False, False, False, False, False, True], [False] + [True] * 5]
    torch.testing.assert_close(t.matched_boxes[0, :4], boxes[0, [0, 1, 1, 2]])


def test_rpn_labels_equal_torchvisions_matcher():
    g = torch.Generator().manual_seed(0)
    anchors = RPNAnchors(sizes=(16, 32, 64))((8, 10), 16)
    xyxy = box_convert(anchors, "cxcywh", "xyxy")
    targets = padded_targets(g, batch=4, max_gt=6)
    match = match_by_threshold(xyxy, targets["boxes"], targets["mask"], 0.7, 0.3, best_match=True)
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 10, "testing": 10},
                                {"training": 10, "testing": 10}, 0.7)
    for i in range(1, 4):  # torchvision's matcher refuses images without ground truth
        n = int(targets["mask"][i].sum())
        labels, matched = rpn.assign_targets_to_anchors([xyxy], [{"boxes": targets["boxes"][i, :n]}])
        assert torch.equal(match.positive[i], labels[0] == 1)
        assert torch.equal(match.negative[i], labels[0] == 0)
        pos = match.positive[i]
        torch.testing.assert_close(targets["boxes"][i][match.gt_index[i]][pos], matched[0][pos])


# ---- sampling ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples,fraction", [(256, 0.5), (512, 0.25), (16, 0.25)])
def test_sampling_quotas_hold_per_image(num_samples, fraction):
    g = torch.Generator().manual_seed(num_samples)
    torch.manual_seed(1)
    batch, n = 6, 700
    # images from few to many candidates of each kind
    p_pos = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 0.3])[:, None]
    draw = torch.rand(batch, n, generator=g)
    positive = draw < p_pos
    p_neg = torch.tensor([1, 0.5, 0.05, 0.9, 1, 0.01])[:, None]
    negative = (draw >= p_pos) & (torch.rand(batch, n, generator=g) < p_neg)
    pos, neg = sample_balanced(positive, negative, num_samples, fraction)
    for i in range(batch):  # the plain per-image rule (torchvision's BalancedPositiveNegativeSampler)
        want_pos = min(int(positive[i].sum()), int(num_samples * fraction))
        want_neg = min(int(negative[i].sum()), num_samples - want_pos)
        assert int(pos[i].sum()) == want_pos and int(neg[i].sum()) == want_neg
    assert not (pos & ~positive).any() and not (neg & ~negative).any()


def test_sampling_draws_uniformly():
    torch.manual_seed(0)
    positive = torch.zeros(2000, 10, dtype=torch.bool)
    positive[:, :6] = True
    pos, _ = sample_balanced(positive, torch.zeros_like(positive), 6, 0.5)  # 3 of the 6 in each row
    freq = pos[:, :6].float().mean(0)
    assert torch.allclose(freq, torch.full((6,), 0.5), atol=0.05)


def test_roi_sampling_against_a_per_image_reference():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    targets = padded_targets(g, batch=4, max_gt=5)
    targets["difficult"][3, 0] = True
    # proposals: jittered copies of the ground truths (foreground) and random boxes, some padding
    jitter = targets["boxes"].repeat(1, 8, 1) + torch.randn(4, 40, 4, generator=g) * 4
    proposals = torch.cat([jitter, random_boxes(g, (4, 60))], 1)
    valid = torch.rand(4, 100, generator=g) < 0.9
    s = sample_rois(proposals, valid, targets, num_samples=32, positive_fraction=0.25, fg_iou=0.5, bg_iou=0.5)
    assert s.boxes.shape == (4, 32, 4)
    for i in range(4):
        n = int(targets["mask"][i].sum())
        gt = targets["boxes"][i, :n]
        cand = torch.cat([proposals[i][valid[i]], gt])
        if n:
            best, index = box_iou(gt, cand).max(0)
            fg = (best >= 0.5) & ~targets["difficult"][i, :n][index]
            bg = best < 0.5
        else:
            fg, bg = torch.zeros(len(cand), dtype=torch.bool), torch.ones(len(cand), dtype=torch.bool)
        want_fg = min(int(fg.sum()), 8)
        want_bg = min(int(bg.sum()), 32 - want_fg)
        taken = s.valid[i]
        assert int((s.labels[i] > 0).sum()) == want_fg and int((taken & (s.labels[i] == 0)).sum()) == want_bg
        assert taken.tolist() == [True] * (want_fg + want_bg) + [False] * (32 - want_fg - want_bg)  # sampled first
        for box, label, matched in zip(s.boxes[i][taken], s.labels[i][taken], s.matched_boxes[i][taken]):
            overlaps = box_iou(box[None], gt)[0] if n else torch.zeros(1)
            if label > 0:
                j = int(overlaps.argmax())
                assert overlaps[j] >= 0.5 and label == targets["labels"][i, j] + 1 and torch.equal(matched, gt[j])
            else:
                assert overlaps.max() < 0.5
        assert (s.weight[i] == taken.float()).all()


# ---- proposals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_proposals_are_torchvisions_filter_proposals(training):
    g = torch.Generator().manual_seed(int(training))
    size = (160, 224)
    anchors = RPNAnchors(sizes=(32, 64, 128))((10, 14), 16)
    batch, num_anchors = 3, anchors.shape[0]
    objectness = torch.randn(batch, num_anchors, generator=g) * 3
    deltas = torch.randn(batch, num_anchors, 4, generator=g) * 0.5
    deltas[:, ::7, 2] = -20.0  # some tiny boxes for the min-size rule
    coder = DeltaBoxCoder((1.0, 1.0, 1.0, 1.0))
    pre, post = {"training": 600, "testing": 300}, {"training": 400, "testing": 100}
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, pre, post, 0.7, score_thresh=0.2)
    rpn.train(training)
    key = "training" if training else "testing"
    theirs, their_scores = rpn.filter_proposals(coder.decode(deltas, anchors), objectness, [size] * batch,
                                                [num_anchors])
    boxes, scores, valid = select_proposals(objectness, deltas, anchors, coder, size, pre[key], post[key], 0.7,
                                            min_size=1e-3, score_threshold=0.2)
    assert boxes.shape == (batch, post[key], 4)
    for i in range(batch):
        assert 0 < len(theirs[i]) <= post[key]
        assert torch.equal(boxes[i][valid[i]], theirs[i]) and torch.equal(scores[i][valid[i]], their_scores[i])
        assert valid[i].tolist() == [True] * len(theirs[i]) + [False] * (post[key] - len(theirs[i]))


# ---- RoIAlign ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", [False, True])
def test_roi_features_are_torchvisions_roi_align_per_image(pool):
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(3, 8, 10, 12, generator=g).contiguous(memory_format=torch.channels_last)
    boxes = random_boxes(g, (3, 7), size=(160, 192), max_wh=90)
    head = RoIBoxHead(8, 2, stride=16, roi_pool=pool, fc_width=16)
    ours = head.pool(feat, to_rois(boxes))
    if pool:
        from torchvision.ops import roi_pool

        theirs = roi_pool(feat.contiguous(), list(boxes), 7, 1 / 16)
    else:
        theirs = roi_align(feat.contiguous(), list(boxes), 7, 1 / 16, 2)
    torch.testing.assert_close(ours, theirs)
    # the valid-only path classifies the same RoIs, zeros elsewhere
    valid = torch.rand(3, 7, generator=g) < 0.6
    logits, deltas = head(feat, boxes, valid)
    all_logits, all_deltas = head(feat, boxes)
    torch.testing.assert_close(logits[valid], all_logits[valid])
    torch.testing.assert_close(deltas[valid], all_deltas[valid])
    assert (logits[~valid] == 0).all()
    with torch.no_grad():  # evaluation's chunks give the same
        head.eval_chunk = 4
        torch.testing.assert_close(head(feat, boxes, valid)[0], logits.detach())


# ---- losses against torchvision, per image ------------------------------------------------------------------

def test_rpn_loss_equals_torchvisions_compute_loss():
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    anchors = RPNAnchors(sizes=(16, 32, 64))((8, 10), 16)
    xyxy = box_convert(anchors, "cxcywh", "xyxy")
    targets = padded_targets(g, batch=4, max_gt=6)
    objectness = torch.randn(4, len(anchors), generator=g)
    deltas = torch.randn(4, len(anchors), 4, generator=g) * 0.3
    coder = DeltaBoxCoder((1.0, 1.0, 1.0, 1.0))
    t = rpn_targets(xyxy, targets, 0.7, 0.3, 64, 0.5)
    ours = rpn_loss(objectness, deltas, anchors, t, coder, TORCHVISION_LOSSES)

    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 64, 0.5, {"training": 1, "testing": 1},
                                {"training": 1, "testing": 1}, 0.7)
    labels, regression = [], []
    for i in range(4):
        n = int(targets["mask"][i].sum())
        lab, matched = rpn.assign_targets_to_anchors([xyxy], [{"boxes": targets["boxes"][i, :n]}])
        labels.append(lab[0])
        regression.append(rpn.box_coder.encode_single(matched[0], xyxy))
    # the same draw: torchvision's sampler replaced by ours
    rpn.fg_bg_sampler = lambda _: ([p.to(torch.uint8) for p in t.positive], [n.to(torch.uint8) for n in t.negative])
    theirs = rpn.compute_loss(objectness.flatten()[:, None], deltas.reshape(-1, 4), labels, regression)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def test_roi_loss_equals_torchvisions_fastrcnn_loss():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    targets = padded_targets(g, batch=3, max_gt=4, num_classes=5)
    proposals = torch.cat([targets["boxes"].repeat(1, 6, 1) + torch.randn(3, 24, 4, generator=g) * 3,
                           random_boxes(g, (3, 40))], 1)
    s = sample_rois(proposals, torch.ones(3, 64, dtype=torch.bool), targets, 32, 0.25, 0.5, 0.5)
    logits = torch.randn(3, 32, 6, generator=g)
    deltas = torch.randn(3, 32, 5, 4, generator=g)
    coder = DeltaBoxCoder((10.0, 10.0, 5.0, 5.0))
    ours = roi_loss(logits, deltas, s, coder, TORCHVISION_LOSSES)
    tv_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    labels = [s.labels[i][s.valid[i]] for i in range(3)]
    regression = [tv_coder.encode_single(s.matched_boxes[i][s.valid[i]], s.boxes[i][s.valid[i]]) for i in range(3)]
    # torchvision predicts background deltas too (never used): a zero column for class 0
    box_regression = torch.cat([torch.zeros(3, 32, 1, 4), deltas], 2)[s.valid].reshape(-1, 24)
    theirs = fastrcnn_loss(logits[s.valid], box_regression, labels, regression)
    assert int((s.labels > 0).sum()) > 0
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def test_losses_weight_positives_by_their_box_weight():
    """Mixup's per-box weights: a positive of weight w counts w times in both terms."""
    samples = RoISamples(boxes=torch.tensor([[[0.0, 0, 20, 20], [0, 0, 20, 20]]]),
                         valid=torch.ones(1, 2, dtype=torch.bool),
                         labels=torch.tensor([[1, 0]]), matched_boxes=torch.tensor([[[1.0, 1, 22, 21], [0, 0, 0, 0]]]),
                         weight=torch.tensor([[0.25, 1.0]]))
    logits, deltas = torch.randn(1, 2, 3), torch.randn(1, 2, 2, 4)
    cls, box = roi_loss(logits, deltas, samples, DeltaBoxCoder(), TORCHVISION_LOSSES)
    ce = F.cross_entropy(logits[0], torch.tensor([1, 0]), reduction="none")
    torch.testing.assert_close(cls, (0.25 * ce[0] + ce[1]) / 2)
    unweighted = roi_loss(logits, deltas, RoISamples(**{**vars(samples), "weight": torch.tensor([[1.0, 1.0]])}),
                          DeltaBoxCoder(), TORCHVISION_LOSSES)[1]
    torch.testing.assert_close(box, 0.25 * unweighted)


# ---- the head: contract and predict ---------------------------------------------------------------------------

def small_head(**kwargs):
    options = dict(anchor_sizes=(16, 32, 64), rpn_channels=16, fc_width=32, roi_batch_size=32,
                   rpn_pre_nms_top_k={"train": 200, "test": 100}, rpn_post_nms_top_k={"train": 100, "test": 50})
    return FasterRCNNHead([8], 3, **{**options, **kwargs})


def test_forward_samples_with_targets_and_proposes_without():
    torch.manual_seed(0)
    head = small_head()
    feat = torch.randn(2, 8, 8, 10)
    targets = padded_targets(torch.Generator().manual_seed(1), batch=2, max_gt=3)
    raw = head(feat[None].unbind(0), targets)
    assert raw.samples is not None and raw.rois.shape == (2, 32, 4) and raw.cls_logits.shape == (2, 32, 4)
    assert raw.box_deltas.shape == (2, 32, 3, 4) and raw.objectness.shape == (2, 8 * 10 * 9)
    losses = head.loss(raw, targets, (128, 160))
    assert set(losses) == {"loss", "loss_objectness", "loss_rpn_box", "loss_cls", "loss_box", "num_positives"}
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    # the total is the sum of the four terms, and num_positives counts the foreground RoIs sampled
    torch.testing.assert_close(losses["loss"], losses["loss_objectness"] + losses["loss_rpn_box"]
                               + losses["loss_cls"] + losses["loss_box"])
    assert losses["num_positives"] == (raw.samples.labels > 0).sum()
    head.eval()
    with torch.no_grad():
        raw = head([feat])
    assert raw.samples is None and raw.rois.shape == (2, 50, 4)
    with pytest.raises(ValueError, match="call it with the targets"):
        head.loss(raw, targets, (128, 160))


def hand_built_case(**kwargs):
    """A head (every candidate RoI sampled: 256 slots for 100 proposals + 2 ground truths), a batch of three
    images with 0, 1 and 2 ground truths on a (8, 10) map of stride 16 (128 x 160 px), its raw training
    outputs and the targets."""
    torch.manual_seed(0)
    head = small_head(roi_batch_size=256, **kwargs)
    targets = padded_targets(torch.Generator().manual_seed(4), batch=3, max_gt=2)
    targets["labels"] = torch.tensor([[0, 1], [2, 0], [1, 2]])
    return head, targets


def test_the_ground_truths_join_the_sampled_rois_with_their_own_targets():
    head, targets = hand_built_case()
    feat = torch.randn(3, 8, 8, 10)
    raw = head([feat], targets)
    s = raw.samples
    assert raw.rois.shape == (3, 100 + 2, 4) and torch.equal(raw.roi_valid, s.valid)
    for i in range(3):
        n = int(targets["mask"][i].sum())
        assert n == i
        rois, labels, matched = s.boxes[i][s.valid[i]], s.labels[i][s.valid[i]], s.matched_boxes[i][s.valid[i]]
        for j in range(n):
            gt = targets["boxes"][i, j]
            # the ground truth itself is a RoI (no proposal of an untrained RPN lands on it exactly), foreground
            # of its own class (label + 1: 0 is background), regressing to itself
            at = (rois == gt).all(-1).nonzero().flatten()
            assert len(at) == 1, f"image {i}: ground truth {j} is not among the sampled RoIs"
            assert labels[at].item() == targets["labels"][i, j].item() + 1 and torch.equal(matched[at[0]], gt)
        # every foreground RoI overlaps its matched ground truth by >= 0.5 (torchvision's box_iou), and the
        # image without objects has only background
        fg = labels > 0
        assert int(fg.sum()) >= n
        if fg.any():
            assert (box_iou(rois[fg], matched[fg]).diagonal() >= 0.5).all()
    # the RoI head classified those samples: its outputs on them, recomputed from the map
    with torch.no_grad():
        logits, deltas = head.roi_head(feat, s.boxes)
    torch.testing.assert_close(raw.cls_logits.detach(), logits)
    torch.testing.assert_close(raw.box_deltas.detach(), deltas)


def test_losses_of_a_hand_built_case():
    """Zeroed class and objectness layers: the RoI class loss is exactly log(C + 1) (softmax over 4 equal
    logits) and the objectness loss log 2 (a sigmoid at 0), each averaged over what was sampled. Box deltas
    set to the targets torchvision's BoxCoder encodes (the RoI head's weights 10, 10, 5, 5 on the true class
    of each foreground RoI, anything in the other classes' columns; the RPN's 1, 1, 1, 1 on each positive
    anchor): both box losses are 0. Then one unit of dx on each of them: smooth L1 (beta 1) gives 0.5 per
    positive, divided by the number sampled (torchvision's normalisation)."""
    head, targets = hand_built_case()
    for layer in (head.roi_head.cls_score, head.rpn.objectness):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    raw = head([torch.randn(3, 8, 8, 10)], targets)
    s = raw.samples
    fg = s.labels > 0
    num_rois = int(s.valid.sum())
    assert int(fg.sum()) >= 3 and num_rois == 3 * 100 + 3  # every proposal and ground truth sampled
    # the RoI head's perfect deltas, by torchvision's coder, on the true class only
    tv_roi = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    box_deltas = torch.randn_like(raw.box_deltas) * 3  # the wrong classes' columns: never read
    perfect_roi = tv_roi.encode_single(s.matched_boxes[fg], s.boxes[fg])
    b, k = fg.nonzero().unbind(1)
    box_deltas[b, k, s.labels[fg] - 1] = perfect_roi
    # the RPN's: each positive anchor (IoU >= 0.7 or a ground truth's best, ties included) to its best GT
    anchors = box_convert(head.make_anchors(raw.feature_shape, torch.device("cpu")), "cxcywh", "xyxy")
    rpn_deltas = torch.randn_like(raw.rpn_deltas)
    positives = []
    for i in range(3):
        n = int(targets["mask"][i].sum())
        if n == 0:
            positives.append(0)
            continue
        iou = box_iou(targets["boxes"][i, :n], anchors)  # (n, A)
        best, index = iou.max(0)
        positive = (best >= 0.7) | (iou == iou.max(1, keepdim=True).values).any(0)
        positives.append(int(positive.sum()))
        rpn_deltas[i, positive] = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
            targets["boxes"][i, index[positive]], anchors[positive])
    # 256 anchors sampled per image, up to half positive; the rest negatives (IoU < 0.3: plenty on this map)
    assert 0 < max(positives) <= 128
    num_anchors = 3 * 256

    def loss_with(roi, rpn):
        return head.loss(FasterRCNNRaw(raw.objectness, rpn, raw.rois, raw.roi_valid, raw.cls_logits, roi,
                                       raw.feature_shape, s), targets, (128, 160))

    losses = loss_with(box_deltas, rpn_deltas)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(3 + 1)))
    torch.testing.assert_close(losses["loss_objectness"], torch.tensor(math.log(2)))
    assert losses["loss_box"] < 1e-6 and losses["loss_rpn_box"] < 1e-6
    assert losses["num_positives"] == int(fg.sum())

    box_deltas[b, k, s.labels[fg] - 1, 0] += 1.0
    rpn_deltas[..., 0] += 1.0  # every anchor: only the sampled positives may count
    losses = loss_with(box_deltas, rpn_deltas)
    torch.testing.assert_close(losses["loss_box"], torch.tensor(0.5 * int(fg.sum()) / num_rois))
    torch.testing.assert_close(losses["loss_rpn_box"], torch.tensor(0.5 * sum(positives) / num_anchors))
    torch.testing.assert_close(losses["loss"], sum(losses[k] for k in ("loss_objectness", "loss_rpn_box", "loss_cls",
                                                                       "loss_box")))


def test_predict_decodes_class_specific_boxes_and_keeps_the_contract():
    head = small_head().eval()
    rois = torch.tensor([[[10.0, 10, 50, 40], [60, 20, 100, 90], [0, 0, 0, 0]]])
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0], [0.0, 9.0, 0.0, 0.0]]])
    deltas = torch.zeros(1, 3, 3, 4)
    deltas[0, 1, 2] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # class 2 of RoI 1: one RoI width right (weights 10)
    raw = FasterRCNNRaw(torch.zeros(1, 720), torch.zeros(1, 720, 4), rois, torch.tensor([[True, True, False]]),
                        logits, deltas, (8, 10))
    preds = head.predict(raw, (100, 200))
    p = preds[0]
    assert p["labels"].tolist() == [2, 0]  # the padding RoI (score 0.99 for class 0) gives nothing
    e = math.e
    torch.testing.assert_close(p["scores"], torch.tensor([e ** 6 / (e ** 6 + 3), e ** 5 / (e ** 5 + 3)]))
    # class 2's box of RoI 1 is the RoI moved one width (40 px) right; RoI 0's class 0 box is the RoI
    torch.testing.assert_close(p["boxes"], torch.tensor([[100.0, 20, 140, 90], [10, 10, 50, 40]]))


def test_predict_on_untrained_outputs_keeps_the_contract():
    torch.manual_seed(0)
    head = small_head(score_threshold=0.0, max_detections=7).eval()
    with torch.no_grad():
        preds = head.predict(head([torch.randn(2, 8, 8, 10)]), (128, 160))
    assert len(preds) == 2
    for p in preds:
        assert 0 < len(p["boxes"]) <= 7 and (p["scores"][:-1] >= p["scores"][1:]).all()
        assert (p["boxes"][:, :2] >= 0).all() and (p["boxes"][:, 2] <= 160).all() and (p["boxes"][:, 3] <= 128).all()
        assert ((p["labels"] >= 0) & (p["labels"] < 3)).all()


def test_the_head_wants_one_map():
    with pytest.raises(ValueError, match="one feature map"):
        FasterRCNNHead([256, 512], 3, strides=(8, 16))
