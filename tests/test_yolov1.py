"""The YOLOv1 head: its shapes, its loss by hand and against a per-image, per-GT loop written from the
paper, its decoding, the fixed input size, and train.py / evaluate.py runs of model=yolov1."""

import math
from functools import partial

import pytest
import torch

from detectors.backbones.darknet import DarkNet19
from detectors.detector import Detector
from detectors.heads.yolov1 import YOLOv1Head, YOLOv1Raw
from detectors.module import DetectionModule
from detectors.necks.identity import IdentityNeck
from tests.test_train_e2e import (assert_evaluation_repeats_the_last_validation,
                                  assert_fast_dev_run_trained_and_validated, read_metrics, run, run_dir,
                                  textured_shapes)


def small_head(num_classes=2, input_size=(128, 128), **kwargs) -> YOLOv1Head:
    return YOLOv1Head(in_channels=(8,), num_classes=num_classes, input_size=input_size, strides=(32,), channels=8,
                      fc_width=8, **kwargs)


def test_paper_size_gives_7x7x30_for_20_classes_at_448():
    # the paper's head (1024-channel convs, FC 4096: 205M weights) on the meta device: shapes only
    with torch.device("meta"):
        head = YOLOv1Head(in_channels=(1024,), num_classes=20, input_size=(448, 448), strides=(32,))
        raw = head([torch.empty(2, 1024, 14, 14)])
    assert head.grid == (7, 7)
    assert raw.output.shape == (2, 7, 7, 30)
    assert raw.boxes.shape == (2, 7, 7, 2, 4) and raw.confidence.shape == (2, 7, 7, 2)
    assert raw.class_probs.shape == (2, 7, 7, 20)
    assert head.fc[0].in_features == 1024 * 7 * 7 and head.fc[0].out_features == 4096


def test_grid_follows_the_input_size():
    # S = ceil(H / 64): DarkNet-19's ceil(H / 32) map through the stride-2 conv
    head = small_head(input_size=(224, 288))
    raw = head([torch.randn(2, 8, 7, 9)])
    assert head.grid == (4, 5) and raw.output.shape == (2, 4, 5, 12)


def test_fc_batch_norm_is_opt_in_and_a_training_batch_of_one_is_refused_in_words():
    plain = small_head()  # the paper's FC: no norm, a bias, and the layers' keys as before the option existed
    assert [type(m).__name__ for m in plain.fc] == ["Linear", "LeakyReLU", "Dropout", "Linear"]
    assert plain.fc[0].bias is not None
    assert plain([torch.randn(1, 8, 4, 4)]).output.shape == (1, 2, 2, 12)
    head = small_head(fc_batch_norm=True)
    assert isinstance(head.fc[1], torch.nn.BatchNorm1d) and head.fc[0].bias is None
    with pytest.raises(ValueError, match=r"batches of two or more .* head.fc_batch_norm=false"):
        head([torch.randn(1, 8, 4, 4)])
    assert head.eval()([torch.randn(1, 8, 4, 4)]).output.shape == (1, 2, 2, 12)  # evaluation: any batch


def test_conv_output_layer_predicts_each_cell_from_its_own_features():
    # fully_connected=false: a 1x1 conv, so a change in one cell's features moves that cell's outputs only
    head = small_head(fully_connected=False, dropout=0.0).eval()
    x = torch.randn(1, 8, 4, 4)
    out = head([x]).output
    assert out.shape == (1, 2, 2, 12)
    # the four 3x3 convs before the output layer mix neighbouring cells by design: change the last conv's
    # output at one cell and run the output layer alone
    feats = head.convs(x)
    moved = feats.clone()
    moved[..., 1, 1] += 1.0
    changed = (head.fc(moved) - head.fc(feats)).permute(0, 2, 3, 1).abs().sum(-1) > 0
    assert changed.tolist() == [[[False, False], [False, True]]]
    initial = out[0, 0, 0, :10].view(2, 5)[:, :4]  # every box starts at its cell's centre, half the image's side
    torch.testing.assert_close(initial, torch.full((2, 4), 0.5), atol=0.1, rtol=0)


