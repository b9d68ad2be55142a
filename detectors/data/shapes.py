"""Procedurally generated shapes: the default detection dataset (no download needed).

Background ("textured"): a smooth colour field (bilinear gradient of four corner
colours, or blurred colour blobs), half the time overlaid with semi-transparent
stripes or a checkerboard (random angle and period), and half the time with
colour noise over the finished image, objects included, so a flat colour does not
give an object away. ``background="flat"``: one uniform colour, no noise (tests).

Objects: ``min_objects..max_objects`` shapes of ``SHAPE_CLASSES``, circumscribed
diameter log-uniform in ``[min_size, max_size] * min(H, W)``, random rotation,
colour far (RGB distance >= 120) from the mean colour it covers and from the
objects it occludes. Later objects occlude earlier ones; a placement is re-drawn
if any two boxes would get IoU > ``max_overlap`` or an earlier object would keep
less than half of its pixels visible.

Boxes: ``(N, 4)`` float32 ``xyxy``, absolute pixels, pixel ``i`` spanning ``[i, i+1)``
(visible pixels in columns ``a..b`` give ``x1 = a, x2 = b + 1``): the tight extent
of each object's *visible* pixels, read from the drawn masks, so always inside
the image and non-degenerate. Labels ``(N,)`` int64 index ``SHAPE_CLASSES``.

Determinism: ``sample(i)`` draws only from ``np.random.default_rng([seed, i])``
(plus a noise tile fixed at construction), so any worker can generate any index
in any order; different seeds give different datasets (train 0, val 1, ...).

Speed (what it costs: BENCHMARKS.md, "Data loading"): all full-image work is cv2 on
uint8 (numpy ops over a trailing RGB axis are several times slower); shapes are
rasterised into small ROIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "cross")

_SHIFT = 4  # cv2 fractional bits: sub-pixel placement so small shapes are not snapped to the grid
_MIN_CONTRAST = 120.0  # RGB distance between object colour and the mean colour it covers
_NOISE_PAD = 64  # the noise tile is this much larger than the image: random crop offsets


def _unit_polygon(angles_deg: list[float], radii: list[float]) -> np.ndarray:
    """Polygon ``(K, 2)`` from polar coords, scaled to circumradius 1: a shape of
    radius r centred >= r from every border is never cut by the image edge."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    pts = np.stack([np.cos(a), np.sin(a)], axis=1) * np.asarray(radii)[:, None]
    return pts / np.linalg.norm(pts, axis=1).max()


_ARM = math.degrees(math.atan(0.33))  # cross arms are 0.33 as wide as they are long (half-widths)
_POLYGONS: dict[str, np.ndarray] = {
    "square": _unit_polygon([45, 135, 225, 315], [1] * 4),
    "triangle": _unit_polygon([90, 210, 330], [1] * 3),
    "star": _unit_polygon([90 + 36 * k for k in range(10)], [1.0, 0.42] * 5),
    "cross": _unit_polygon([a for k in range(0, 360, 90) for a in (k - _ARM, k + _ARM, k + 45)],
                           [math.hypot(1, 0.33), math.hypot(1, 0.33), math.sqrt(2) * 0.33] * 4),
}


def _draw_shape(canvas: np.ndarray, name: str, cx: float, cy: float, r: float,
                angle: float, aspect: float, colour: int | list[int]) -> None:
    """Fill shape ``name`` of circumradius ``r`` centred at pixel ``(cx, cy)`` of ``canvas``."""
    s = 1 << _SHIFT
    centre = (round(cx * s), round(cy * s))
    if name == "circle":
        cv2.circle(canvas, centre, round(r * s), colour, -1, cv2.LINE_8, _SHIFT)
    elif name == "ellipse":  # aspect well below 1 so ellipses never pass for circles
        axes = (round(r * s), round(r * aspect * s))
        cv2.ellipse(canvas, centre, axes, math.degrees(angle), 0, 360, colour, -1,
                    cv2.LINE_8, _SHIFT)
    else:
        c, sn = math.cos(angle), math.sin(angle)
        pts = (_POLYGONS[name] @ np.array([[c, sn], [-sn, c]]) * r + (cx, cy)) * s
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], colour, cv2.LINE_8, _SHIFT)


def _stripes(h: int, w: int, period: float, angle: float, phase: float) -> np.ndarray:
    """``(h, w)`` uint8 0/1 stripes of ``period`` px, normal at ``angle``. One ``fillPoly``
    of band quads: per-pixel modulo in numpy costs ~1 ms per 300x300 image."""
    normal = np.array([math.cos(angle), math.sin(angle)])
    along = np.array([-normal[1], normal[0]])
    half_diag = 0.5 * math.hypot(h, w) + period
    offsets = np.arange(-half_diag, half_diag, period) + phase % period  # band starts (K,)
    start = offsets[:, None] * normal + (w / 2, h / 2)  # (K, 2)
    end = start + 0.5 * period * normal
    quads = np.stack([start - half_diag * along, start + half_diag * along,
                      end + half_diag * along, end - half_diag * along], axis=1)  # (K, 4, 2)
    mask = np.zeros((h, w), np.uint8)
    quads = np.round(quads * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, list(quads), 1, cv2.LINE_8, _SHIFT)
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@dataclass
class _Scene:
    """Per-image drawing state. ``owner`` ``(H, W)`` int16 is the index of the object
    visible at each pixel (-1: background); ``spare[j]`` is how many more pixels
    object ``j`` may lose to occlusion (half its drawn area minus what it lost)."""

    img: np.ndarray  # (H, W, 3) uint8
    owner: np.ndarray
    boxes: list[np.ndarray] = field(default_factory=list)  # visible-pixel boxes (4,) float32
    colours: list[np.ndarray] = field(default_factory=list)
    spare: list[float] = field(default_factory=list)


