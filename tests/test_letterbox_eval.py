"""Letterboxed evaluation: the per-image frame against albumentations itself, mAP of a perfect
predictor mapped back to BCCD's own annotations, and the augment configs picking the eval resize."""

from pathlib import Path

import albumentations as A
import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch import nn

import detectors  # noqa: F401  (resolvers)
from detectors.boxes import boxes_to_input, boxes_to_original
from detectors.data.datamodule import DetectionDataModule
from detectors.data.dataset import collate_detection
from detectors.data.formats.voc import VOCSource
from detectors.data.transforms import build_eval_transform, input_frame
from detectors.evaluation.coco import COCOMeanAP
from detectors.evaluation.plots import GT_COLOR, draw_sample
from detectors.evaluation.voc import VOCMeanAP
from detectors.module import DetectionModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESIZES = ("stretch", "letterbox")

# (H0, W0) -> (H, W): landscape, portrait, square, odd sizes, up- and down-scaling, extreme aspect,
# and sides whose scaled length ends in .5, where albumentations rounds half to even (101 * 0.5 = 50.5
# -> 50, 9 * 0.5 = 4.5 -> 4): a half-up rounding misplaces the image by a pixel there.
FIXED_CASES = [
    ((480, 640), (300, 300)), ((640, 480), (300, 300)), ((500, 500), (320, 320)), ((333, 517), (256, 384)),
    ((517, 333), (384, 256)), ((37, 1001), (301, 299)), ((120, 90), (640, 640)), ((200, 101), (100, 100)),
    ((101, 200), (100, 100)), ((600, 9), (300, 300)), ((480, 640), (320, 416)),
]


def random_cases(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [((int(rng.integers(20, 1200)), int(rng.integers(20, 1200))),
             (int(rng.integers(32, 700)), int(rng.integers(32, 700)))) for _ in range(n)]


CASES = FIXED_CASES + random_cases(25, seed=0)


def random_boxes(orig, frame, rng, n=20):
    """Boxes inside an image of ``orig`` (H0, W0) at least 2 px wide and high in the network input,
    so the eval transform keeps all of them; the first is the whole image."""
    h0, w0 = orig
    min_w, min_h = min(w0, 2.0 / frame[0]), min(h0, 2.0 / frame[1])
    w = rng.uniform(min_w, w0, n)
    h = rng.uniform(min_h, h0, n)
    x1 = rng.uniform(0, w0 - w)
    y1 = rng.uniform(0, h0 - h)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1)
    boxes[0] = [0, 0, w0, h0]
    return boxes.astype(np.float32)


@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("orig,size", CASES)
def test_boxes_through_the_eval_pipeline_map_back_exactly(resize, orig, size):
    rng = np.random.default_rng(orig[0] * 7919 + orig[1])
    frame = input_frame(orig, size, resize)
    boxes = random_boxes(orig, frame, rng)
    image = rng.integers(0, 256, (*orig, 3), dtype=np.uint8)
    out = build_eval_transform(resize, size, fill=(114, 114, 114))(image=image, bboxes=boxes,
                                                                     box_index=np.arange(len(boxes)))
    assert out["image"].shape == (*size, 3)
    assert list(out["box_index"]) == list(range(len(boxes)))  # nothing dropped: one bijective map
    moved = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32))
    back = boxes_to_original(moved, torch.tensor(frame), torch.tensor(orig))
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-3)
    # and the forward map is what albumentations did to the boxes
    np.testing.assert_allclose(boxes_to_input(torch.from_numpy(boxes), torch.tensor(frame)).numpy(),
                               moved.numpy(), atol=1e-3)