def one_box_case():
    """128 px, 2x2 cells of 64 px, 2 classes. One GT [72, 8, 120, 40] of class 1: centre (96, 24) in
    cell (row 0, col 1), w 48, h 32."""
    out = torch.zeros(1, 2, 2, 12)
    out[0, 0, 1, 0:5] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.3])  # box [80, 16, 112, 48]: IoU 3/7
    out[0, 0, 1, 5:10] = torch.tensor([0.2, 0.8, 0.3, 0.3, 0.6])  # box [71.04, 45.44, 82.56, 56.96]: IoU 0
    out[0, 0, 1, 10:] = torch.tensor([0.2, 0.7])
    out[0, 1, 0, 4], out[0, 1, 0, 9] = 0.4, -0.2  # confidences of an empty cell
    out[0, 1, 1, 10:] = torch.tensor([0.5, 0.5])  # class scores of an empty cell: no loss
    targets = {"boxes": torch.tensor([[[72.0, 8.0, 120.0, 40.0]]]), "labels": torch.tensor([[1]]),
               "mask": torch.tensor([[True]]), "weights": torch.tensor([[1.0]])}
    return YOLOv1Raw(out, 2), targets


def test_one_box_loss_by_hand():
    raw, targets = one_box_case()
    losses = small_head().loss(raw, targets, (128, 128))
    # inter [80, 112] x [16, 40] = 32 * 24 = 768; union 32 * 32 + 48 * 32 - 768 = 1792
    iou = 768 / 1792
    # targets: x 96 / 64 - 1 = 0.5, y 24 / 64 = 0.375, sqrt(48 / 128), sqrt(32 / 128) = 0.5
    box = 5 * ((0.5 - 0.5) ** 2 + (0.5 - 0.375) ** 2 + (0.5 - math.sqrt(0.375)) ** 2 + (0.5 - 0.5) ** 2)
    obj = (0.3 - iou) ** 2
    noobj = 0.5 * (0.6 ** 2 + 0.4 ** 2 + 0.2 ** 2)  # the other predictor of the cell, the empty cell's two
    cls = (0.2 - 0) ** 2 + (0.7 - 1) ** 2
    expected = {"loss_box": box, "loss_obj": obj, "loss_noobj": noobj, "loss_cls": cls,
                "loss": box + obj + noobj + cls}
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name

    # a mixup weight scales every term of its box, not the no-object term; an empty second image
    # doubles the divisor (the batch size)
    out = torch.cat([raw.output, torch.zeros_like(raw.output)])
    half = {"boxes": targets["boxes"].expand(2, -1, -1), "labels": targets["labels"].expand(2, -1),
            "mask": torch.tensor([[True], [False]]), "weights": torch.tensor([[0.5], [1.0]])}
    losses = small_head().loss(YOLOv1Raw(out, 2), half, (128, 128))
    for name in ("loss_box", "loss_obj", "loss_cls"):
        assert losses[name].item() == pytest.approx(expected[name] * 0.5 / 2, rel=1e-5), name
    assert losses["loss_noobj"].item() == pytest.approx(noobj / 2, rel=1e-5)


def test_difficult_gt_claims_nothing_and_its_cell_has_no_confidence_loss():
    raw, targets = one_box_case()
    targets["difficult"] = torch.tensor([[True]])
    losses = small_head().loss(raw, targets, (128, 128))
    assert losses["loss_box"].item() == losses["loss_obj"].item() == losses["loss_cls"].item() == 0
    assert losses["loss_noobj"].item() == pytest.approx(0.5 * (0.4 ** 2 + 0.2 ** 2))  # the other cell's only


# ---- the batched loss against a loop written from the paper -----------------------------------

