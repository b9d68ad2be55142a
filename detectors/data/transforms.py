"""Albumentations pipelines (presets chosen by ``configs/augment/``) and SSD's two geometric ops.

Boxes travel as ``pascal_voc`` (xyxy pixels). A box index rides along as the only label field,
so labels, difficult flags and per-box weights of the surviving boxes are picked up afterwards
with one indexing operation, whatever the transforms dropped.

At the end of the pipeline albumentations clips the boxes to the image and drops those left with
less than ``min_visibility`` of their area or narrower / lower than ``min_box_size`` pixels, so
what comes out is always inside the image and at least ``min_box_size`` wide and high. The dataset
counts what was dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import BaseTransformInitSchema
from torchvision.ops import box_iou

PRESETS = ("ssd", "yolo", "none", "letterbox", "flip")
# evaluation resize (``eval_resize`` of configs/augment/) -> the preset that does only that ('none_float':
# evaluation only, its images are float32)
EVAL_PRESETS = {"stretch": "none", "letterbox": "letterbox", "stretch_float": "none_float"}
# the resizes that stretch the whole image to the input (frame: the two scales, no padding)
STRETCH_RESIZES = ("stretch", "stretch_float")


class FloatResize(A.Resize):
    """Resize to (``height``, ``width``) in float32, never rounded back to uint8: torch's bilinear
    ``interpolate`` (``align_corners=False``, no antialiasing), what torchvision's detection transform
    (``GeneralizedRCNNTransform``) does to its float image. An imported torchvision model then sees its own
    input (a uint8 round trip moves pixels by up to 0.5, and its outputs by far more than 1e-3 px); the image
    comes out (H, W, 3) float32 in 0..255, four times the bytes of uint8. Boxes scale as ``A.Resize``'s."""

    def apply(self, img: np.ndarray, *args: Any, **params: Any) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        out = torch.nn.functional.interpolate(pixels, size=(self.height, self.width), mode="bilinear",
                                              align_corners=False)
        return out[0].permute(1, 2, 0).numpy()


class ZoomOut(A.Pad):
    """SSD's "expand": place the image at a random spot of a canvas up to ``max_scale`` times larger,
    filled with ``fill`` (the dataset mean), so the network sees small objects (Liu et al. 2016, sec. 3.6)."""

    class InitSchema(BaseTransformInitSchema):
        max_scale: float
        fill: Sequence[float] | float

    def __init__(self, max_scale: float = 4.0, fill: Sequence[float] | float = (124, 116, 104), p: float = 0.5):
        super().__init__(padding=0, fill=tuple(fill) if isinstance(fill, Sequence) else fill,
                         border_mode=cv2.BORDER_CONSTANT, p=p)
        self.max_scale = max_scale

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.py_random.uniform(1.0, self.max_scale)
        new_h, new_w = int(height * scale), int(width * scale)
        top = self.py_random.randint(0, new_h - height)
        left = self.py_random.randint(0, new_w - width)
        return {"pad_top": top, "pad_bottom": new_h - height - top, "pad_left": left, "pad_right": new_w - width - left}


class MinIoURandomCrop(A.augmentations.crops.transforms.BaseCrop):
    """SSD's patch sampling (Liu et al. 2016, sec. 2.2 "Data augmentation").

    Each call picks one of: the whole image; a free random patch (``min_iou`` 0); or a patch that
    overlaps an object with IoU >= 0.1, 0.3, 0.5, 0.7 or 0.9. A patch is 0.3 to 1 times the image
    side, of aspect ratio 1/2 to 2, and must hold at least one object centre; the IoU condition is
    on the objects whose centre it holds (the best of them), as the Caffe original and torchvision's
    ``RandomIoUCrop`` do. Requiring it of *every* object (MMDetection's reading) rejects nearly all
    patches of an image with many spread-out objects: on BCCD (about 20 cells per image) the crop
    then practically never happened. All ``max_trials`` candidates are drawn at once (one IoU
    matrix), the first that qualifies wins; none qualifying gives the whole image. Boxes crossing the
    border are clipped by the pipeline; those left with less than ``min_visibility`` of their area
    are dropped there.
    """

    class InitSchema(BaseTransformInitSchema):
        min_ious: Sequence[float]
        min_scale: float
        max_trials: int

    def __init__(self, min_ious: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9), min_scale: float = 0.3,
                 max_trials: int = 50, p: float = 1.0):
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = {"crop_coords": (0, 0, width, height)}
        bboxes = np.asarray(data.get("bboxes", []), dtype=np.float64)
        # albumentations keeps boxes normalised inside, label fields as extra columns
        bboxes = bboxes[:, :4] * [width, height, width, height] if bboxes.size else np.zeros((0, 4))
        mode = self.py_random.choice((None, *self.min_ious))
        if mode is None or len(bboxes) == 0:
            return whole
        rng, n = self.random_generator, self.max_trials
        w = rng.uniform(self.min_scale * width, width, n)
        h = rng.uniform(self.min_scale * height, height, n)
        # integer patches (what is cut), at least one pixel wide and high
        left = (rng.uniform(0, 1, n) * (width - w)).astype(np.int64)
        top = (rng.uniform(0, 1, n) * (height - h)).astype(np.int64)
        right = np.maximum(left + 1, (left + w).astype(np.int64)).clip(max=width)
        bottom = np.maximum(top + 1, (top + h).astype(np.int64)).clip(max=height)
        patches = np.stack([left, top, right, bottom], 1).astype(np.float64)  # (T, 4)

        centres = (bboxes[:, :2] + bboxes[:, 2:]) / 2  # (N, 2)
        inside = ((centres[None, :, 0] > patches[:, None, 0]) & (centres[None, :, 1] > patches[:, None, 1])
                  & (centres[None, :, 0] < patches[:, None, 2]) & (centres[None, :, 1] < patches[:, None, 3]))
        iou = box_iou(torch.from_numpy(patches), torch.from_numpy(bboxes)).numpy()  # (T, N)
        best = np.where(inside, iou, -1.0).max(1)
        ratio = h / w
        ok = (ratio >= 0.5) & (ratio <= 2.0) & inside.any(1) & (best >= mode)
        if not ok.any():
            return whole
        t = int(np.argmax(ok))
        return {"crop_coords": (int(left[t]), int(top[t]), int(right[t]), int(bottom[t]))}


