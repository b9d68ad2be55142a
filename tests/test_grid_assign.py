"""The grid assignment pieces of the YOLO heads against hand-worked cases and plain loops."""

import pytest
import torch

from detectors.assign import cells_of_centres, owner_of_slots, shape_iou


def test_cells_of_centres_hand_worked():
    # 416 px, 13 x 13 cells of 32 px: centres 16 (cell 0), 32 (an inner border: cell 1), 415.9, 416 (last)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 48.0, 64.0], [415.8, 400.0, 416.0, 416.0],
                           [400.0, 416.0, 432.0, 416.0]]])
    row, col = cells_of_centres(boxes, (13, 13), (416, 416))
    assert col.tolist() == [[0, 1, 12, 12]]
    assert row.tolist() == [[0, 1, 12, 12]]


def test_cells_of_centres_non_square():
    # (H, W) = (64, 128), grid (2, 4): 32 px cells both ways
    boxes = torch.tensor([[100.0, 40.0, 110.0, 50.0]])
    row, col = cells_of_centres(boxes, (2, 4), (64, 128))
    assert (row.item(), col.item()) == (1, 3)


@pytest.mark.parametrize("keep", ["first", "last"])
def test_owner_of_slots_against_a_loop(keep):
    g = torch.Generator().manual_seed(0)
    slot = torch.randint(0, 6, (5, 7), generator=g)
    valid = torch.rand(5, 7, generator=g) > 0.3
    valid[0] = False  # an image without ground truths
    owner = owner_of_slots(slot, valid, 6, keep)
    for b in range(5):
        expected = [-1] * 6
        for m in range(7):
            if valid[b, m] and (keep == "last" or expected[slot[b, m]] == -1):
                expected[slot[b, m]] = m
        assert owner[b].tolist() == expected


def test_owner_of_slots_empty_axis():
    owner = owner_of_slots(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool), 4)
    assert owner.tolist() == [[-1] * 4] * 2


def test_shape_iou_hand_worked():
    wh = torch.tensor([[10.0, 20.0]])
    anchors = torch.tensor([[10.0, 20.0], [20.0, 10.0], [5.0, 5.0]])
    # same shape: 1; transposed: inter 10*10=100, union 200+200-100=300; inside: 25 / 200
    assert torch.allclose(shape_iou(wh, anchors), torch.tensor([[1.0, 1 / 3, 25 / 200]]))
