"""Augmentation presets: properties of the boxes that come out (hypothesis), boxes that follow the
pixels (albumentations' own mask path as the reference), SSD's crop and colour ranges, drop counts."""

import colorsys

import albumentations as A
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from detectors.data.dataset import DetectionDataset, collate_detection
from detectors.data.records import Record
from detectors.data.transforms import PRESETS, MinIoURandomCrop, build_transform, ssd_photometric

PRESET_ARGS = {"ssd": {}, "yolo": {"fill": (114, 114, 114), "min_visibility": 0.1, "min_box_size": 2.0}, "none": {},
               "flip": {"flip_prob": 1.0},
               "letterbox": {"fill": (114, 114, 114)}}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenes(draw):
    """An image size, an output size, and up to 9 non-overlapping integer boxes (one per cell of a
    3x3 grid, so each box owns its pixels in a mask), some reaching the image border."""
    h0, w0 = draw(st.integers(12, 160)), draw(st.integers(12, 160))
    size = (draw(st.integers(16, 96)), draw(st.integers(16, 96)))
    boxes = []
    for gy in range(3):
        for gx in range(3):
            if not draw(st.booleans()):
                continue
            cx0, cx1 = gx * w0 // 3, (gx + 1) * w0 // 3
            cy0, cy1 = gy * h0 // 3, (gy + 1) * h0 // 3
            if cx1 - cx0 < 2 or cy1 - cy0 < 2:
                continue
            x1 = draw(st.integers(cx0, cx1 - 2))
            y1 = draw(st.integers(cy0, cy1 - 2))
            boxes.append((x1, y1, draw(st.integers(x1 + 1, cx1)), draw(st.integers(y1 + 1, cy1))))
    seed = draw(st.integers(0, 2**31 - 1))
    return (h0, w0), size, np.array(boxes, dtype=np.float32).reshape(-1, 4), seed


def run_preset(preset, scene, mask=None):
    (h0, w0), size, boxes, seed = scene
    t = build_transform(preset, size, seed=seed, **PRESET_ARGS[preset])
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    data = {"image": image, "bboxes": boxes, "box_index": np.arange(len(boxes))}
    if mask is not None:
        data["mask"] = mask
    return t(**data)


@pytest.mark.parametrize("preset", PRESETS)
@FAST
@given(scene=scenes())
def test_boxes_stay_inside_the_image_and_non_degenerate(preset, scene):
    (h0, w0), (h, w), boxes, _ = scene
    out = run_preset(preset, scene)
    assert out["image"].shape == (h, w, 3) and out["image"].dtype == np.uint8
    kept = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
    index = np.asarray(out["box_index"], dtype=np.int64)
    assert len(kept) == len(index) and len(set(index.tolist())) == len(index)
    assert ((index >= 0) & (index < len(boxes))).all()
    min_size = PRESET_ARGS[preset].get("min_box_size", 1.0)
    assert (kept[:, 0] >= 0).all() and (kept[:, 1] >= 0).all()
    assert (kept[:, 2] <= w + 1e-4).all() and (kept[:, 3] <= h + 1e-4).all()
    assert (kept[:, 2] - kept[:, 0] >= min_size - 1e-4).all() and (kept[:, 3] - kept[:, 1] >= min_size - 1e-4).all()
    if preset == "none":
        # resize only: every box of at least a pixel after scaling survives, scaled (hand formula)
        scale = np.array([w / w0, h / h0, w / w0, h / h0])
        expected = boxes * scale
        # (float32 normalised coordinates inside albumentations: a box of exactly 1 px may go either way)
        big = ((expected[:, 2] - expected[:, 0]) >= 1.001) & ((expected[:, 3] - expected[:, 1]) >= 1.001)
        assert set(np.flatnonzero(big).tolist()) <= set(index.tolist())
        np.testing.assert_allclose(kept, expected[index], atol=1e-3)


@pytest.mark.parametrize("preset", PRESETS)
@FAST
@given(scene=scenes())
def test_boxes_follow_the_pixels(preset, scene):
    """Each surviving box equals the extent of its own pixels in a mask sent through the same
    transforms (albumentations' mask path, nearest-neighbour): our zoom-out and crop move boxes and
    pixels together, and so do flip, letterbox and affine."""
    (h0, w0), (h, w), boxes, _ = scene
    mask = np.zeros((h0, w0), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        mask[y1:y2, x1:x2] = k + 1
    out = run_preset(preset, scene, mask)
    out_mask = out["mask"]
    kept = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
    for box, k in zip(kept, np.asarray(out["box_index"], dtype=np.int64)):
        ys, xs = np.nonzero(out_mask == k + 1)
        if len(xs) == 0:  # a sliver thinner than the mask's sampling grid
            assert min(box[2] - box[0], box[3] - box[1]) < 2.5
            continue
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        np.testing.assert_allclose(box, extent, atol=MASK_TOLERANCE[preset], err_msg=f"box {k}")


# A mask edge sits on the pixel grid: within 1 px of the true edge after one nearest-neighbour
# resampling (ssd: zoom-out and crop are exact, then one resize; letterbox: one resize, an exact pad; flip:
# one resize, an exact flip),
# within 1 x 1.5 + 1 after two with an up-scaling affine warp of up to 1.5 between them (yolo:
# letterbox, then affine).
MASK_TOLERANCE = {"none": 1.0 + 1e-6, "flip": 1.0 + 1e-6, "ssd": 1.0 + 1e-6, "yolo": 2.5, "letterbox": 1.0 + 1e-6}


def _normalised(boxes, h, w):
    return np.concatenate([boxes / [w, h, w, h], np.zeros((len(boxes), 1))], 1)  # plus a label column


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), min_iou=st.sampled_from([0.1, 0.3, 0.5, 0.7]),
       num=st.integers(1, 25))