@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("orig,size", CASES)
def test_image_content_lands_where_the_frame_says(resize, orig, size):
    """An image whose pixel (x0, y0) holds the values (x0, y0): after the (bilinear) resize every
    input pixel must hold the original coordinate the frame maps its centre to, and the padding the
    fill, so scale and offset are checked on the pixels themselves, not only on albumentations' boxes."""
    h0, w0 = orig
    ys, xs = np.mgrid[0:h0, 0:w0].astype(np.float32)
    image = np.stack([xs, ys, np.zeros_like(xs)], -1)
    out = build_eval_transform(resize, size, fill=(-1.0, -1.0, -1.0))(image=image, bboxes=np.zeros((0, 4)),
                                                                        box_index=np.zeros(0))["image"]
    scale_x, scale_y, pad_left, pad_top = input_frame(orig, size, resize)
    new_w, new_h = round(w0 * scale_x), round(h0 * scale_y)
    content = np.zeros(size, dtype=bool)
    content[int(pad_top):int(pad_top) + new_h, int(pad_left):int(pad_left) + new_w] = True
    assert (out[~content] == -1.0).all()
    assert (out[content][:, 0] >= 0).all()
    # OpenCV samples input pixel x at source coordinate (x + 0.5) / scale - 0.5, clamped at the borders
    x_src = (np.arange(size[1]) + 0.5 - pad_left) / scale_x - 0.5
    y_src = (np.arange(size[0]) + 0.5 - pad_top) / scale_y - 0.5
    cols = content.any(0) & (x_src >= 0) & (x_src <= w0 - 1)
    rows = content.any(1) & (y_src >= 0) & (y_src <= h0 - 1)
    np.testing.assert_allclose(out[rows][:, cols, 0], np.broadcast_to(x_src[cols], (rows.sum(), cols.sum())),
                               atol=0.02)
    np.testing.assert_allclose(out[rows][:, cols, 1], np.broadcast_to(y_src[rows, None], (rows.sum(), cols.sum())),
                               atol=0.02)


def test_a_single_white_pixel_lands_where_the_frame_says():
    """BCCD's shape letterboxed up (one pixel covers about a 2 x 2 patch): the brightness-weighted
    centre of the one white pixel is its centre mapped through the frame."""
    orig, size = (120, 160), (320, 320)
    frame = input_frame(orig, size, "letterbox")
    assert frame[2:] == (0.0, 40.0)
    for x0, y0 in [(0, 0), (17, 93), (159, 119), (80, 60)]:
        image = np.zeros((*orig, 3), dtype=np.uint8)
        image[y0, x0] = 255
        out = build_eval_transform("letterbox", size, fill=(0, 0, 0))(image=image, bboxes=np.zeros((0, 4)),
                                                                      box_index=np.zeros(0))["image"]
        weight = out[..., 0].astype(np.float64)
        rows, cols = np.mgrid[0:size[0], 0:size[1]] + 0.5
        centre = (weight * cols).sum() / weight.sum(), (weight * rows).sum() / weight.sum()
        expected = boxes_to_input(torch.tensor([[x0 + 0.5, y0 + 0.5, x0 + 0.5, y0 + 0.5]]), torch.tensor(frame))
        # a pixel in the image's corner loses the half of its spread that would fall outside
        tolerance = 0.3 if 0 < x0 < orig[1] - 1 and 0 < y0 < orig[0] - 1 else 0.6
        np.testing.assert_allclose(centre, expected[0, :2].numpy(), atol=tolerance)


@pytest.mark.parametrize("resize", RESIZES)
def test_evaluation_keeps_every_ground_truth_box_however_small(resize):
    """A 3000 px image to 300 px: 2 px and 1 px boxes become 0.2 and 0.1 px. Training may drop such
    boxes; evaluation must not, or it scores against fewer boxes than the annotation file has."""
    boxes = np.array([[10, 10, 12, 12], [100, 100, 101, 101], [0, 0, 3000, 3000]], np.float32)
    out = build_eval_transform(resize, (300, 300))(image=np.zeros((3000, 3000, 3), np.uint8), bboxes=boxes,
                                                  box_index=np.arange(3))
    assert list(out["box_index"]) == [0, 1, 2]


def test_unknown_eval_resize_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown eval_resize 'crop'.*stretch, letterbox"):
        build_eval_transform("crop", (32, 32))
    with pytest.raises(ValueError, match="unknown eval_resize 'crop'.*stretch, letterbox"):
        input_frame((10, 10), (32, 32), "crop")
    with pytest.raises(ValueError, match="eval_resize must be one of stretch, letterbox, stretch_float, got 'crop'"):
        DetectionDataModule(None, augment={"preset": "yolo", "eval_resize": "crop"})  # the source is never read


