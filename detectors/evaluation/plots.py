"""Pictures of an evaluation: precision-recall curves (matplotlib, Agg) and sample images with
predicted and ground-truth boxes (torchvision's ``draw_bounding_boxes`` + ``make_grid``).

Everything here works on CPU tensors and writes PNG files; nothing opens a window, so it runs on
headless machines and inside training callbacks alike.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from detectors.boxes import boxes_to_input, stretch_frames

__all__ = [
    "GT_COLOR",
    "GT_OUTLINE",
    "class_colors",
    "denormalize",
    "draw_sample",
    "image_grid",
    "label_font",
    "plot_pr_curve",
    "plot_pr_curves",
    "pr_envelope",
    "render_samples",
    "safe_filename",
    "save_png",
]

# Ground truth: a thin black line in a white outline, visible on dark and light images alike and
# unlike any class colour (the classes take tab10/tab20), without a label, so the predictions
# (class colour, "name score" on a filled tag) stay readable on top.
GT_COLOR = (0, 0, 0)
GT_OUTLINE = (255, 255, 255)
# filled label tags (white text on the class colour) read far better than coloured text on a
# photo; older torchvision versions lack the option and draw plain text
_FILLED_LABELS = {"fill_labels": True, "label_colors": "white"} if "fill_labels" in inspect.signature(
    draw_bounding_boxes).parameters else {}



def save_figure(fig, path: str | Path) -> Path:
    """Lay ``fig`` out and write it to ``path`` (its folder made): the end of every picture this project draws."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

def safe_filename(name: str) -> str:
    """A class name as a file-name part: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def pr_envelope(recall: Tensor, precision: Tensor) -> tuple[list[float], list[float]]:
    """The monotone precision envelope (max precision at recall >= r) of a ranked ``(D,)`` curve, as the
    points of a ``step(..., where="pre")`` line from recall 0: the curve whose area is VOC2010+'s AP."""
    rec = torch.as_tensor(recall, dtype=torch.float64).cpu()
    envelope = torch.as_tensor(precision, dtype=torch.float64).cpu().flip(0).cummax(0).values.flip(0)
    return [0.0, *rec.tolist()], [float(envelope[0]), *envelope.tolist()]


