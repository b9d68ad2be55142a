"""Batched SSD matching against a plain per-image, per-GT loop written from the paper."""

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from detectors.assign import gather_gt, match_priors


def reference_match(priors_cxcywh, gts, threshold):
    """One image, plain loops: (gt_index list, positive list). Follows ssd.pytorch's match():
    each GT claims its best prior (first on ties; a later GT overrides an earlier one), then
    each prior takes its best GT (first on ties) if IoU >= threshold."""
    num_priors = priors_cxcywh.shape[0]
    if len(gts) == 0:
        return [0] * num_priors, [False] * num_priors
    iou = box_iou(gts, box_convert(priors_cxcywh, "cxcywh", "xyxy")).tolist()  # (M, A)
    gt_index, positive = [], []
    for a in range(num_priors):
        best, best_j = -1.0, 0
        for j in range(len(gts)):
            if iou[j][a] > best:
                best, best_j = iou[j][a], j
        gt_index.append(best_j)
        positive.append(best >= threshold)
    for j in range(len(gts)):
        best, best_a = -1.0, 0
        for a in range(num_priors):
            if iou[j][a] > best:
                best, best_a = iou[j][a], a
        gt_index[best_a] = j
        positive[best_a] = True
    return gt_index, positive


def make_case(seed, batch=4, max_gt=6, grid=True):
    g = torch.Generator().manual_seed(seed)
    # priors on a coarse grid so exact IoU ties between priors and between GTs happen
    cx, cy = torch.meshgrid(torch.arange(10, 100, 20.0), torch.arange(10, 100, 20.0), indexing="ij")
    sizes = torch.tensor([[20.0, 20.0], [40.0, 20.0], [20.0, 40.0]])
    priors = torch.cat([torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, 3, 2),
                        sizes.expand(cx.numel(), 3, 2)], -1).reshape(-1, 4)
    counts = torch.randint(0, max_gt + 1, (batch,), generator=g)
    counts[0] = 0  # an image without objects
    m = int(counts.max())
    boxes = torch.zeros(batch, max(m, 1), 4)
    mask = torch.zeros(batch, max(m, 1), dtype=torch.bool)
    for b in range(batch):
        n = int(counts[b])
        if grid:
            xy = torch.randint(0, 8, (n, 2), generator=g).float() * 10
            wh = torch.randint(1, 5, (n, 2), generator=g).float() * 10
        else:
            xy = torch.rand(n, 2, generator=g) * 80
            wh = torch.rand(n, 2, generator=g) * 40 + 2
        boxes[b, :n] = torch.cat([xy, xy + wh], 1)
        if n >= 2 and b == 1:
            boxes[b, 1] = boxes[b, 0]  # duplicate GTs: both want the same prior
        mask[b, :n] = True
    return priors, boxes, mask


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("grid", [True, False])
def test_batched_matching_equals_reference(seed, grid):
    priors, boxes, mask = make_case(seed, grid=grid)
    match = match_priors(priors, boxes, mask, 0.5)
    for b in range(boxes.shape[0]):
        gt_index, positive = reference_match(priors, boxes[b][mask[b]], 0.5)
        assert match.positive[b].tolist() == positive
        pos = match.positive[b]
        assert match.gt_index[b][pos].tolist() == torch.tensor(gt_index)[pos].tolist()


def test_every_gt_gets_a_prior_even_below_threshold():
    priors = torch.tensor([[50.0, 50.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0]])
    boxes = torch.tensor([[[0.0, 0.0, 100.0, 100.0]]])  # IoU 0.04 with its best prior
    match = match_priors(priors, boxes, torch.ones(1, 1, dtype=torch.bool), 0.5)
    assert match.positive.tolist() == [[True, False]]
    assert match.iou[0, 0].item() == pytest.approx(0.04)


def test_images_without_objects_have_no_positives():
    priors = torch.tensor([[50.0, 50.0, 20.0, 20.0]])
    match = match_priors(priors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert not match.positive.any()
    match = match_priors(priors, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert not match.positive.any()


def test_gather_gt_picks_per_prior_values():
    values = torch.tensor([[10, 20, 30]])
    index = torch.tensor([[2, 0, 1, 1]])
    assert gather_gt(values, index).tolist() == [[30, 10, 20, 20]]
    boxes = torch.arange(12.0).view(1, 3, 4)
    assert gather_gt(boxes, index)[0, 0].tolist() == [8.0, 9.0, 10.0, 11.0]