def reference_loss(out, targets, image_size, num_boxes=2, coord=5.0, noobj=0.5):
    """Eq. 3 of the paper, image by image, cell by cell, in float64 Python: the first GT whose centre
    falls in a cell owns it, its predictor of highest IoU (lowest index on ties) is responsible;
    difficult GTs claim nothing and cells holding only their centres get no confidence loss."""
    batch, grid_h, grid_w, _ = out.shape
    height, width = image_size
    cell_w, cell_h = width / grid_w, height / grid_h
    num_classes = out.shape[-1] - 5 * num_boxes
    terms = {"loss_box": 0.0, "loss_obj": 0.0, "loss_noobj": 0.0, "loss_cls": 0.0}
    for b in range(batch):
        owner, difficult_cells = {}, set()
        for m in range(targets["mask"].shape[1]):
            if not targets["mask"][b, m]:
                continue
            x1, y1, x2, y2 = targets["boxes"][b, m].double().tolist()
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            cell = (min(int(cy / cell_h), grid_h - 1), min(int(cx / cell_w), grid_w - 1))
            if "difficult" in targets and targets["difficult"][b, m]:
                difficult_cells.add(cell)
            elif cell not in owner:
                owner[cell] = m
        for r in range(grid_h):
            for c in range(grid_w):
                v = out[b, r, c].double().tolist()
                preds = [v[5 * k: 5 * k + 5] for k in range(num_boxes)]
                if (r, c) not in owner:
                    if (r, c) not in difficult_cells:
                        terms["loss_noobj"] += noobj * sum(p[4] ** 2 for p in preds)
                    continue
                m = owner[(r, c)]
                gt = targets["boxes"][b, m].double().tolist()
                weight = float(targets["weights"][b, m])

                def iou(p):
                    px, py = (c + p[0]) * cell_w, (r + p[1]) * cell_h
                    pw, ph = p[2] ** 2 * width, p[3] ** 2 * height
                    box = [px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2]
                    iw = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
                    ih = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
                    union = pw * ph + (gt[2] - gt[0]) * (gt[3] - gt[1]) - iw * ih
                    return iw * ih / union if union > 0 else 0.0

                ious = [iou(p) for p in preds]
                j = max(range(num_boxes), key=lambda k: (ious[k], -k))
                tx = (gt[0] + gt[2]) / 2 / cell_w - c
                ty = (gt[1] + gt[3]) / 2 / cell_h - r
                tw, th = math.sqrt((gt[2] - gt[0]) / width), math.sqrt((gt[3] - gt[1]) / height)
                p = preds[j]
                terms["loss_box"] += weight * coord * (
                    (p[0] - tx) ** 2 + (p[1] - ty) ** 2 + (p[2] - tw) ** 2 + (p[3] - th) ** 2)
                terms["loss_obj"] += weight * (p[4] - ious[j]) ** 2
                terms["loss_noobj"] += noobj * sum(q[4] ** 2 for k, q in enumerate(preds) if k != j)
                label = int(targets["labels"][b, m])
                terms["loss_cls"] += weight * sum((v[5 * num_boxes + k] - (k == label)) ** 2
                                                  for k in range(num_classes))
    terms = {k: t / batch for k, t in terms.items()}
    terms["loss"] = sum(terms.values())
    return terms