def plot_pr_curve(
    recall: Tensor, precision: Tensor, ap: float, title: str, path: str | Path, num_gt: int | None = None
) -> Path:
    """One class's precision-recall curve as a PNG.

    Args:
        recall, precision: ``(D,)`` after each ranked detection (``VOCMeanAP.pr_curves``).
        ap: the class's AP, shown in the title (-1: no ground truth, an empty plot says so).
        title: usually the class name.
        path: the PNG to write (its folder is created).
        num_gt: ground-truth count, shown in the title when given.

    The raw curve is drawn together with its monotone envelope (max precision at recall >= r),
    the curve whose area is the VOC2010+ AP.
    """
    rec = torch.as_tensor(recall, dtype=torch.float64).cpu()
    prec = torch.as_tensor(precision, dtype=torch.float64).cpu()
    fig = Figure(figsize=(5, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global figure state
    ax = fig.add_subplot()
    if rec.numel():
        ax.step(*pr_envelope(rec, prec), where="pre", color="C0", label=f"interpolated (AP = {ap:.3f})")
        ax.plot(rec.numpy(), prec.numpy(), color="C1", linewidth=0.8, alpha=0.7, label="raw")
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no ground truth" if ap < 0 else "no detections", ha="center", va="center")
    gt = f", {num_gt} GT" if num_gt is not None else ""
    ax.set_title(f"{title}: VOC AP@0.5 = {ap:.3f}{gt}" if ap >= 0 else f"{title}{gt}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def plot_pr_curves(curves: Sequence[Mapping], class_names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """``pr_curve_<class>.png`` in ``out_dir`` for each class of ``VOCMeanAP.pr_curves()`` output."""
    if len(curves) != len(class_names):
        raise ValueError(f"{len(curves)} curves for {len(class_names)} class names")
    return [
        plot_pr_curve(c["recall"], c["precision"], float(c["ap"]), name,
                      Path(out_dir) / f"pr_curve_{safe_filename(name)}.png", int(c["num_gt"]))
        for c, name in zip(curves, class_names)
    ]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """A distinct RGB colour per label (matplotlib's tab10, or tab20 beyond 10 classes, cycled)."""
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [tuple(int(round(255 * v)) for v in cmap(i % cmap.N)[:3]) for i in range(num_classes)]


def denormalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Undo ``DetectionModule.on_after_batch_transfer``: (B, 3, H, W) float -> uint8 on the CPU.

    ``mean`` and ``std`` are on the 0..255 scale, broadcastable to the images (``(1, 3, 1, 1)``).
    """
    x = images.detach().float() * std.to(images.device, torch.float32) + mean.to(images.device, torch.float32)
    return x.round().clamp(0, 255).to(torch.uint8).cpu().contiguous()


def draw_sample(
    image: Tensor,
    pred: Mapping[str, Tensor],
    target: Mapping[str, Tensor] | None,
    orig_size: Sequence[int] | Tensor,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    max_boxes: int = 50,
    frame: Sequence[float] | Tensor | None = None,
    line_width: int = 2,
    font: str | None = None,
    font_size: int | None = None,
) -> Tensor:
    """Ground truth and predictions drawn on one image.

    Args:
        image: ``(3, H, W)`` uint8, the image at network size.
        pred: ``boxes`` ``(N, 4)`` xyxy in the original frame, ``scores`` ``(N,)``, ``labels`` ``(N,)``.
        target: ``boxes`` ``(M, 4)`` in the original frame and ``labels`` ``(M,)``, or None.
        orig_size: ``(H0, W0)`` of the original image, the frame of the boxes.
        class_names: names of labels 0..C-1.
        score_threshold: predictions at or below it are not drawn.
        max_boxes: at most this many predictions (the best scores) per image, so a picture stays readable.
        frame: ``(scale_x, scale_y, pad_left, pad_top)``, where the image of ``orig_size`` lies in
            ``image`` (the batch's ``frames`` entry); None: a plain resize to the image's size.
        line_width: of the prediction boxes, in pixels of ``image``.
        font, font_size: a TrueType file and its size for the labels (:func:`label_font`); None: PIL's
            small bitmap font, which is lost on a large image.

    Returns:
        ``(3, H, W)`` uint8: GT thin black in white, predictions in their class colour with "name score".
    """
    size = tuple(image.shape[-2:])
    if frame is None:
        frame = stretch_frames(torch.as_tensor(orig_size).reshape(2), size)
    frame = torch.as_tensor(frame, dtype=torch.float32).reshape(4).cpu()
    colors = class_colors(len(class_names))
    out = image.cpu()
    if target is not None and len(target["boxes"]):
        gt = boxes_to_input(target["boxes"].detach().float().cpu(), frame)
        out = draw_bounding_boxes(out, gt, colors=GT_OUTLINE, width=3)
        out = draw_bounding_boxes(out, gt, colors=GT_COLOR, width=1)
    scores = pred["scores"].detach().float().cpu()
    keep = torch.nonzero(scores > score_threshold).squeeze(1)
    keep = keep[scores[keep].argsort(descending=True)[:max_boxes]]
    if keep.numel():
        boxes = boxes_to_input(pred["boxes"].detach().float().cpu()[keep], frame)
        labels = pred["labels"].detach().cpu()[keep].tolist()
        text = [f"{class_names[c]} {s:.2f}" for c, s in zip(labels, scores[keep].tolist())]
        fonts = {"font": font, "font_size": font_size} if font is not None else {}
        out = draw_bounding_boxes(out, boxes, labels=text, colors=[colors[c] for c in labels], width=line_width,
                                  **_FILLED_LABELS, **fonts)
    return out


def label_font() -> str | None:
    """A TrueType font for box labels at any size: matplotlib's DejaVu Sans (installed with it), or None."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # noqa: BLE001 (no font: PIL's bitmap font, smaller but legible)
        return None


def render_samples(
    images: Tensor,
    preds: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]] | None,
    orig_sizes: Tensor,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    frames: Tensor | None = None,
) -> list[Tensor]:
    """:func:`draw_sample` for each image of a batch: images ``(B, 3, H, W)`` uint8, orig_sizes ``(B, 2)``,
    frames ``(B, 4)`` (None: plain resizes)."""
    return [
        draw_sample(images[i], preds[i], targets[i] if targets is not None else None, orig_sizes[i], class_names,
                    score_threshold, frame=frames[i] if frames is not None else None)
        for i in range(min(len(images), len(preds)))
    ]


def image_grid(images: Sequence[Tensor], columns: int = 4) -> Tensor:
    """``(3, H', W')`` uint8 grid of equal-size ``(3, H, W)`` uint8 images, ``columns`` per row."""
    if not len(images):
        raise ValueError("no images to put in a grid")
    return make_grid(torch.stack(list(images)), nrow=max(1, columns), padding=4, pad_value=0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(3, H, W)`` uint8 image as PNG (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.cpu(), str(path))
    return path
