"""The shared decode -> top-k -> per-class NMS -> per-image cut against a plain per-image, per-class
loop over torchvision.ops.nms (and torchvision's per-image batched_nms), on every strategy the rule
can take."""

import pytest
import torch
from torchvision.ops import batched_nms, nms

from detectors import postprocess
from detectors.postprocess import (
    STRATEGIES,
    choose_strategy,
    grouped_nms,
    multiclass_nms,
)


def random_case(batch, anchors, classes, class_specific, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, anchors, classes, 2) if class_specific else (batch, anchors, 2)
    xy = torch.rand(shape, generator=g) * 200
    wh = torch.rand(shape, generator=g) * 60 + 4
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(batch, anchors, classes, generator=g) ** 3  # many low scores, as a real head gives
    scores[-1] = scores[-1] * 0.01  # the last image has nothing above the threshold
    return boxes, scores


def tied_case(batch, anchors, classes, seed):
    """Scores on a 1/20 grid (ties inside and across classes, duplicates of boxes) and boxes on a 1/8 px
    grid below 256 px, so torchvision's per-image class offsets (< 2048) add without rounding."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(batch, anchors, 2, generator=g) * 1200).floor() / 8
    wh = (torch.rand(batch, anchors, 2, generator=g) * 400).floor() / 8 + 2
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 1::7] = boxes[:, ::7][:, :boxes[:, 1::7].shape[1]]  # identical boxes: IoU 1
    scores = (torch.rand(batch, anchors, classes, generator=g) * 20).floor() / 20
    return boxes, scores


def candidates(boxes, scores, score_threshold, top_k):
    """Per image and class: the top-k (the same batched top-k call as the module: tie order is top-k's)
    above the threshold, as (boxes, scores) per (image, class)."""
    top_scores, top_idx = scores.transpose(1, 2).topk(min(top_k, scores.shape[1]), dim=2)
    out = []
    for b in range(scores.shape[0]):
        row = []
        for c in range(scores.shape[2]):
            idx = top_idx[b, c][top_scores[b, c] > score_threshold]
            bx = boxes[b, :, c] if boxes.dim() == 4 else boxes[b]
            row.append((bx[idx], scores[b, idx, c]))
        out.append(row)
    return out


def per_image_reference(boxes, scores, score_threshold, nms_threshold, top_k, max_det, independent_top_k=True):
    """Per image, per class torchvision.ops.nms; then the image's best by score (ties: class, then rank)."""
    out = []
    for b in range(scores.shape[0]):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for c in range(scores.shape[2]):
            if independent_top_k:  # this class's own top-k call
                s = scores[b, :, c]
                bx = boxes[b, :, c] if boxes.dim() == 4 else boxes[b]
                top = s.topk(min(top_k, len(s))).indices
                top = top[s[top] > score_threshold]
                bx, s = bx[top], s[top]
            else:
                bx, s = candidates(boxes, scores, score_threshold, top_k)[b][c]
            keep = nms(bx, s, nms_threshold)
            kept_boxes.append(bx[keep])
            kept_scores.append(s[keep])
            kept_labels.append(torch.full((len(keep),), c))
        s = torch.cat(kept_scores)
        order = s.sort(descending=True, stable=True).indices[:max_det]
        out.append({"boxes": torch.cat(kept_boxes)[order], "scores": s[order], "labels": torch.cat(kept_labels)[order]})
    return out


def per_image_batched_nms(boxes, scores, score_threshold, nms_threshold, top_k, max_det):
    """torchvision's SSD postprocess order: per image, candidates of every class in class order, one
    ``batched_nms`` (class offsets below 1000 boxes), the first ``max_det``."""
    out = []
    for row in candidates(boxes, scores, score_threshold, top_k):
        bx = torch.cat([b for b, _ in row])
        s = torch.cat([s for _, s in row])
        labels = torch.cat([torch.full((len(s_),), c) for c, (_, s_) in enumerate(row)])
        assert len(s) <= 1000  # the coordinate-offset branch (stable order); above it, ties come unordered
        keep = batched_nms(bx, s, labels, nms_threshold)[:max_det]
        out.append({"boxes": bx[keep], "scores": s[keep], "labels": labels[keep]})
    return out


@pytest.fixture(params=[None, *STRATEGIES])
def strategy(request, monkeypatch):
    """Every strategy, forced (None: the module's rule, on the CPU)."""
    if request.param is not None:
        monkeypatch.setattr(postprocess, "choose_strategy", lambda *args: request.param)
    return request.param


def assert_same(ours, reference):
    assert len(ours) == len(reference)
    for got, expected in zip(ours, reference):
        for key in ("boxes", "scores", "labels"):
            assert got[key].shape == expected[key].shape, key
            assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("classes,top_k,max_det", [(3, 50, 20), (20, 400, 200), (1, 30, 5)])
def test_batched_nms_keeps_what_per_image_nms_keeps(strategy, class_specific, classes, top_k, max_det):
    boxes, scores = random_case(4, 300, classes, class_specific, seed=classes)
    ours = multiclass_nms(boxes, scores, 0.05, 0.45, top_k, max_det)
    assert_same(ours, per_image_reference(boxes, scores, 0.05, 0.45, top_k, max_det))
    assert len(ours[-1]["boxes"]) == 0  # an image without candidates gives empty tensors of the right shape
    assert ours[-1]["boxes"].shape == (0, 4) and ours[-1]["labels"].dtype == torch.int64
    assert any(len(p["boxes"]) == max_det for p in ours[:-1])  # the cut was exercised


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_in_scores_and_boxes_keep_the_per_image_order(strategy, seed):
    boxes, scores = tied_case(3, 200, 4, seed)
    scores[1, :, 2] = 0.0  # one class of one image without candidates
    ours = multiclass_nms(boxes, scores, 0.05, 0.5, 60, 40)
    assert_same(ours, per_image_reference(boxes, scores, 0.05, 0.5, 60, 40, independent_top_k=False))
    # torchvision's per-image batched_nms (coordinate offsets, exact on this grid) keeps the same, in the same order
    assert_same(ours, per_image_batched_nms(boxes, scores, 0.05, 0.5, 60, 40))
    flat = torch.cat([p["scores"] for p in ours])
    assert len(flat) > len(flat.unique()) * 2  # the case really has ties among the kept
    assert all(len(p["scores"]) == 40 for p in ours)  # more kept than max_detections in every image


def test_nothing_above_the_threshold_anywhere(strategy):
    boxes, scores = random_case(3, 50, 5, False, seed=0)
    for out in multiclass_nms(boxes, scores * 0.0, 0.05, 0.45, 20, 10):
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)


