"""Albumentations pipelines (presets chosen by ``configs/augment/``) and SSD's two geometric ops.

Boxes travel as ``pascal_voc`` (xyxy pixels). A box index rides along as the only label field,
so labels, difficult flags and per-box weights of the surviving boxes are picked up afterwards
with one indexing operation, whatever the transforms dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
from albumentations.core.transforms_interface import BaseTransformInitSchema
import cv2
import numpy as np

import torch
from torchvision.ops import box_iou


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

    Each call picks one of: the whole image, or a patch whose minimum IoU with the objects is
    0.1, 0.3, 0.5, 0.7 or 0.9, of 0.3 to 1 times the image side and aspect ratio 1/2 to 2, whose
    centre region holds at least one object centre (up to ``max_trials`` samples, else the whole
    image). Boxes crossing the border are clipped by the pipeline; those left with less than
    ``min_visibility`` of their area are dropped there.
    """

    class InitSchema(BaseTransformInitSchema):
        min_ious: Sequence[float]
        min_scale: float
        max_trials: int

    def __init__(self, min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), min_scale: float = 0.3,
                 max_trials: int = 50, p: float = 1.0):
        super().__init__(p=p)
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.max_trials = max_trials

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = {"crop_coords": (0, 0, width, height)}
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))[:, :4] * [width, height, width, height]
        mode = self.py_random.choice((None,) + self.min_ious)
        if mode is None or len(bboxes) == 0:
            return whole
        centres = (bboxes[:, :2] + bboxes[:, 2:]) / 2
        for _ in range(self.max_trials):
            w = self.py_random.uniform(self.min_scale * width, width)
            h = self.py_random.uniform(self.min_scale * height, height)
            if not 0.5 <= h / w <= 2:
                continue
            x1 = self.py_random.uniform(0, width - w)
            y1 = self.py_random.uniform(0, height - h)
            patch = np.array([[x1, y1, x1 + w, y1 + h]])
            if box_iou(torch.from_numpy(patch), torch.from_numpy(bboxes)).min() < mode:
                continue
            inside = (centres[:, 0] > x1) & (centres[:, 1] > y1) & (centres[:, 0] < x1 + w) & (centres[:, 1] < y1 + h)
            if inside.any():
                return {"crop_coords": (int(x1), int(y1), int(x1 + w), int(y1 + h))}
        return whole


def photometric(strength: float = 1.0) -> list[A.BasicTransform]:
    """SSD's photometric distortions: brightness, contrast, saturation, hue (each with p 0.5)."""
    return [
        A.RandomBrightnessContrast(brightness_limit=0.125 * strength, contrast_limit=0.5 * strength, p=0.5),
        A.HueSaturationValue(hue_shift_limit=int(18 * strength), sat_shift_limit=int(40 * strength),
                             val_shift_limit=0, p=0.5),
    ]


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
) -> A.Compose:
    """The augmentation pipeline of ``preset`` ending in a resize to ``size`` = (H, W).

    Presets: 'ssd' (photometric, zoom-out, min-IoU crop, flip), 'none' (resize only, for evaluation).
    Call it as ``t(image=..., bboxes=(N,4) xyxy, box_index=np.arange(N))``.
    """
    height, width = int(size[0]), int(size[1])
    resize = A.Resize(height, width, interpolation=cv2.INTER_LINEAR)
    if preset == "ssd":
        ops = [
            ZoomOut(zoom_out_max_scale, fill=fill, p=zoom_out_prob),
            MinIoURandomCrop(),
            resize,
            A.HorizontalFlip(p=flip_prob),
            *photometric(),
        ]
    elif preset == "none":
        ops = [resize]
    else:
        raise ValueError(f"unknown augment preset {preset!r} (have: ssd, none)")
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["box_index"],
            min_visibility=min_visibility,
            min_width=min_box_size,
            min_height=min_box_size,
            clip=True,
        ),
        seed=seed,
    )