def ssd_photometric() -> list[A.BasicTransform]:
    """SSD's photometric distortions, each applied with probability 1/2 (ssd.pytorch's
    ``PhotometricDistort`` without the channel swap): brightness +-32, contrast x[0.5, 1.5],
    saturation x[0.5, 1.5] (torchvision's definition: a blend with the grey image, not a scaling of
    HSV's S), hue +-18 degrees.

    ``ColorJitter``'s hue is a fraction of the colour circle, the same for every image dtype
    (``HueSaturationValue``'s shift is in OpenCV's 0..179 units for uint8, 2 degrees each)."""
    return [
        A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.5, hue=0.0, p=0.5),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=18 / 360, p=0.5),
    ]


def yolo_hsv(hue: float, saturation: float, value: float) -> A.BasicTransform:
    """YOLO's HSV jitter (gains ``1 +- gain`` on saturation and value, ``+- hue`` of the colour circle)."""
    return A.ColorJitter(brightness=value, contrast=0.0, saturation=saturation, hue=hue, p=1.0)


def letterbox(height: int, width: int, fill: Sequence[float] | float) -> list[A.BasicTransform]:
    """Resize keeping the aspect ratio so the image fits (``height``, ``width``), then pad it centred
    to that size with ``fill``: YOLOv5's ``letterbox`` (its val mode too). :func:`letterbox_frame`
    says where it puts the image."""
    return [
        A.LongestMaxSize(max_size_hw=(height, width), interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(min_height=height, min_width=width, position="center",
                      border_mode=cv2.BORDER_CONSTANT, fill=fill),
    ]


def letterbox_frame(orig_size: Sequence[int], size: Sequence[int]) -> tuple[float, float, float, float]:
    """``(scale_x, scale_y, pad_left, pad_top)`` of :func:`letterbox` from an image of ``orig_size``
    (H0, W0) to ``size`` (H, W): ``x = x0 * scale_x + pad_left``, ``y = y0 * scale_y + pad_top``.

    Albumentations' arithmetic, step by step, so the frame is exact: ``LongestMaxSize`` takes the
    smaller of ``H / H0`` and ``W / W0`` and rounds each side with Python's ``round`` (half to even),
    so the two sides' scales differ slightly (``new_w / W0`` vs ``new_h / H0``); boxes, stored
    normalised, scale with the rounded sides. ``PadIfNeeded(position="center")`` puts the odd pixel of
    padding after the image (``pad_top = int((H - new_h) / 2)``), and pads nothing where the side
    already fits.
    """
    h0, w0 = int(orig_size[0]), int(orig_size[1])
    height, width = int(size[0]), int(size[1])
    scale = min(height / h0, width / w0)
    new_h, new_w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    pad_top = int((height - new_h) / 2.0) if new_h < height else 0
    pad_left = int((width - new_w) / 2.0) if new_w < width else 0
    return new_w / w0, new_h / h0, float(pad_left), float(pad_top)


def input_frame(orig_size: Sequence[int], size: Sequence[int], resize: str) -> tuple[float, float, float, float]:
    """Where the evaluation transform of ``resize`` ('stretch' or 'letterbox', see
    :func:`build_eval_transform`) puts an image of ``orig_size`` (H0, W0) in the network input of
    ``size`` (H, W): ``(scale_x, scale_y, pad_left, pad_top)`` with ``x = x0 * scale_x + pad_left``
    (``y`` likewise). Evaluation maps predictions back with its inverse."""
    if resize in STRETCH_RESIZES:
        return int(size[1]) / int(orig_size[1]), int(size[0]) / int(orig_size[0]), 0.0, 0.0
    if resize == "letterbox":
        return letterbox_frame(orig_size, size)
    raise ValueError(f"unknown eval_resize {resize!r} (have: {', '.join(EVAL_PRESETS)})")


def build_eval_transform(resize: str, size: Sequence[int], fill: Sequence[float] | float = (124, 116, 104),
                         seed: int | None = None) -> A.Compose:
    """The evaluation pipeline (nothing random): ``resize`` = 'stretch' resizes to ``size`` (H, W)
    ignoring the aspect ratio (preset 'none'); 'letterbox' keeps it and pads with ``fill`` (preset
    'letterbox', what the 'yolo' preset trains on before its random warp); 'stretch_float' stretches
    in float32 without rounding (``FloatResize``: torchvision's detection models' resize). No ground-truth box is
    dropped, however small it gets: evaluation scores against every box of the annotation file."""
    if resize not in EVAL_PRESETS:
        raise ValueError(f"unknown eval_resize {resize!r} (have: {', '.join(EVAL_PRESETS)})")
    return build_transform(EVAL_PRESETS[resize], size, fill=fill, seed=seed, min_visibility=0.0, min_box_size=0.0)


def build_transform(
    preset: str,
    size: Sequence[int],
    fill: Sequence[float] = (124, 116, 104),
    zoom_out_max_scale: float = 4.0,
    zoom_out_prob: float = 0.5,
    flip_prob: float = 0.5,
    min_visibility: float = 0.25,
    min_box_size: float = 1.0,
    seed: int | None = None,
    scale_range: Sequence[float] = (0.5, 1.5),
    translate: float = 0.1,
    hsv_gains: Sequence[float] = (0.015, 0.7, 0.4),
) -> A.Compose:
    """The augmentation pipeline of ``preset`` producing images of ``size`` = (H, W).

    Presets:
        'ssd': zoom-out (``zoom_out_max_scale``, ``zoom_out_prob``, canvas ``fill``), min-IoU random
            crop, resize, horizontal flip (``flip_prob``), photometric distortion. The distortions
            are per pixel, so they run last, on the small image; the one difference from the paper's
            order is that the zoom-out canvas gets distorted too.
        'yolo': letterbox resize (aspect kept, padded with ``fill``), random scale (``scale_range``)
            and translation (+-``translate`` of the side) in one affine warp, HSV jitter
            (``hsv_gains`` = hue, saturation, value as in YOLOv5's hyp.scratch), horizontal flip.
        'flip': resize, horizontal flip (``flip_prob``): Faster R-CNN's only augmentation.
        'none': resize only (evaluation with ``eval_resize`` 'stretch').
        'letterbox': letterbox only (evaluation with ``eval_resize`` 'letterbox', as after 'yolo').
        'none_float': ``FloatResize`` only (evaluation with ``eval_resize`` 'stretch_float'; float32 images,
            not a training preset).
    ``min_visibility`` and ``min_box_size`` (pixels) decide which boxes are dropped (see the module doc).

    Call it as ``t(image=(H0, W0, 3) uint8, bboxes=(N, 4) xyxy, box_index=np.arange(N))``; it returns
    the image (H, W, 3), the surviving ``bboxes`` and their ``box_index``.
    """
    height, width = int(size[0]), int(size[1])
    resize = A.Resize(height, width, interpolation=cv2.INTER_LINEAR)
    fill_value = tuple(float(f) for f in fill) if isinstance(fill, Sequence) else float(fill)
    if preset == "ssd":
        ops = [
            ZoomOut(zoom_out_max_scale, fill=fill, p=zoom_out_prob),
            MinIoURandomCrop(),
            resize,
            A.HorizontalFlip(p=flip_prob),
            *ssd_photometric(),
        ]
    elif preset == "yolo":
        ops = [
            *letterbox(height, width, fill_value),
            A.Affine(scale=(float(scale_range[0]), float(scale_range[1])), keep_ratio=True,
                     translate_percent=(-translate, translate), border_mode=cv2.BORDER_CONSTANT,
                     fill=fill_value, p=1.0),
            yolo_hsv(*hsv_gains),
            A.HorizontalFlip(p=flip_prob),
        ]
    elif preset == "flip":
        ops = [resize, A.HorizontalFlip(p=flip_prob)]
    elif preset == "none":
        ops = [resize]
    elif preset == "letterbox":
        ops = letterbox(height, width, fill_value)
    elif preset == "none_float":
        ops = [FloatResize(height, width)]
    else:
        raise ValueError(f"unknown augment preset {preset!r} (have: {', '.join(PRESETS)})")
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["box_index"],
            min_visibility=min_visibility,
            min_width=min_box_size,
            min_height=min_box_size,
            clip=True,
            # one filter at the end instead of one after every transform (8 in 'ssd'): the same boxes
            # survive, since the only ops that cut boxes (crop, affine) are followed by none that
            # cut again, and visibility is area kept over area before clipping either way
            check_each_transform=False,
        ),
        seed=seed,
    )