class ShapesGenerator:
    """Deterministic procedural detection images (see the module docstring for the recipe).

    Args:
        num_images: dataset length; ``sample`` accepts ``0 <= index < num_images``.
        image_size: ``(H, W)`` of the generated images.
        seed: dataset seed; image ``i`` depends only on ``(seed, i)``.
        min_objects, max_objects: inclusive range of objects per image; an object
            beyond ``min_objects`` that finds no valid spot in 30 tries is dropped (the
            first ``min_objects`` get 200 tries, and if one still finds none, the image is
            drawn again with every object at ``min_size``).
        min_size, max_size: object diameter as a fraction of ``min(H, W)`` (log-uniform).
        max_overlap: maximum IoU between any two boxes of an image.
        background: ``"textured"`` (default) or ``"flat"`` (uniform colour, no noise).
    """

    def __init__(self, num_images: int, image_size: tuple[int, int] = (300, 300),
                 seed: int = 0, min_objects: int = 1, max_objects: int = 8,
                 min_size: float = 0.06, max_size: float = 0.6,
                 max_overlap: float = 0.3, background: str = "textured") -> None:
        if not (0 <= min_objects <= max_objects and 0 < min_size <= max_size <= 1
                and 0 <= max_overlap <= 1 and background in ("textured", "flat")):
            raise ValueError("need 0 <= min_objects <= max_objects, 0 < min_size <= max_size <= 1, "
                             "0 <= max_overlap <= 1, background 'textured' or 'flat'")
        self.num_images = num_images
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_size, self.max_size, self.max_overlap = min_size, max_size, max_overlap
        self.background = background
        self.classes: tuple[str, ...] = SHAPE_CLASSES
        # Drawing fresh normal noise costs more than the rest of the image; a fixed
        # tile read at a random offset per image looks the same and keeps determinism.
        h, w = self.image_size
        noise = np.random.default_rng(20240611).standard_normal((h + _NOISE_PAD, w + _NOISE_PAD, 3))
        self._noise = np.clip(128.0 + 32.0 * noise, 0, 255).round().astype(np.uint8)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.sample(index)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns image ``(H, W, 3)`` uint8 RGB, boxes ``(N, 4)`` float32 xyxy absolute pixels,
        labels ``(N,)`` int64 in ``0..C-1``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        h, w = self.image_size
        background = self._make_background(rng)
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        # Sizes and positions are re-drawn on every try, so a small spot is eventually found: the
        # required objects get many more tries. Large early objects may still leave no room for a
        # required one (no overlap allowed, small image): then the scene starts again with every
        # object at ``min_size``.
        for smallest in (False, True):
            scene = _Scene(background.copy(), np.full((h, w), -1, np.int16))
            labels: list[int] = []
            for k in range(count):
                label = int(rng.integers(len(self.classes)))
                placed = any(self._try_place(rng, label, scene, smallest)
                             for _ in range(200 if k < self.min_objects else 30))
                if placed:
                    labels.append(label)
                elif k < self.min_objects:
                    break
            if len(labels) >= self.min_objects:
                break
        img = scene.img
        if self.background == "textured" and rng.random() < 0.5:
            # The tile stores 128 + 32 * N(0, 1): scale by amp / 32 and remove the offset.
            oy, ox = int(rng.integers(0, _NOISE_PAD + 1)), int(rng.integers(0, _NOISE_PAD + 1))
            a = rng.uniform(4.0, 20.0) / 32.0
            img = cv2.addWeighted(img, 1.0, self._noise[oy:oy + h, ox:ox + w], a, -128.0 * a)
        boxes = np.stack(scene.boxes) if scene.boxes else np.zeros((0, 4), np.float32)
        return img, boxes, np.asarray(labels, dtype=np.int64)

    def _make_background(self, rng: np.random.Generator) -> np.ndarray:
        """Background ``(H, W, 3)`` uint8 (full-size work in cv2, see the module docstring)."""
        h, w = self.image_size
        if self.background == "flat":
            small = rng.integers(0, 256, (1, 1, 3)).astype(np.uint8)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        # Smooth fields are built on a coarse grid and upsampled: cheap and blur-free.
        sh, sw = max(h // 8, 4), max(w // 8, 4)
        if rng.random() < 0.5:  # bilinear gradient between four corner colours
            c = rng.uniform(0, 255, (2, 2, 3))
            ty = np.linspace(0, 1, sh)[:, None, None]
            tx = np.linspace(0, 1, sw)[None, :, None]
            small = ((1 - ty) * ((1 - tx) * c[0, 0] + tx * c[0, 1])
                     + ty * ((1 - tx) * c[1, 0] + tx * c[1, 1])).astype(np.float32)
        else:  # soft colour clouds: random discs on a coarse canvas, blurred
            small = np.empty((sh, sw, 3), np.float32)
            small[:] = rng.uniform(0, 255, 3)
            for _ in range(int(rng.integers(3, 10))):
                centre = (int(rng.integers(sw)), int(rng.integers(sh)))
                cv2.circle(small, centre, int(rng.integers(1, max(sh, sw) // 3 + 2)),
                           rng.uniform(0, 255, 3).tolist(), -1)
            small = cv2.GaussianBlur(small, (0, 0), max(sh, sw) / 12)
        img = cv2.resize(small.round().astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
        u = rng.random()
        if u < 0.5:  # sharp high-frequency pattern, semi-transparent so objects dominate
            period, angle = rng.uniform(6.0, 40.0), rng.uniform(0, math.pi)
            pat = _stripes(h, w, period, angle, rng.uniform(0, period))
            if u >= 0.25:  # checkerboard = XOR of two perpendicular stripe sets
                pat ^= _stripes(h, w, period, angle + math.pi / 2, rng.uniform(0, period))
            a = rng.uniform(0.15, 0.45)
            colour = tuple((rng.uniform(0, 255, 3) * a).tolist()) + (0.0,)
            blended = cv2.add(cv2.convertScaleAbs(img, alpha=1.0 - a), colour)
            cv2.copyTo(blended, pat, img)
        return img

    def _try_place(self, rng: np.random.Generator, label: int, scene: _Scene, smallest: bool = False) -> bool:
        """Sample one placement of class ``label`` (of ``min_size`` if ``smallest``); if valid, draw it
        into ``scene`` (True)."""
        h, w = self.image_size
        name = self.classes[label]
        log_size = rng.uniform(math.log(self.min_size), math.log(self.min_size if smallest else self.max_size))
        r = 0.5 * min(h, w) * math.exp(log_size)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        angle, aspect = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 0.6)
        # Work in a small ROI: full-image masks would dominate the run time.
        x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
        x1, y1 = min(int(cx + r) + 2, w), min(int(cy + r) + 2, h)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        _draw_shape(mask, name, cx - x0, cy - y0, r, angle, aspect, 1)
        bx, by, bw, bh = cv2.boundingRect(mask)
        if bw == 0:
            return False
        box = np.array([x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh], np.float32)
        m, n = mask.view(bool), len(scene.boxes)
        hit = np.zeros(0, np.int64)
        if n:
            old = np.stack(scene.boxes)
            if (_iou(box[None], old) > self.max_overlap).any():
                return False
            hidden = np.bincount(scene.owner[y0:y1, x0:x1][m] + 1, minlength=n + 1)[1:]
            hit = np.flatnonzero(hidden)
            if any(hidden[j] > scene.spare[j] for j in hit):
                return False
            if hit.size:  # occluded objects' visible extents may shrink: re-check all pairs
                trial = scene.owner.copy()
                trial[y0:y1, x0:x1][m] = n
                for j in hit:
                    ox0, oy0, ox1, oy1 = old[j].astype(int)
                    ex, ey, ew, eh = cv2.boundingRect((trial[oy0:oy1, ox0:ox1] == j).view(np.uint8))
                    old[j] = (ox0 + ex, oy0 + ey, ox0 + ex + ew, oy0 + ey + eh)
                every = np.vstack([old, box[None]])
                iou = _iou(every, every)
                np.fill_diagonal(iou, 0)
                if (iou > self.max_overlap).any():
                    return False
                for j in hit:
                    scene.spare[j] -= int(hidden[j])
                    scene.boxes[j] = old[j]
        # Colour: far from the mean it covers (background and all) and from the
        # objects it occludes, so every visible part keeps a clear edge.
        roi = scene.img[y0:y1, x0:x1]
        candidates = rng.integers(0, 256, (16, 3)).astype(np.float64)
        score = np.linalg.norm(candidates - cv2.mean(roi, mask)[:3], axis=1) / _MIN_CONTRAST
        for j in hit:
            score = np.minimum(score, np.linalg.norm(candidates - scene.colours[j], axis=1) / 80.0)
        good = np.flatnonzero(score >= 1.0)
        colour = candidates[good[0] if good.size else int(score.argmax())]
        # Same call and arguments as the mask, so the painted pixels are exactly the mask.
        _draw_shape(roi, name, cx - x0, cy - y0, r, angle, aspect, colour.tolist())
        scene.owner[y0:y1, x0:x1][m] = n
        scene.boxes.append(box)
        scene.colours.append(colour)
        scene.spare.append(0.5 * cv2.countNonZero(mask))
        return True