def test_single_candidates_and_top_k_beyond_the_anchors(strategy):
    boxes, scores = random_case(5, 4, 3, True, seed=3)
    scores[:, 1:] = 0  # at most one candidate per group: the one-box shortcut
    ours = multiclass_nms(boxes, scores, 0.05, 0.45, 10, 100)
    assert_same(ours, per_image_reference(boxes, scores, 0.05, 0.45, 10, 100))


@pytest.mark.parametrize("seed", range(4))
def test_grouped_nms_every_strategy_equals_nms_per_group(seed, monkeypatch):
    """Random groups of random sizes (valid a prefix of each row, as top-k gives) with near-duplicate
    boxes, chunked across many small chunks in the tensorised path."""
    g = torch.Generator().manual_seed(seed)
    groups, k = 37, 64
    centre = torch.rand(groups, 1, 2, generator=g) * 100
    xy = centre + torch.randn(groups, k, 2, generator=g) * 8
    boxes = torch.cat([xy, xy + torch.rand(groups, k, 2, generator=g) * 30 + 1], -1)
    scores = torch.rand(groups, k, generator=g).sort(1, descending=True).values
    counts = torch.randint(0, k + 1, (groups,), generator=g)
    counts[:3] = torch.tensor([0, 1, k])
    valid = torch.arange(k) < counts[:, None]
    expected = torch.zeros_like(valid)
    for i in range(groups):
        n = int(counts[i])
        expected[i, nms(boxes[i, :n], scores[i, :n], 0.45)] = True
    monkeypatch.setitem(postprocess.TENSORISED_CHUNK, "cpu", 5 * k * k)  # 8 chunks of groups
    for name in STRATEGIES:
        assert torch.equal(grouped_nms(boxes, scores, valid, 0.45, name), expected), name
    with pytest.raises(ValueError, match="strategy"):
        grouped_nms(boxes, scores, valid, 0.45, "nope")