def test_min_iou_crop_meets_its_constraint(seed, min_iou, num):
    """A patch other than the whole image holds an object centre, overlaps one of the objects whose
    centre it holds with IoU >= min_iou (torchvision's box_iou as the reference), is 0.3..1 of the side
    and of aspect 1/2..2."""
    h, w = 240, 320
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 20, h - 20], (num, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 120, (num, 2))], 1).clip(0, [w, h, w, h])
    crop = MinIoURandomCrop(min_ious=(min_iou,))
    crop.set_random_seed(seed)
    x1, y1, x2, y2 = crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": _normalised(boxes, h, w)})[
        "crop_coords"]
    if (x1, y1, x2, y2) == (0, 0, w, h):
        return
    pw, ph = x2 - x1, y2 - y1
    assert 0.3 * w - 1 <= pw <= w and 0.3 * h - 1 <= ph <= h
    assert 0.5 - 0.02 <= ph / pw <= 2 + 0.02
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2)
    assert inside.any()
    iou = box_iou(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64), torch.from_numpy(boxes))[0].numpy()
    assert iou[inside].max() >= min_iou - 1e-9


def test_min_iou_crop_crops_images_with_many_objects():
    """BCCD-like scenes (20 cells of 40-100 px spread over 640x480): with modes {whole image, IoU >= 0.1}
    the crop must happen in nearly every call of the second mode. (Requiring the IoU of *every*
    object, any patch leaving one cell out failed, and the whole image came back nearly always.)"""
    h, w = 480, 640
    rng = np.random.default_rng(0)
    crop = MinIoURandomCrop(min_ious=(0.1,))
    whole = 0
    for seed in range(400):
        xy = rng.uniform(0, [w - 100, h - 100], (20, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(40, 100, (20, 2))], 1)
        crop.set_random_seed(seed)
        coords = crop.get_params_dependent_on_data({"shape": (h, w, 3)}, {"bboxes": _normalised(boxes, h, w)})
        whole += coords["crop_coords"] == (0, 0, w, h)
    assert whole < 0.6 * 400, whole  # half the calls pick 'whole image'; nearly all others crop


def _hue_degrees(image):
    r, g, b = image.reshape(-1, 3)[0] / 255.0
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


def test_ssd_photometric_hue_and_saturation_ranges():
    """Hue moves by at most 18 degrees (colorsys, the standard library, as the reference) and
    saturation by a factor 0.5..1.5 (torchvision's adjust_saturation at the two ends as the
    reference); both ranges are used, not just their middle."""
    from torchvision.transforms.functional import adjust_saturation

    hue_op, sat_op = ssd_photometric()[3], ssd_photometric()[2]
    hue_op.p = sat_op.p = 1.0
    image = np.zeros((8, 8, 3), np.uint8)
    image[...] = (200, 60, 40)  # a saturated red-orange
    hue0 = _hue_degrees(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    low, high = (adjust_saturation(chw, f)[:, 0, 0].float().numpy() for f in (0.5, 1.5))
    shifts, colours = [], []
    for seed in range(200):
        shifts.append((_hue_degrees(A.Compose([hue_op], seed=seed)(image=image)["image"]) - hue0 + 180) % 360 - 180)
        colours.append(A.Compose([sat_op], seed=seed)(image=image)["image"][0, 0].astype(np.float32))
    shifts, colours = np.abs(shifts), np.stack(colours)
    assert shifts.max() <= 18 + 2.5 and shifts.max() >= 12  # uint8 hue: 2 degrees a step in OpenCV
    # the colour moves along the line from its grey (factor 0) through itself (1): between the ends
    lo, hi = np.minimum(low, high), np.maximum(low, high)
    assert ((colours >= lo - 1.5) & (colours <= hi + 1.5)).all()
    span = np.abs(high - low)
    assert (np.abs(colours - low).min(0) < 0.1 * span).all() and (np.abs(colours - high).min(0) < 0.1 * span).all()


class ListSource:
    """Fixed images and boxes, for dataset tests."""

    classes = ["a", "b"]

    def __init__(self, images, records):
        self.images = dict(zip([r.file for r in records], images))

    def load(self, record):
        return self.images[record.file], record


def test_dropped_boxes_are_counted_per_batch():
    """A box that shrinks under min_box_size in the resize is dropped, and the batch counts it."""
    records = [
        Record(0, "a", 200, 100, [[10, 10, 60, 60], [100, 50, 101, 51]], [0, 1]),  # the 1x1 px box goes
        Record(1, "b", 200, 100, [[0, 0, 200, 100]], [1]),
    ]
    images = [np.zeros((100, 200, 3), np.uint8)] * 2
    ds = DetectionDataset(ListSource(images, records), records, build_transform("none", (50, 50)))
    batch = collate_detection([ds[0], ds[1]])
    assert int(batch["num_dropped_boxes"]) == 1
    assert batch["mask"].sum().item() == 2
    assert batch["labels"][0, 0].item() == 0  # the surviving box keeps its own label
    torch.testing.assert_close(batch["boxes"][0, 0], torch.tensor([2.5, 5.0, 15.0, 30.0]))


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown augment preset 'mosaic'.*ssd, yolo, none"):
        build_transform("mosaic", (32, 32))
