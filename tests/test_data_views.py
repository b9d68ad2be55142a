"""Dataset views (``python -m detectors.data.check``'s pictures and anchor fit) and the training-batch pictures."""

import csv
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops import box_convert

from detectors.anchors.fit import box_fit, detector_fit, shape_fit
from detectors.callbacks.train_batches import TrainBatches, draw_batch
from detectors.evaluation.plots import class_colors


def iou_by_hand(a, b):
    """IoU of two xyxy boxes, written out (the reference for torchvision's box_iou here)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_boxes_equal_to_anchors_fit_fully():
    anchors = [[10.0, 20.0], [30.0, 30.0], [64.0, 16.0]]
    fit = shape_fit(torch.tensor(anchors * 3), anchors)
    assert (fit.num_boxes, fit.num_anchors, fit.share, fit.mean_iou) == (9, 3, 1.0, 1.0)


def test_shape_fit_of_known_shape_ious_with_the_only_anchor():
    # against a 10 x 20 anchor, centres aligned: 20 x 20 -> 200 / 400 = 0.5 (counts: >= 0.5),
    # 40 x 10 -> 10*10 / (400 + 200 - 100) = 0.2, 5 x 10 -> 50 / 200 = 0.25, 10 x 20 -> 1
    fit = shape_fit(torch.tensor([[20.0, 20.0], [40.0, 10.0], [5.0, 10.0], [10.0, 20.0]]), [[10.0, 20.0]])
    assert fit.best_iou.tolist() == pytest.approx([0.5, 0.2, 0.25, 1.0])
    assert fit.share == 2 / 4  # the direct count: 0.5 and 1.0 reach the threshold
    assert fit.mean_iou == pytest.approx((0.5 + 0.2 + 0.25 + 1.0) / 4)
    assert shape_fit(torch.tensor([[20.0, 20.0]]), [[10.0, 20.0]], threshold=0.51).share == 0.0


def test_box_fit_in_chunks_equals_a_direct_count():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(37, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(37, 2, generator=g) * 80], 1)
    pxy = torch.rand(23, 2, generator=g) * 200
    priors = torch.cat([pxy, pxy + 5 + torch.rand(23, 2, generator=g) * 80], 1)
    priors[0] = boxes[3]  # one box has a prior equal to it: best IoU 1
    best = [max(iou_by_hand(b.tolist(), p.tolist()) for p in priors) for b in boxes]
    fit = box_fit(boxes, priors, threshold=0.3, max_pairs=50)  # 2 boxes a chunk: 19 chunks
    assert fit.best_iou.tolist() == pytest.approx(best, abs=1e-6)
    assert fit.best_iou[3] == pytest.approx(1.0)
    assert fit.share == sum(b >= 0.3 for b in best) / len(best)
    assert fit.mean_iou == pytest.approx(sum(best) / len(best), abs=1e-6)


def test_check_writes_the_pictures_and_the_fit_of_the_heads_own_priors(tmp_path, capsys):
    """The check on the shapes with a small SSDLite: the four pictures, report.txt and anchor_fit.csv, whose
    share is the direct count against the priors the built head makes from its own forward."""
    from detectors.data.check import compose_config, main
    from detectors.tasks.anchors import boxes_at_input, training_records
    from detectors.tasks.train import build_datamodule

    overrides = ["model=ssdlite", "input_size=[128,128]", "data.source.sizes={train: 6, val: 2, test: 2}"]
    out = tmp_path / "check"
    assert main([*overrides, "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("class_counts.png", "box_shapes.png", "box_centres.png", "boxes_per_image.png", "report.txt"):
        assert (out / name).stat().st_size > 1000, name
    rows = list(csv.DictReader((out / "anchor_fit.csv").open()))
    assert [r["class"] for r in rows] == ["all", "circle", "square", "triangle", "star", "ellipse", "cross"]
    assert "anchor fit of SSDHead" in printed and "anchor fit of SSDHead" in (out / "report.txt").read_text()

    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg)
    boxes, labels, _, _ = boxes_at_input(training_records(datamodule.source)[0], [128, 128], False, 1.0)
    detector = instantiate(cfg.model.detector).eval()
    with torch.no_grad():
        raw = detector(torch.zeros(1, 3, 128, 128))
    priors = box_convert(detector.head.make_priors(raw, (128, 128)), "cxcywh", "xyxy")
    best = torch.stack([torch.tensor([iou_by_hand(b.tolist(), p) for p in priors.tolist()]).max()
                        for b in boxes.float()])
    assert int(rows[0]["boxes"]) == len(boxes) and int(rows[0]["anchors"]) == len(priors)
    assert float(rows[0]["share_best_iou_ge_0.5"]) == pytest.approx(float((best >= 0.5).double().mean()), abs=1e-6)
    assert float(rows[0]["mean_best_iou"]) == pytest.approx(float(best.double().mean()), abs=1e-5)
    assert int(rows[1]["boxes"]) == int((labels == 0).sum())
    assert detector_fit(detector, boxes, (128, 128)).share == pytest.approx(float(rows[0]["share_best_iou_ge_0.5"]))


def test_check_of_an_auto_anchors_head_says_training_refits_them(tmp_path, capsys):
    """head.anchors=auto: the check measures the default anchors and says training refits them, instead of
    asking for a k-means run."""
    from detectors.data.check import main

    overrides = ["model=yolov3_tiny", "input_size=[128,128]", "head.anchors=auto",
                 "data.source.sizes={train: 6, val: 2, test: 2}"]
    assert main([*overrides, "--out", str(tmp_path / "check"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "anchor fit of YOLOv3Head" in printed and "head.anchors=auto: training refits" in printed
    assert "python -m detectors.anchors kmeans" not in printed


def test_drawn_boxes_lie_where_the_batch_boxes_are():
    images = torch.zeros(2, 3, 64, 80, dtype=torch.uint8)
    boxes = torch.tensor([[[10.0, 12.0, 50.0, 40.0], [0, 0, 0, 0]], [[30.0, 20.0, 70.0, 60.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[1, -1], [0, -1]])
    mask = torch.tensor([[True, False], [True, False]])
    grid = draw_batch(images, boxes, labels, mask, None, ["a", "b"], columns=2)
    assert grid.shape == (3, 64 + 8, 2 * (80 + 4) + 4)  # make_grid: 4 px padding around each image
    colors = class_colors(2)
    for i, (x1, y1, x2, y2) in enumerate([(10, 12, 50, 40), (30, 20, 70, 60)]):
        picture = grid[:, 4:4 + 64, 4 + i * 84:4 + i * 84 + 80]
        colour = torch.tensor(colors[int(labels[i, 0])], dtype=torch.uint8)
        # the bottom and right edges, clear of the label tag at the top left
        assert torch.equal(picture[:, y2, (x1 + x2) // 2], colour)
        assert torch.equal(picture[:, (y1 + y2) // 2 + 5, x2], colour)
        assert picture[:, y2 + 3:, :].sum() == 0 and picture[:, :, x2 + 3:].sum() == 0  # nothing drawn beyond
        assert picture[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2][:, -8:, -8:].sum() == 0  # the inside stays the image
    weighted = draw_batch(images, boxes, labels, mask, torch.tensor([[0.5, 0.0], [1.0, 0.0]]), ["a", "b"], 2)
    assert not torch.equal(weighted, grid)  # under mixup the tags carry the weights: wider tags


class Untouchable(dict):
    def __getitem__(self, key):
        raise AssertionError("the batch was read after the last picture")


def test_train_batches_writes_the_first_batches_unnormalised_and_then_reads_nothing(tmp_path):
    from torchvision.io import read_image

    mean = torch.tensor([100.0, 110.0, 120.0]).view(1, 3, 1, 1)
    std = torch.tensor([50.0, 60.0, 70.0]).view(1, 3, 1, 1)
    module = SimpleNamespace(mean=mean, std=std, class_names=["a", "b"])
    trainer = SimpleNamespace(is_global_zero=True)
    grey = torch.full((2, 3, 48, 64), 200.0)
    batch = {"images": (grey - mean) / std, "boxes": torch.zeros(2, 0, 4), "labels": torch.zeros(2, 0, dtype=torch.long),
             "mask": torch.zeros(2, 0, dtype=torch.bool)}
    callback = TrainBatches(tmp_path, num_batches=2)
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.on_train_batch_start(trainer, module, batch, 1)
    for _ in range(3):
        callback.on_train_batch_start(trainer, module, Untouchable(batch), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_batch0.jpg", "train_batch1.jpg"]
    picture = read_image(str(tmp_path / "train_batch0.jpg"))
    assert picture.shape == (3, 48 + 8, 2 * (64 + 4) + 4)
    assert (picture[:, 10:40, 10:60].float() - 200).abs().max() <= 3  # un-normalised (JPEG rounding aside)
    TrainBatches(tmp_path / "off", num_batches=0).on_train_batch_start(trainer, module, Untouchable(), 0)
    assert not (tmp_path / "off").exists()
