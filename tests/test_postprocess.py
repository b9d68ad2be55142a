"""The shared decode -> top-k -> batched NMS -> per-image cut against a plain per-image, per-class
loop over torchvision.ops.nms."""

import pytest
import torch
from torchvision.ops import nms

from detectors.postprocess import multiclass_nms


def random_case(batch, anchors, classes, class_specific, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, anchors, classes, 2) if class_specific else (batch, anchors, 2)
    xy = torch.rand(shape, generator=g) * 200
    wh = torch.rand(shape, generator=g) * 60 + 4
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(batch, anchors, classes, generator=g) ** 3  # many low scores, as a real head gives
    scores[-1] = scores[-1] * 0.01  # the last image has nothing above the threshold
    return boxes, scores


def per_image_reference(boxes, scores, score_threshold, nms_threshold, top_k, max_det):
    out = []
    for b in range(scores.shape[0]):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for c in range(scores.shape[2]):
            s = scores[b, :, c]
            bx = boxes[b, :, c] if boxes.dim() == 4 else boxes[b]
            top = s.topk(min(top_k, len(s))).indices
            top = top[s[top] > score_threshold]
            keep = top[nms(bx[top], s[top], nms_threshold)]
            kept_boxes.append(bx[keep])
            kept_scores.append(s[keep])
            kept_labels.append(torch.full((len(keep),), c))
        s = torch.cat(kept_scores)
        order = s.argsort(descending=True)[:max_det]
        out.append({"boxes": torch.cat(kept_boxes)[order], "scores": s[order], "labels": torch.cat(kept_labels)[order]})
    return out


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("classes,top_k,max_det", [(3, 50, 20), (20, 400, 200), (1, 30, 5)])
def test_batched_nms_keeps_what_per_image_nms_keeps(class_specific, classes, top_k, max_det):
    boxes, scores = random_case(4, 300, classes, class_specific, seed=classes)
    ours = multiclass_nms(boxes, scores, 0.05, 0.45, top_k, max_det)
    reference = per_image_reference(boxes, scores, 0.05, 0.45, top_k, max_det)
    assert len(ours) == 4
    for got, expected in zip(ours, reference):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], expected[key], msg=key)
    assert len(ours[-1]["boxes"]) == 0  # an image without candidates gives empty tensors of the right shape
    assert ours[-1]["boxes"].shape == (0, 4)
    assert any(len(p["boxes"]) == max_det for p in ours[:-1])  # the cut was exercised