# ---- end to end on BCCD (640 x 480 images) ------------------------------------------------------
class GroundTruthDetector(nn.Module):
    """A detector that "predicts" the batch's ground truth in the network input (score 1)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Module()
        self.head.num_classes = num_classes
        self.batch = None

    def forward(self, images, targets=None):
        return None

    def predict(self, raw, size):
        b = self.batch
        return [{"boxes": b["boxes"][i][m].clone(), "scores": torch.ones(int(m.sum())), "labels": b["labels"][i][m]}
                for i, m in enumerate(b["mask"])]


def perfect_predictor_maps(bccd_root, eval_resize, size, drop_frames=False, images=8):
    """VOC and COCO mAP@0.5 of the ground truth the network input holds, mapped back by the module,
    against the annotation files' own boxes (not the batch's: those went through the same map)."""
    augment = {**OmegaConf.to_container(OmegaConf.load(CONFIGS / "augment" / "yolo.yaml")), "eval_resize": eval_resize}
    dm = DetectionDataModule(VOCSource(bccd_root), input_size=size, augment=augment, num_workers=0)
    dataset = dm.dataset("val")
    batch = collate_detection([dataset[i] for i in range(images)])
    if drop_frames:
        del batch["frames"]
    detector = GroundTruthDetector(len(dm.classes))
    detector.batch = batch
    module = DetectionModule(detector, optimizer=None, class_names=dm.classes, input_size=size, channels_last=False)
    preds, _ = module.predict_original_frame(batch)
    files = [{"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels),
              "difficult": torch.from_numpy(r.difficult)} for r in dataset.records[:images]]
    voc, coco = VOCMeanAP(len(dm.classes), iou_threshold=0.5), COCOMeanAP(num_classes=len(dm.classes))
    voc.update(preds, files)
    coco.update(preds, files)
    return float(voc.compute()["voc_map_50"]), float(coco.compute()["map_50"]), batch


@pytest.mark.parametrize("size", [(320, 320), (384, 256)])
def test_letterboxed_ground_truth_maps_back_to_the_annotation_files(bccd_root, size):
    voc, coco, batch = perfect_predictor_maps(bccd_root, "letterbox", size)
    assert voc == pytest.approx(1.0) and coco == pytest.approx(1.0)
    assert (batch["frames"][:, 2:] > 0).any()  # the padding really is there (640 x 480 into `size`)
    # the plain-resize inverse on the same letterboxed inputs misplaces the boxes
    voc_wrong, coco_wrong, _ = perfect_predictor_maps(bccd_root, "letterbox", size, drop_frames=True)
    assert voc_wrong < 0.5 and coco_wrong < 0.5  # 0.36 and 0.03 when written


def test_stretched_ground_truth_maps_back_too(bccd_root):
    voc, coco, batch = perfect_predictor_maps(bccd_root, "stretch", (320, 320))
    assert voc == pytest.approx(1.0) and coco == pytest.approx(1.0)
    torch.testing.assert_close(batch["frames"], torch.tensor([[0.5, 320 / 480, 0.0, 0.0]]).expand(8, 4))


def test_sample_pictures_draw_boxes_inside_the_letterbox():
    """A GT box of the whole original image is drawn along the content's edge, not the picture's."""
    orig, size = (480, 640), (320, 320)
    frame = input_frame(orig, size, "letterbox")  # (0.5, 0.5, 0, 40): box rows 40..280
    image = torch.full((3, *size), 128, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 640.0, 480.0]]), "labels": torch.tensor([0])}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    out = draw_sample(image, empty, target, orig, ["a"], frame=torch.tensor(frame))
    assert out[:, 40, 160].tolist() == list(GT_COLOR) and out[:, 280, 160].tolist() == list(GT_COLOR)
    assert out[:, 20, 160].tolist() == [128, 128, 128] and out[:, 300, 160].tolist() == [128, 128, 128]
    # without a frame: a plain resize, the box along the picture's edge
    plain = draw_sample(image, empty, target, orig, ["a"])
    assert plain[:, 0, 160].tolist() == list(GT_COLOR) and plain[:, 40, 160].tolist() == [128, 128, 128]


# ---- configs ------------------------------------------------------------------------------------
def compose_train(overrides, tmp_path, root):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.data.root = str(root)
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("augment,resize", [("yolo", "letterbox"), ("ssd", "stretch"), ("none", "stretch")])
def test_augment_configs_pick_the_eval_resize(augment, resize, tmp_path, bccd_root):
    cfg = compose_train(["data=voc", f"augment={augment}"], tmp_path, bccd_root)
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.eval_resize == resize and "eval_resize" not in dm.augment
    ops = [type(t) for t in dm.dataset("val").transform.transforms]
    assert ops == ([A.LongestMaxSize, A.PadIfNeeded] if resize == "letterbox" else [A.Resize])
    if resize == "letterbox":  # the training preset's grey
        assert dm.dataset("val").transform.transforms[1].fill == (114.0, 114.0, 114.0)
    _, target = dm.dataset("val")[0]
    assert target["frame"] == input_frame((480, 640), tuple(cfg.input_size), resize)