def random_case(seed, image_size=(256, 384), grid=(4, 6), num_classes=3, batch=4, num_gt=7):
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    out = torch.randn(batch, *grid, 10 + num_classes, generator=g) * 0.3
    out[..., [0, 1, 5, 6]] += 0.5  # boxes near the cell and of some size: many predictors overlap their GT
    out[..., [2, 3, 7, 8]] += 0.4
    centre = torch.rand(batch, num_gt, 2, generator=g) * torch.tensor([width, height])
    half = (torch.rand(batch, num_gt, 2, generator=g) * 0.3 + 0.02) * torch.tensor([width, height])
    boxes = torch.cat([centre - half, centre + half], -1).clamp(min=0)
    boxes[..., 2:] = torch.minimum(boxes[..., 2:], torch.tensor([width, height], dtype=torch.float32))
    cell_w, cell_h = width / grid[1], height / grid[0]
    # GT 1 shares GT 0's cell (the first keeps it); GT 2's centre on an inner border, GT 3's on the
    # image's right and bottom border (the last cell)
    cell_size = torch.tensor([cell_w, cell_h])
    cell_of_gt0 = ((boxes[:, 0, :2] + boxes[:, 0, 2:]) / 2 / cell_size).floor()
    centre_1 = (cell_of_gt0 + torch.rand(batch, 2, generator=g) * 0.8 + 0.1) * cell_size
    boxes[:, 1] = torch.cat([centre_1 - half[:, 1], centre_1 + half[:, 1]], -1)
    boxes[:, 2] = torch.tensor([2 * cell_w - 20, cell_h - 10, 2 * cell_w + 20, cell_h + 10])
    boxes[:, 3] = torch.tensor([width - 20, height - 10, width + 20, height + 10])
    mask = torch.rand(batch, num_gt, generator=g) > 0.2
    mask[:, :4] = True
    mask[-1] = False  # an image without objects
    difficult = torch.zeros(batch, num_gt, dtype=torch.bool)
    difficult[0, 4] = True  # on its own (probably)
    boxes[1, 5] = boxes[1, 0] + 1.0  # a difficult GT in a cell a normal GT owns
    mask[1, 5], difficult[1, 5] = True, True
    boxes[2, 4] = boxes[2, 0] + 1.0  # a difficult GT first in its cell: the normal one after it owns the cell
    boxes[2, 0], boxes[2, 4] = boxes[2, 4].clone(), boxes[2, 0].clone()
    difficult[2, 0], mask[2, 4] = True, True
    out[0, 0, 0, 5:9] = out[0, 0, 0, 0:4]  # two identical predictors: the tie goes to the first
    labels = torch.randint(0, num_classes, (batch, num_gt), generator=g)
    weights = torch.rand(batch, num_gt, generator=g) * 0.8 + 0.2
    # padding as collate_detection writes it
    boxes[~mask], labels[~mask], weights[~mask] = 0.0, -1, 0.0
    targets = {"boxes": boxes, "labels": labels, "mask": mask, "weights": weights, "difficult": difficult}
    return out, targets


@pytest.mark.parametrize("seed", range(4))
def test_batched_loss_equals_the_per_gt_loop(seed):
    out, targets = random_case(seed)
    head = small_head(num_classes=3, input_size=(256, 384))
    losses = head.loss(YOLOv1Raw(out, 2), targets, (256, 384))
    expected = reference_loss(out, targets, (256, 384))
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert losses["loss_obj"].item() > 0 and losses["loss_box"].item() > 0


def test_tie_goes_to_the_first_predictor_and_the_first_gt_keeps_its_cell():
    raw, targets = one_box_case()
    raw.output[0, 0, 1, 5:10] = raw.output[0, 0, 1, 0:5]  # the same box twice: equal IoU
    raw.output[0, 0, 1, 9] = 0.0
    # a second GT (class 0) in the same cell, listed after the first: no effect
    targets = {"boxes": torch.tensor([[[72.0, 8.0, 120.0, 40.0], [70.0, 0.0, 90.0, 20.0]]]),
               "labels": torch.tensor([[1, 0]]), "mask": torch.tensor([[True, True]]),
               "weights": torch.tensor([[1.0, 1.0]])}
    losses = small_head().loss(raw, targets, (128, 128))
    # predictor 0 (conf 0.3) is responsible, predictor 1 (conf 0) is no-object
    assert losses["loss_obj"].item() == pytest.approx((0.3 - 768 / 1792) ** 2, rel=1e-5)
    assert losses["loss_noobj"].item() == pytest.approx(0.5 * (0.4 ** 2 + 0.2 ** 2), rel=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(0.2 ** 2 + 0.3 ** 2, rel=1e-5)


def test_loss_backward_reaches_the_outputs_and_the_batch_may_have_no_box():
    out, targets = random_case(0)
    out.requires_grad_(True)
    head = small_head(num_classes=3, input_size=(256, 384))
    head.loss(YOLOv1Raw(out, 2), targets, (256, 384))["loss"].backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0
    empty = {k: v[:, :0] for k, v in targets.items()}
    losses = head.loss(YOLOv1Raw(out.detach(), 2), empty, (256, 384))
    assert losses["loss"].item() == pytest.approx(losses["loss_noobj"].item())


# ---- decoding --------------------------------------------------------------------------------

def test_predict_decodes_a_known_box_and_score():
    out = torch.zeros(1, 2, 2, 12)
    out[0, 1, 1, 0:5] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9])  # centre (96, 96), 32 x 32
    out[0, 1, 1, 10:] = torch.tensor([0.1, 0.8])
    (pred,) = small_head().predict(YOLOv1Raw(out, 2), (128, 128))
    assert pred["labels"].tolist() == [1, 0]
    torch.testing.assert_close(pred["scores"], torch.tensor([0.72, 0.09]))
    torch.testing.assert_close(pred["boxes"], torch.tensor([[80.0, 80.0, 112.0, 112.0]] * 2))


