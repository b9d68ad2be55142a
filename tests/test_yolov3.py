"""YOLOv3: the paper's shapes and darknet's layer widths, the slot layout over three grids, a one-box loss
worked by hand, and the batched yolo-layer loss against a plain per-image, per-box loop written from
darknet's yolo layer (forward_yolo_layer, delta_yolo_box, delta_yolo_class)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_yolov2 import random_targets
from torchvision.ops import box_iou

from detectors.anchors import YOLOAnchors
from detectors.backbones.darknet import DarkNet53
from detectors.boxes import GridCoder
from detectors.detector import Detector
from detectors.heads.yolov3 import COCO_ANCHORS_416, YOLOv3Head, YOLOv3Raw
from detectors.necks.yolov3_fpn import YOLOv3FPN
from test_model_matrix import assert_predictions_keep_the_contract


def test_yolov3_coco_shapes_at_416_and_darknet_parameter_count():
    detector = Detector(DarkNet53(out_strides=[8, 16, 32]), YOLOv3FPN,
                        lambda in_channels, strides: YOLOv3Head(in_channels, 80))
    with torch.no_grad():
        feats = detector.neck(detector.backbone(torch.zeros(1, 3, 416, 416)))
        raw = detector.head(feats)
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 52, 52), (512, 26, 26), (1024, 13, 13)]
    maps = [tuple(p(f).shape[1:]) for p, f in zip(detector.head.predictors, feats)]
    assert maps == [(255, 52, 52), (255, 26, 26), (255, 13, 13)]  # 3 x (5 + 80)
    assert raw.output.shape == (1, 3 * (52 ** 2 + 26 ** 2 + 13 ** 2), 85) and raw.shapes == ((52, 52), (26, 26), (13, 13))
    assert detector.neck.strides == (8, 16, 32)
    # darknet's yolov3.weights holds 62 001 757 floats after its 20-byte header (248 007 048 bytes): every
    # parameter plus the BN running means and variances, so the network is layer for layer yolov3.cfg's
    params = sum(p.numel() for p in detector.parameters())
    running = sum(2 * m.num_features for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (params, params + running) == (61_949_149, (248_007_048 - 20) // 4)


def conv_specs(module):
    return [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in module.modules() if isinstance(c, torch.nn.Conv2d)]


def test_neck_widths_are_yolov3_cfg():
    neck = YOLOv3FPN([256, 512, 1024], [8, 16, 32])
    # yolov3.cfg layers 75-80 (stride 32), 84 (route -4 then 1x1), 87-92 after [route -1, 61], 96, 99-104
    assert conv_specs(neck.blocks[0]) == [(1024, 512, 1), (512, 1024, 3), (1024, 512, 1), (512, 1024, 3), (1024, 512, 1)]
    assert conv_specs(neck.blocks[1]) == [(768, 256, 1), (256, 512, 3), (512, 256, 1), (256, 512, 3), (512, 256, 1)]
    assert conv_specs(neck.blocks[2]) == [(384, 128, 1), (128, 256, 3), (256, 128, 1), (128, 256, 3), (256, 128, 1)]
    assert [conv_specs(b) for b in neck.branches] == [[(512, 1024, 3)], [(256, 512, 3)], [(128, 256, 3)]]
    assert [conv_specs(lat) for lat in neck.laterals] == [[(512, 256, 1)], [(256, 128, 1)]]
    assert neck.out_channels == (256, 512, 1024)
    # another backbone's widths (MobileNetV2: 32, 96, 1280) and a narrow neck: built from what it is given
    narrow = YOLOv3FPN([32, 96, 1280], [8, 16, 32], channels=64)
    assert [conv_specs(b)[0] for b in narrow.blocks] == [(1280, 64, 1), (96 + 32, 32, 1), (32 + 16, 16, 1)]
    assert narrow.out_channels == (32, 64, 128)


def test_neck_concatenates_the_upsampled_map_first_and_takes_odd_maps():
    neck = YOLOv3FPN([4, 6, 8], [8, 16, 32], channels=16).eval()
    seen = []
    neck.blocks[1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    feats = [torch.randn(1, 4, 13, 11), torch.randn(1, 6, 7, 6), torch.randn(1, 8, 4, 3)]  # sides rounded up
    with torch.no_grad():
        outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(1, 8, 13, 11), (1, 16, 7, 6), (1, 32, 4, 3)]
    # darknet's [route] layers = -1, 61: the upsampled 1x1 output (8 channels), then the backbone's map
    assert seen[0].shape == (1, 8 + 6, 7, 6) and torch.equal(seen[0][:, 8:], feats[1])
    # nearest 2x: each coarse pixel covers 2 x 2 finer ones
    up = seen[0][0, :8]
    assert torch.equal(up[:, 0, 0], up[:, 1, 1]) and torch.equal(up[:, 2, 2], up[:, 3, 3])


def test_neck_refuses_strides_that_do_not_double():
    with pytest.raises(ValueError, match="out_strides"):
        YOLOv3FPN([256, 1024], [8, 32])


def test_anchor_grid_slot_order_and_decode_match_each_level():
    anchors = YOLOAnchors([[4, 6], [8, 8], [20, 10], [30, 40]], (64, 96), num_levels=2)
    grid = anchors.grid([(4, 6), (2, 3)], (128, 96), "cpu")  # image (H, W) = (128, 96): anchors scale (1, 2)
    assert grid.starts == (0, 48, 60) and grid.num_slots == 60
    # slot (level 1, row 1, col 2, anchor 1): 48 + (1 * 3 + 2) * 2 + 1
    assert grid.cells[59].tolist() == [2, 1] and grid.strides[59].tolist() == [32, 64]
    assert grid.anchors[59].tolist() == [30, 80] and grid.anchors[1].tolist() == [8, 16]
    with pytest.raises(ValueError, match="equal groups"):
        YOLOAnchors(COCO_ANCHORS_416, (416, 416), num_levels=2)
    # flattened decoding = the paper's decoding on each level's (B, h, w, A, 4) map, level by level
    coder, g = GridCoder(), torch.Generator().manual_seed(0)
    levels = [torch.rand(2, 4, 6, 2, 4, generator=g), torch.rand(2, 2, 3, 2, 4, generator=g)]
    flat = torch.cat([lv.reshape(2, -1, 4) for lv in levels], 1)
    decoded = coder.decode(flat[..., :2], flat[..., 2:], grid.cells, grid.strides, grid.anchors)
    scaled = anchors.scaled((128, 96), "cpu")

    def decode_level(t, level_anchors):  # t (B, h, w, A, 4) = sigmoid offsets, t_w, t_h
        h, w = t.shape[1:3]
        cx = (torch.arange(w).view(1, 1, w, 1) + t[..., 0]) * (96 / w)
        cy = (torch.arange(h).view(1, h, 1, 1) + t[..., 1]) * (128 / h)
        bw, bh = level_anchors[:, 0] * t[..., 2].exp(), level_anchors[:, 1] * t[..., 3].exp()
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).reshape(2, -1, 4)

    expected = [decode_level(lv, scaled[2 * i:2 * i + 2]) for i, lv in enumerate(levels)]
    assert torch.allclose(decoded, torch.cat(expected, 1))
    offsets, log_wh = coder.encode(decoded, grid.cells, grid.strides, grid.anchors)
    assert torch.allclose(offsets, flat[..., :2], atol=1e-5) and torch.allclose(log_wh, flat[..., 2:], atol=1e-5)


def make_head(**kwargs):
    """Two levels on a 64 x 64 image: 4 x 4 cells of 16 px with an 8 x 8 anchor, 2 x 2 of 32 px with 32 x 32."""
    return YOLOv3Head([4, 4], 2, anchors=((8.0, 8.0), (32.0, 32.0)), input_size=(64, 64), **kwargs).train()


def zero_raw(batch=1):
    return YOLOv3Raw(torch.zeros(batch, 16 + 4, 7), ((4, 4), (2, 2)))


def test_one_box_loss_worked_by_hand():
    """All raw outputs 0 (offsets 0.5, sizes the anchors', objectness and class probabilities 1/2). One GT of
    centre (20, 24), size 16 x 32, class 1: shape IoU 64 / 512 with the 8 x 8 anchor, 512 / 1024 with the
    32 x 32 one, so level 1, cell (0, 0): slot 16; offset targets (0.625, 0.75), size targets (log 0.5, 0);
    scale 2 - (16/64)(32/64) = 1.875. BCE at logit 0 is log 2 whatever the target."""
    targets = {"boxes": torch.tensor([[[12.0, 8.0, 28.0, 40.0]]]), "labels": torch.tensor([[1]]),
               "mask": torch.tensor([[True]]), "weights": torch.tensor([[1.0]])}
    losses = make_head().loss(zero_raw(), targets, (64, 64))
    scale, log2 = 1.875, math.log(2)
    assert losses["loss_box"].item() == pytest.approx(scale * (2 * log2 + 0.5 * math.log(0.5) ** 2))
    assert losses["loss_obj"].item() == pytest.approx(log2)
    # the other 19 slots' boxes overlap the GT by at most 0.125 (level 0, cell (1, 1)): none ignored at 0.5
    assert losses["loss_noobj"].item() == pytest.approx(19 * log2)
    assert losses["loss_cls"].item() == pytest.approx(2 * log2)  # both classes' logistic classifiers
    assert losses["num_positives"].item() == 1
    assert losses["loss"].item() == pytest.approx(sum(losses[k].item() for k in ("loss_box", "loss_obj",
                                                                                  "loss_noobj", "loss_cls")))

    sse = make_head(xy_bce=False).loss(zero_raw(), targets, (64, 64))
    assert sse["loss_box"].item() == pytest.approx(scale * 0.5 * (0.125 ** 2 + 0.25 ** 2 + math.log(0.5) ** 2))

    # at 0.05, the 8 x 8 boxes of level 0 at (row, col) (0, 1), (2, 1) (IoU 32 / 544), (1, 1) (64 / 512) and
    # level 1's (1, 0) (128 / 1408) are ignored: 15 no-object slots remain
    ignored = make_head(ignore_threshold=0.05).loss(zero_raw(), targets, (64, 64))
    assert ignored["loss_noobj"].item() == pytest.approx(15 * log2)

    # half the weight (mixup) halves every term of the box; the no-object terms are no box's
    half = make_head().loss(zero_raw(), {**targets, "weights": torch.tensor([[0.5]])}, (64, 64))
    for key in ("loss_box", "loss_obj", "loss_cls"):
        assert half[key].item() == pytest.approx(losses[key].item() / 2)
    assert half["loss_noobj"].item() == pytest.approx(losses["loss_noobj"].item())

    # a 6 x 10 box goes to the 8 x 8 anchor, on the finer level: cell (row 1, col 1) of 16 px
    small = {**targets, "boxes": torch.tensor([[[21.0, 19.0, 27.0, 29.0]]])}
    head = make_head()
    t = head.assign(zero_raw(), head.decode(zero_raw(), (64, 64)), small, (64, 64))
    assert t.positive[0].nonzero().flatten().tolist() == [1 * 4 + 1]


def reference_yolo_loss(head: YOLOv3Head, levels: list, targets: dict, image_size) -> dict:
    """darknet's forward_yolo_layer as plain loops over images, boxes and slots (float64), every level at
    once: each truth's best anchor among all (a strictly better IoU replaces, so the first of equals
    wins), on its own level; objectness 1 at responsible slots, 0 where no truth overlaps by more than
    the ignore threshold; BCE per class; the box term scaled by 2 - w h, times the box's weight."""
    height, width = image_size
    per_level = head.num_anchors
    anchors = (head.anchors.double() * torch.tensor([width / 64, height / 96])).tolist()  # given at (96, 64)
    terms = dict.fromkeys(["loss_box", "loss_obj", "loss_noobj", "loss_cls"], 0.0)
    batch = levels[0].shape[0]

    def bce(logit, target):
        return F.binary_cross_entropy_with_logits(logit, torch.tensor(float(target), dtype=torch.float64)).item()

    def xy_term(logit, target):
        if head.xy_bce:  # darknet's delta scale (t - sigmoid(x)) taken as the logit's gradient
            return bce(logit, target)
        return 0.5 * (torch.sigmoid(logit).item() - target) ** 2

    for b in range(batch):
        gts = [m for m in range(targets["mask"].shape[1]) if targets["mask"][b, m]]
        responsible = {}
        for m in gts:  # later truths overwrite earlier ones, as darknet's loop
            if targets["difficult"][b, m]:
                continue
            x1, y1, x2, y2 = targets["boxes"][b, m].double().tolist()
            best, best_n = -1.0, 0
            for n, (aw, ah) in enumerate(anchors):
                inter = min(x2 - x1, aw) * min(y2 - y1, ah)
                iou = inter / ((x2 - x1) * (y2 - y1) + aw * ah - inter)
                if iou > best:
                    best, best_n = iou, n
            level = best_n // per_level
            grid_h, grid_w = levels[level].shape[1:3]
            j = min(max(int(math.floor((x1 + x2) / 2 / (width / grid_w))), 0), grid_w - 1)
            i = min(max(int(math.floor((y1 + y2) / 2 / (height / grid_h))), 0), grid_h - 1)
            responsible[(level, i, j, best_n % per_level)] = m
        for level, out in enumerate(levels):
            out = out.double()
            grid_h, grid_w = out.shape[1:3]
            stride_x, stride_y = width / grid_w, height / grid_h
            for i in range(grid_h):
                for j in range(grid_w):
                    for a in range(per_level):
                        t = out[b, i, j, a]
                        aw, ah = anchors[level * per_level + a]
                        cx, cy = (j + torch.sigmoid(t[0])) * stride_x, (i + torch.sigmoid(t[1])) * stride_y
                        w, h = aw * torch.exp(t[2]), ah * torch.exp(t[3])
                        box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                        if (level, i, j, a) not in responsible:
                            best = max([box_iou(box[None], targets["boxes"][b, m].double()[None]).item()
                                        for m in gts], default=0.0)
                            if best <= head.ignore_threshold:
                                terms["loss_noobj"] += bce(t[4], 0.0)
                            continue
                        m = responsible[(level, i, j, a)]
                        weight = targets["weights"][b, m].item()
                        x1, y1, x2, y2 = targets["boxes"][b, m].double().tolist()
                        tx, ty = (x1 + x2) / 2 / stride_x - j, (y1 + y2) / 2 / stride_y - i
                        tw, th = math.log((x2 - x1) / aw), math.log((y2 - y1) / ah)
                        scale = 2 - (x2 - x1) / width * (y2 - y1) / height
                        coord = xy_term(t[0], tx) + xy_term(t[1], ty) + 0.5 * ((t[2] - tw) ** 2 + (t[3] - th) ** 2).item()
                        terms["loss_box"] += weight * scale * coord
                        terms["loss_obj"] += weight * bce(t[4], 1.0)
                        label = int(targets["labels"][b, m])
                        terms["loss_cls"] += weight * sum(bce(t[5 + c], c == label) for c in range(len(t) - 5))
    return {k: v / batch for k, v in terms.items()}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("xy_bce", [True, False])