def test_tensorised_compares_the_iou_as_the_kernel_does():
    """IoUs that round onto the threshold: 3/5 is 0.6000000238 in float32, above 0.6 for the CPU kernel
    (it compares with the double) though not above float32(0.6); 1/2 is exactly 0.5, not above it."""
    boxes = torch.tensor([[[0.0, 0, 5, 1], [0, 0, 3, 1], [10, 0, 12, 1], [10, 0, 11, 1]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    for threshold in (0.6, 0.5, 0.45, 0.7):
        expected = torch.zeros(1, 4, dtype=torch.bool)
        expected[0, nms(boxes[0], scores[0], threshold)] = True
        assert torch.equal(grouped_nms(boxes, scores, valid, threshold, "tensorised"), expected), threshold
    assert postprocess._kernel_threshold(0.6, torch.device("cpu"), torch.float32) < 0.6
    assert postprocess._kernel_threshold(0.6, torch.device("cuda"), torch.float32) > 0.6  # the CUDA kernel's float
    assert postprocess._kernel_threshold(0.5, torch.device("cpu"), torch.float32) == 0.5


def test_the_rule():
    """CPU: one nms call per group at every size measured; a GPU: the tensorised path from 8 groups on
    (float boxes only), fewer groups one call each."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for candidates, groups in [(1, 1), (400, 3), (13_000, 96), (1_024_000, 2560)]:
        assert choose_strategy(candidates, groups, cpu, torch.float32) == "per_group"
    assert choose_strategy(3000, postprocess.TENSORISED_MIN_GROUPS, gpu, torch.float32) == "tensorised"
    assert choose_strategy(1_024_000, 2560, gpu, torch.float64) == "tensorised"
    assert choose_strategy(1200, postprocess.TENSORISED_MIN_GROUPS - 1, gpu, torch.float32) == "per_group"
    assert choose_strategy(1_024_000, 2560, gpu, torch.float16) == "per_group"


def test_multiclass_nms_asks_the_rule_with_the_candidates_and_groups(monkeypatch):
    seen = []
    real = postprocess.choose_strategy

    def spy(candidates, groups, device, dtype):
        seen.append((candidates, groups, device.type, dtype))
        return real(candidates, groups, device, dtype)

    monkeypatch.setattr(postprocess, "choose_strategy", spy)
    boxes, scores = random_case(4, 300, 3, False, seed=5)
    multiclass_nms(boxes, scores, 0.05, 0.45, 50, 20)
    top = scores.transpose(1, 2).topk(50, dim=2).values > 0.05
    assert seen == [(int(top.sum()), int((top.sum(-1) > 0).sum()), "cpu", torch.float32)]
    assert seen[0][1] == 9  # the last image has no candidate in any of its 3 classes


def test_a_chain_of_suppressions(monkeypatch):
    """Each box suppresses only its neighbour: greedy keeps every other one, which the fixed point
    reaches only after one step per link of the chain."""
    k = 50
    x = torch.arange(k, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(k), x + 10, torch.ones(k)], -1)[None]  # neighbours IoU 7/13, next 4/16
    scores = torch.linspace(1, 0.5, k)[None]
    valid = torch.ones(1, k, dtype=torch.bool)
    expected = torch.zeros(1, k, dtype=torch.bool)
    expected[0, nms(boxes[0], scores[0], 0.45)] = True
    assert torch.equal(expected[0], torch.arange(k) % 2 == 0)
    for name in STRATEGIES:
        assert torch.equal(grouped_nms(boxes, scores, valid, 0.45, name), expected), name


def test_exact_where_one_batched_nms_over_the_batch_rounds(strategy):
    """The old way, one batched_nms over every (image, class) group, shifts each group by (group x
    (largest coordinate + 1)) below 1000 boxes: at class 249 a y of 4.5001 becomes 2743.5, an IoU of
    0.45001 becomes 0.45 and the box survives. Per-class nms (and ours) suppress it in every class."""
    classes = 250
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 4.5001]]])
    scores = torch.tensor([0.9, 0.8]).view(1, 2, 1).expand(1, 2, classes).contiguous()
    ours = multiclass_nms(boxes, scores, 0.05, 0.45, 400, 1000)
    assert_same(ours, per_image_reference(boxes, scores, 0.05, 0.45, 400, 1000))
    assert len(ours[0]["scores"]) == classes  # one box per class
    group = torch.arange(classes).repeat_interleave(2)
    old = batched_nms(boxes[0].repeat(classes, 1), scores[0].t().flatten(), group, 0.45)
    assert len(old) > classes  # the one-call trick kept second boxes


@pytest.mark.parametrize("shape", [(0, 30, 3), (2, 0, 3), (2, 30, 0)])
def test_empty_batches_anchors_and_classes(strategy, shape):
    batch, anchors, classes = shape
    boxes, scores = torch.rand(batch, anchors, 4) * 10, torch.rand(batch, anchors, classes)
    boxes[..., 2:] += boxes[..., :2]
    out = multiclass_nms(boxes, scores, 0.05, 0.45, 20, 10)
    assert len(out) == batch
    for image in out:
        assert image["boxes"].shape == (0, 4) and image["scores"].shape == (0,) and image["labels"].shape == (0,)