def test_predict_keeps_the_contract():
    size = (256, 384)
    g = torch.Generator().manual_seed(3)
    out = torch.randn(3, 4, 6, 13, generator=g)  # linear outputs, many outside [0, 1]
    out[..., [2, 3, 7, 8]] *= 2  # boxes larger than the image, clipped
    preds = small_head(num_classes=3, input_size=size, score_threshold=0.0, max_detections=20).predict(
        YOLOv1Raw(out, 2), size)
    assert len(preds) == 3 and all(len(p["boxes"]) for p in preds)  # threshold 0: every image has boxes
    for p in preds:
        boxes, scores, labels = p["boxes"], p["scores"], p["labels"]
        assert len(boxes) == len(scores) == len(labels) <= 20
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= size[1]).all() and (boxes[:, 3] <= size[0]).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((labels >= 0) & (labels < 3)).all()
        assert ((scores > 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()


# ---- the fixed input size --------------------------------------------------------------------

def yolov1_module(**kwargs) -> DetectionModule:
    detector = Detector(DarkNet19(out_strides=[32]), IdentityNeck,
                        partial(YOLOv1Head, num_classes=2, input_size=(256, 256), channels=16, fc_width=8))
    return DetectionModule(detector, partial(torch.optim.AdamW, lr=1e-3), input_size=(256, 256), **kwargs)


def test_another_input_size_is_refused_when_the_model_is_built():
    assert yolov1_module().detector.head.grid == (4, 4)
    with pytest.raises(ValueError, match=r"built for 256x256 inputs .* got a 10x10 map"):
        yolov1_module(multiscale={"sizes": [256, 320]})


def test_conv_output_layer_takes_any_size_so_multiscale_too():
    detector = Detector(DarkNet19(out_strides=[32]), IdentityNeck,
                        partial(YOLOv1Head, num_classes=2, input_size=(256, 256), channels=16, fully_connected=False))
    module = DetectionModule(detector, partial(torch.optim.AdamW, lr=1e-3), input_size=(256, 256),
                             multiscale={"sizes": [256, 320]})
    raw = module.detector.eval()(torch.zeros(1, 3, 320, 384))
    assert raw.output.shape == (1, 5, 6, 12)  # ceil(320 / 64) x ceil(384 / 64) cells of 2 x 5 + 2


def test_one_map_only():
    with pytest.raises(ValueError, match=r"out_strides=\[32\]"):
        YOLOv1Head(in_channels=(512, 1024), num_classes=2, input_size=(448, 448), strides=(16, 32))


# ---- train.py and evaluate.py ----------------------------------------------------------------

# a small head and input: the run checks the chain, not the paper's capacity
SMALL = ["model=yolov1", "input_size=[128,128]", "head.channels=32", "head.fc_width=32"]
TINY = ["data.source.sizes={train: 4, val: 4, test: 4}", "data.batch_size=2", "data.eval_batch_size=4",
        "data.num_workers=0", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_fast_dev_run_on_bccd(tmp_path, bccd_root):
    # real data once (VOC): the COCO and YOLO-txt readers hand every head the same padded batch, and SSD300's
    # e2e tests run them; one e2e run per head keeps CI's time
    out = run("train.py", *SMALL, "data=voc", f"data.root={bccd_root}", "debug=fast_dev_run", "data.batch_size=2",
              "data.eval_batch_size=2", run_dir(tmp_path, "bccd"))
    assert "classes (label order): ['Platelets', 'RBC', 'WBC']" in out
    assert "backbone darknet19: weights from random init" in out
    assert_fast_dev_run_trained_and_validated(out, tmp_path / "bccd")


def test_train_one_epoch_then_evaluate(tmp_path):
    run("train.py", *SMALL, "trainer.max_epochs=1", run_dir(tmp_path, "run"), *TINY)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    out = run("evaluate.py", f"ckpt_path={last}", "split=val", "num_workers=0", "trainer.accelerator=cpu",
              run_dir(tmp_path, "eval"))
    assert "VOC AP@0.5 (area)" in out and "\ncircle" in out
    # untrained, YOLOv1's scores (confidence x class) stay under its 0.01: no detection yet, every stat 0
    assert_evaluation_repeats_the_last_validation(out, tmp_path / "run", tmp_path / "eval", some_recall=False)


@pytest.mark.slow
def test_overfit_preset_fits_two_images_to_map_one(tmp_path):
    """The whole chain as train.py runs it (data, grid assignment, loss, decoding, NMS, the metric), as
    the SSD300 overfit test does. The smallest settings found that get there on the CPU, every time
    (about a minute): 256 px (a 4x4 grid), a narrow head without dropout, scenes of at most 3 shapes
    (YOLOv1 keeps one object per cell: the two images' 5 shapes each have a cell of their own), and
    SGD: AdamW fits the two images to a training loss of 1e-4 but keeps taking steps of the learning
    rate's size, and the FC, which memorises two points, turns what BatchNorm's running statistics
    lag behind the batch's (and their n/(n-1) variance) into wrong boxes: val mAP@0.5 0.8 after 100
    epochs. SGD's steps shrink with the gradient, the weights settle: 1.0 after 60 epochs (3 seeds).
    """
    out = run("train.py", "model=yolov1", "input_size=[256,256]", "head.channels=128", "head.fc_width=256",
              "head.dropout=0", *textured_shapes(max_objects=3), "optimizer=sgd", "trainer.gradient_clip_val=10",
              "debug=overfit", "trainer.overfit_batches=1", "data.batch_size=2", "trainer.max_epochs=80",
              "trainer.check_val_every_n_epoch=80", run_dir(tmp_path, "overfit"))
    rows = read_metrics(tmp_path / "overfit")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/map_50"]) for r in rows if r.get("val/map_50")]
    assert len(losses) == 80 and losses[-1] < 0.01 * losses[0], out[-3000:]
    assert val[-1] >= 0.9, (val, losses[::10])


@pytest.mark.slow
def test_resume_with_dropout_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """The head's dropout draws from the global RNG in every training step (SSD draws nothing there):
    a resumed run must draw what the uninterrupted one drew (the loaders' own generators keep their
    iterators' seeds off that RNG)."""
    common = [*SMALL, *TINY, "trainer.deterministic=true", "data.source.sizes={train: 4, val: 2, test: 2}",
              "trainer.max_epochs=2"]
    run("train.py", run_dir(tmp_path, "full"), *common)
    run("train.py", "+callbacks.stop._target_=tests.stop_callback.StopAfterEpochs", "+callbacks.stop.epochs=1",
        run_dir(tmp_path, "first"), *common)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    run("train.py", f"ckpt_path={last}", run_dir(tmp_path, "resumed"), *common)
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 4
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    key = "detector.head.fc.0.weight"
    assert not torch.equal(first["state_dict"][key], full["state_dict"][key])
