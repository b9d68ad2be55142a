"""YOLOv2: the passthrough on a hand-built map, output shapes of the paper, a one-box loss worked by hand,
and the batched region loss against a plain per-image, per-box loop written from darknet's region layer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detectors.backbones.darknet import DarkNet19
from detectors.detector import Detector
from detectors.heads.yolov2 import VOC_ANCHORS_416, YOLOv2Head, YOLOv2Raw
from detectors.necks.passthrough import PassthroughNeck, space_to_depth
from test_model_matrix import assert_predictions_keep_the_contract


def test_space_to_depth_on_a_hand_built_4x4_map():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = space_to_depth(x, (2, 2))
    # channel 2 dy + dx holds the pixels (2 y + dy, 2 x + dx)
    assert out[0].tolist() == [[[0, 2], [8, 10]], [[1, 3], [9, 11]], [[4, 6], [12, 14]], [[5, 7], [13, 15]]]
    # two input channels: channel c's four come first, then channel c + 1's
    two = space_to_depth(torch.cat([x, x + 100], 1), (2, 2))
    assert two[0, 4:].equal(out[0] + 100)


def test_space_to_depth_pads_an_odd_map():
    x = torch.ones(1, 1, 3, 3)
    out = space_to_depth(x, (2, 2))
    # the padded row and column are zeros: pixel (1, 1) of the output sees only (2, 2) of the input
    assert out.shape == (1, 4, 2, 2) and out[0, :, 1, 1].tolist() == [1, 0, 0, 0]


def test_yolov2_voc_shapes_at_416():
    backbone = DarkNet19(out_strides=[16, 32])
    detector = Detector(backbone, PassthroughNeck, lambda in_channels, strides: YOLOv2Head(in_channels, 20))
    feats = backbone(torch.zeros(1, 3, 416, 416))
    assert [tuple(f.shape[1:]) for f in feats] == [(512, 26, 26), (1024, 13, 13)]
    assert detector.neck.reduce.conv.out_channels == 64
    assert detector.neck.fuse.conv.in_channels == 256 + 1024  # 26x26x64 -> 13x13x256, then the deep map
    assert detector.head.predictor.out_channels == 125  # 5 x (5 + 20)
    raw = detector(torch.zeros(1, 3, 416, 416))
    assert raw.output.shape == (1, 13, 13, 5, 25)


def make_head(num_classes=2, anchors=((32.0, 32.0),), input_size=(64, 64), **kwargs):
    return YOLOv2Head([8], num_classes, anchors=anchors, input_size=input_size, **kwargs).train()


def test_one_box_loss_worked_by_hand():
    """64x64 image, 2x2 grid of 32 px, one 32x32 anchor, 2 classes, all raw outputs 0 (offsets 0.5, sizes
    the anchor's, objectness and class probabilities 1/2). One GT of centre (20, 24), size 16 x 32: cell
    (0, 0), offset targets (0.625, 0.75), size targets (log 0.5, 0); scale 2 - (16/64)(32/64) = 1.875; the
    predicted box (0, 0, 32, 32) overlaps it with IoU 384 / 1152 = 1/3."""
    head = make_head(prior_warmup_images=0)
    raw = YOLOv2Raw(torch.zeros(1, 2, 2, 1, 7))
    targets = {"boxes": torch.tensor([[[12.0, 8.0, 28.0, 40.0]]]), "labels": torch.tensor([[1]]),
               "mask": torch.tensor([[True]]), "weights": torch.tensor([[1.0]])}
    losses = head.loss(raw, targets, (64, 64))
    scale = 1.875
    assert losses["loss_box"].item() == pytest.approx(0.5 * scale * ((0.125 ** 2 + 0.25 ** 2) + math.log(0.5) ** 2))
    # BCE at logit 0 is log 2 whatever the target; the other three cells' boxes overlap the GT by < 0.6
    assert losses["loss_obj"].item() == pytest.approx(5 * math.log(2))
    assert losses["loss_noobj"].item() == pytest.approx(3 * math.log(2))
    assert losses["loss_cls"].item() == pytest.approx(math.log(2))
    assert losses["num_positives"].item() == 1

    sse = make_head(prior_warmup_images=0, losses={"obj": "sse"}).loss(raw, targets, (64, 64))
    assert sse["loss_obj"].item() == pytest.approx(5 * 0.5 * (0.5 - 1 / 3) ** 2)
    assert sse["loss_noobj"].item() == pytest.approx(3 * 0.5 * 0.25)

    # half the weight (mixup) halves every term of the box; the no-object terms are no box's
    half = make_head(prior_warmup_images=0).loss(raw, {**targets, "weights": torch.tensor([[0.5]])}, (64, 64))
    for key in ("loss_box", "loss_obj", "loss_cls"):
        assert half[key].item() == pytest.approx(losses[key].item() / 2)
    assert half["loss_noobj"].item() == pytest.approx(losses["loss_noobj"].item())


def test_prior_term_only_for_the_first_images():
    head = make_head(prior_warmup_images=4)
    raw = YOLOv2Raw(torch.zeros(2, 2, 2, 1, 7))
    raw.output[..., :2] = 2.0  # offsets sigmoid(2), sizes exp(1): away from the anchor's box
    raw.output[..., 2:4] = 1.0
    empty = {"boxes": torch.zeros(2, 0, 4), "labels": torch.zeros(2, 0, dtype=torch.long),
             "mask": torch.zeros(2, 0, dtype=torch.bool), "weights": torch.zeros(2, 0)}
    per_slot = 0.5 * 0.01 * (2 * (torch.sigmoid(torch.tensor(2.0)).item() - 0.5) ** 2 + 2 * 1.0)
    assert head.loss(raw, empty, (64, 64))["loss_box"].item() == pytest.approx(4 * per_slot)  # 8 slots / 2 images
    assert head.images_seen.item() == 2
    head.loss(raw, empty, (64, 64))
    assert head.loss(raw, empty, (64, 64))["loss_box"].item() == 0  # 4 images seen: the term is over
    head.eval()
    assert head.loss(raw, empty, (64, 64))["loss_box"].item() == 0 and head.images_seen.item() == 6


def reference_region_loss(head: YOLOv2Head, out: torch.Tensor, targets: dict, image_size, images_seen: int) -> dict:
    """darknet's forward_region_layer as plain loops, one image and one box at a time (float64)."""
    out = out.double()
    batch, grid_h, grid_w, num_anchors, _ = out.shape
    height, width = image_size
    stride_y, stride_x = height / grid_h, width / grid_w
    anchors = (head.anchors.double() * torch.tensor([width / head.input_size[1], height / head.input_size[0]])).tolist()
    terms = dict.fromkeys(["loss_box", "loss_obj", "loss_noobj", "loss_cls"], 0.0)

    def pred_box(b, i, j, a):
        t = out[b, i, j, a]
        cx, cy = (j + torch.sigmoid(t[0])) * stride_x, (i + torch.sigmoid(t[1])) * stride_y
        w, h = anchors[a][0] * torch.exp(t[2]), anchors[a][1] * torch.exp(t[3])
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    def objectness_loss(logit, target):
        if head.losses.obj == "bce":
            return F.binary_cross_entropy_with_logits(logit, torch.tensor(target, dtype=torch.float64)).item()
        return 0.5 * (torch.sigmoid(logit).item() - target) ** 2

    for b in range(batch):
        gts = [m for m in range(targets["mask"].shape[1]) if targets["mask"][b, m]]
        difficult = targets.get("difficult")
        responsible = {}
        for m in gts:  # later truths overwrite earlier ones, as darknet's loop
            if difficult is not None and difficult[b, m]:
                continue
            x1, y1, x2, y2 = targets["boxes"][b, m].double().tolist()
            j = min(max(int(math.floor((x1 + x2) / 2 / stride_x)), 0), grid_w - 1)
            i = min(max(int(math.floor((y1 + y2) / 2 / stride_y)), 0), grid_h - 1)
            best, best_a = -1.0, 0
            for a, (aw, ah) in enumerate(anchors):
                inter = min(x2 - x1, aw) * min(y2 - y1, ah)
                iou = inter / ((x2 - x1) * (y2 - y1) + aw * ah - inter)
                if iou > best:
                    best, best_a = iou, a
            responsible[(i, j, best_a)] = m
        for i in range(grid_h):
            for j in range(grid_w):
                for a in range(num_anchors):
                    t = out[b, i, j, a]
                    box = pred_box(b, i, j, a)
                    if (i, j, a) not in responsible:
                        best = max([box_iou(box[None], targets["boxes"][b, m].double()[None]).item() for m in gts],
                                   default=0.0)
                        if best <= head.ignore_threshold:
                            terms["loss_noobj"] += head.noobject_scale * objectness_loss(t[4], 0.0)
                        if images_seen < head.prior_warmup_images:
                            err = (torch.sigmoid(t[:2]) - 0.5).pow(2).sum() + t[2:4].pow(2).sum()
                            terms["loss_box"] += 0.5 * head.prior_scale * err.item()
                        continue
                    m = responsible[(i, j, a)]
                    weight = targets["weights"][b, m].item()
                    x1, y1, x2, y2 = targets["boxes"][b, m].double().tolist()
                    tx, ty = (x1 + x2) / 2 / stride_x - j, (y1 + y2) / 2 / stride_y - i
                    tw, th = math.log((x2 - x1) / anchors[a][0]), math.log((y2 - y1) / anchors[a][1])
                    scale = 2 - (x2 - x1) / width * (y2 - y1) / height
                    err = ((torch.sigmoid(t[0]) - tx) ** 2 + (torch.sigmoid(t[1]) - ty) ** 2
                           + (t[2] - tw) ** 2 + (t[3] - th) ** 2).item()
                    terms["loss_box"] += weight * 0.5 * head.coord_scale * scale * err
                    iou = box_iou(box[None], targets["boxes"][b, m].double()[None]).item()
                    terms["loss_obj"] += weight * head.object_scale * objectness_loss(t[4], iou)
                    ce = F.cross_entropy(t[5:][None], targets["labels"][b, m][None]).item()
                    terms["loss_cls"] += weight * head.class_scale * ce
    return {k: v / batch for k, v in terms.items()}


def random_targets(g, batch, max_gt, image_size, grid, num_classes):
    """Padded targets with an image without objects, two ground truths in one cell, a centre on a cell
    border, a difficult object and mixup-like weights."""
    height, width = image_size
    counts = torch.randint(1, max_gt + 1, (batch,), generator=g)
    counts[0] = 0
    m = int(counts.max())
    boxes = torch.zeros(batch, m, 4)
    mask = torch.zeros(batch, m, dtype=torch.bool)
    for b in range(batch):
        n = int(counts[b])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.5 + 4
        centre = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
        boxes[b, :n] = torch.cat([centre - wh / 2, centre + wh / 2], 1)
        mask[b, :n] = True
    cell = height / grid[0]
    if counts[1] >= 2:  # two ground truths with centres in one cell (different shapes)
        boxes[1, 1] = boxes[1, 0] + torch.tensor([1.0, 1.0, 1.0, 1.0]) * 0.01
        boxes[1, 1, 2:] = boxes[1, 1, :2] + (boxes[1, 0, 2:] - boxes[1, 0, :2]) * 1.5
        boxes[1, 1] += (boxes[1, 0, :2] + boxes[1, 0, 2:]).repeat(2) / 2 - (boxes[1, 1, :2] + boxes[1, 1, 2:]).repeat(2) / 2
    if counts[2] >= 1:  # a centre exactly on an inner cell border
        boxes[2, 0] = torch.tensor([cell - 10, cell - 6, cell + 10, cell + 6])
    difficult = torch.zeros(batch, m, dtype=torch.bool)
    if counts[3] >= 2:
        difficult[3, 1] = True
    return {"boxes": boxes, "labels": torch.randint(0, num_classes, (batch, m), generator=g), "mask": mask,
            "weights": torch.rand(batch, m, generator=g) * mask, "difficult": difficult}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("objectness_loss", ["bce", "sse"])
def test_batched_region_loss_equals_the_per_image_loop(seed, objectness_loss):
    g = torch.Generator().manual_seed(seed)
    image_size, grid = (96, 128), (3, 4)
    anchors = ((20.0, 30.0), (50.0, 40.0), (90.0, 80.0))
    head = YOLOv2Head([8], 3, anchors=anchors, input_size=(64, 96), losses={"obj": objectness_loss},
                      ignore_threshold=0.3).train()  # anchors given at 64x96, scaled to 96x128
    targets = random_targets(g, 5, 6, image_size, grid, 3)
    out = torch.randn(5, *grid, 3, 8, generator=g)
    images_seen = int(torch.randint(0, 2, (1,), generator=g)) * 12800  # with the prior term, or after it
    head.images_seen.fill_(images_seen)
    expected = reference_region_loss(head, out, targets, image_size, images_seen)
    losses = head.loss(YOLOv2Raw(out), targets, image_size)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # the two ground truths of one cell: the later one keeps the slot when their best anchors agree
    assert losses["num_positives"].item() <= int(targets["mask"].sum()) - int(targets["difficult"].sum())


def test_predict_contract():
    torch.manual_seed(0)
    head = YOLOv2Head([8], 3, anchors=VOC_ANCHORS_416[:2], input_size=(416, 416), score_threshold=0.0).eval()
    raw = YOLOv2Raw(torch.randn(2, 5, 7, 2, 8) * 3)
    preds = head.predict(raw, (160, 224))
    assert_predictions_keep_the_contract(preds, 2, (160, 224), head.max_detections)  # 3 classes, as the matrix's
    # score = objectness x class probability: the best score of the batch is that product at some slot
    out = raw.output
    products = out[..., 4:5].sigmoid() * out[..., 5:].softmax(-1)
    assert max(p["scores"].max() for p in preds).item() == pytest.approx(products.max().item())


def test_anchors_scale_with_the_input():
    head = make_head(anchors=((40.0, 20.0),), input_size=(100, 200))
    assert head.anchors_for((200, 100), torch.device("cpu")).tolist() == [[20.0, 40.0]]