def test_batched_yolo_loss_equals_the_per_image_loop(seed, xy_bce):
    g = torch.Generator().manual_seed(seed)
    image_size, shapes = (96, 128), [(6, 8), (3, 4), (2, 2)]
    # two anchors a level, given at 96 x 64 and scaled to 96 x 128, spread so boxes of 4..68 px reach every level
    anchors = ((6.0, 10.0), (10.0, 6.0), (14.0, 20.0), (20.0, 14.0), (30.0, 40.0), (40.0, 30.0))
    head = YOLOv3Head([8, 8, 8], 3, anchors=anchors, input_size=(96, 64), xy_bce=xy_bce,
                      ignore_threshold=0.3).train()
    # an image without objects, a centre on a cell border, a difficult object, mixup-like weights ...
    targets = random_targets(g, 5, 6, image_size, (3, 4), 3)
    if targets["mask"][4].sum() >= 2:  # ... and two truths claiming one slot: the same box, another class
        targets["boxes"][4, 1] = targets["boxes"][4, 0]
        targets["labels"][4, 1] = (targets["labels"][4, 0] + 1) % 3
    levels = [torch.randn(5, h, w, 2, 8, generator=g) for h, w in shapes]
    raw = YOLOv3Raw(torch.cat([lv.reshape(5, -1, 8) for lv in levels], 1), tuple(shapes))
    expected = reference_yolo_loss(head, levels, targets, image_size)
    losses = head.loss(raw, targets, image_size)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if targets["mask"][4].sum() >= 2:  # the duplicate's slot is counted once
        assert 0 < losses["num_positives"].item() < int((targets["mask"] & ~targets["difficult"]).sum())


def test_predict_contract():
    torch.manual_seed(0)
    head = YOLOv3Head([8, 8], 3, anchors=COCO_ANCHORS_416[:4], input_size=(416, 416), score_threshold=0.0).eval()
    shapes = ((10, 14), (5, 7))
    raw = YOLOv3Raw(torch.randn(2, (140 + 35) * 2, 8) * 3, shapes)
    preds = head.predict(raw, (160, 224))
    assert_predictions_keep_the_contract(preds, 2, (160, 224), head.max_detections)  # 3 classes, as the matrix's
    # score = objectness x class probability, both logistic: the best score is that product at some slot
    out = raw.output
    products = out[..., 4:5].sigmoid() * out[..., 5:].sigmoid()
    assert max(p["scores"].max() for p in preds).item() == pytest.approx(products.max().item())
    # the forward's layout: a level's (anchor, 5 + C) channels become slots (row, col, anchor)
    feats = [torch.randn(1, 8, *s) for s in shapes]
    raw = head(feats)
    conv = head.predictors[1](feats[1]).view(2, 8, 5, 7)
    assert torch.equal(raw.output[0, 140 * 2 + (3 * 7 + 4) * 2 + 1], conv[1, :, 3, 4])
