"""Per-image AP@0.5, and the images with the lowest and the highest drawn: where to look first.

An image's AP@0.5 is the mean, over the classes with a scored (neither crowd nor difficult) GT in
that image, of the class's VOC area AP (as ``VOCMeanAP``) computed from that image's detections
alone, matched as the metrics match them
(:func:`~detectors.evaluation.scored_detections.match_at_iou50`). A class without GT in the image
does not enter its mean (its boxes there are false positives the confusion matrix's background row
shows); an image without any scored GT has no AP (-1) and is not ranked. A perfect image scores 1, an
image whose objects are all missed 0, one whose objects are found only below wrong boxes in between.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from detectors.evaluation.plots import draw_sample, label_font, save_figure
from detectors.evaluation.scored_detections import Matches, rank_in_groups

__all__ = ["per_image_ap", "plot_ranked_images", "ranked_images", "write_per_image_csv"]

# (3, H, W) uint8 image at network size, its frame (scale_x, scale_y, pad_left, pad_top) and (H0, W0),
# or None when the image cannot be read again
PictureLoader = Callable[[int], "tuple[Tensor, Tensor, Tensor] | None"]


def per_image_ap(s: dict[str, Tensor], matches: Matches, num_classes: int, num_images: int) -> tuple[Tensor, Tensor]:
    """AP@0.5 of each image (see the module docstring).

    Args:
        s: ``ScoredDetections.gathered()``'s flat tensors (images numbered 0..num_images-1).
        matches: ``match_at_iou50(s, num_classes)``.

    Returns:
        ``ap`` ``(num_images,)`` float64 (-1: no scored GT) and ``num_gt`` ``(num_images,)`` int64 scored GTs.
    """
    C, n_keys = num_classes, num_images * num_classes
    gt_key = (s["gt_image"] * C + s["gt_labels"])[matches.gt_scored].cpu()
    gt_count = torch.bincount(gt_key, minlength=n_keys).double()
    counted = (matches.tp | matches.fp).cpu()
    key = (s["det_image"] * C + s["det_labels"]).cpu()[counted]
    tp = matches.tp.cpu()[counted]
    order, rank = rank_in_groups(s["det_scores"].cpu()[counted], key)
    key, tp = key[order], tp[order].double()
    ap = torch.zeros(n_keys, dtype=torch.float64)
    if key.numel():
        # precision after each ranked detection of its (image, class) group
        cum = tp.cumsum(0)
        before = cum - tp  # TPs ranked before each row, over all groups: non-decreasing
        # the TPs of earlier groups, taken at each group's first row and carried along the group
        start = torch.where(rank == 0, before, torch.zeros_like(before)).cummax(0).values
        group_tp = cum - start
        precision = group_tp / (rank + 1).double()
        # VOC's envelope (max precision at this rank or after, inside the group): a cummax backwards with the
        # groups offset by 2 apart, so no group's values reach into the next one's
        _, group = torch.unique_consecutive(key, return_inverse=True)
        offset = 2.0 * (int(group.max()) - group).double()
        envelope = (precision + offset).flip(0).cummax(0).values.flip(0) - offset
        # the area under the envelope: each TP adds 1/n of recall at its envelope precision
        ap.index_add_(0, key, torch.where(tp > 0, envelope, torch.zeros_like(envelope)) / gt_count[key].clamp(min=1))
    has_gt = (gt_count > 0).view(num_images, C)
    num_classes_present = has_gt.sum(1)
    image_ap = (ap.view(num_images, C) * has_gt).sum(1) / num_classes_present.clamp(min=1)
    image_ap = torch.where(num_classes_present > 0, image_ap, torch.full_like(image_ap, -1.0))
    return image_ap, gt_count.view(num_images, C).sum(1).long()


def ranked_images(ap: Tensor, num_gt: Tensor, k: int) -> tuple[list[int], list[int]]:
    """The ``k`` images of lowest and of highest AP (images without AP left out); on equal AP the one with
    more GTs first (more to see), then the earlier."""
    valid = torch.nonzero(ap >= 0).squeeze(1).tolist()
    lowest = sorted(valid, key=lambda i: (float(ap[i]), -int(num_gt[i]), i))[:k]
    highest = sorted(valid, key=lambda i: (-float(ap[i]), -int(num_gt[i]), i))[:k]
    return lowest, highest


def write_per_image_csv(ap: Tensor, num_gt: Tensor, num_detections: Tensor, image_ids: Sequence[int],
                        file_names: dict[int, str] | None, path: str | Path) -> Path:
    """``per_image_ap.csv``: ``image_id, file, ap_50, num_gt, num_detections`` (detections above the operating
    threshold), ascending AP; images without a scored GT (no AP) last with an empty ``ap_50``."""
    order = sorted(range(len(image_ids)), key=lambda i: (float(ap[i]) < 0, float(ap[i]), -int(num_gt[i]), i))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "file", "ap_50", "num_gt", "num_detections"])
        for i in order:
            image_id = int(image_ids[i])
            w.writerow([image_id, (file_names or {}).get(image_id, ""), "" if ap[i] < 0 else f"{float(ap[i]):.6g}",
                        int(num_gt[i]), int(num_detections[i])])
    return path


def plot_ranked_images(indices: Sequence[int], s: dict[str, Tensor], ap: Tensor, num_gt: Tensor,
                       image_ids: Sequence[int], file_names: dict[int, str] | None, load: PictureLoader,
                       class_names: Sequence[str], score_threshold: float, title: str, path: str | Path,
                       columns: int = 5) -> Path | None:
    """The images ``indices`` in a grid with GT (black in white) and the predictions above ``score_threshold``
    (class colour, "name score"), each titled with its rank, AP@0.5, GT count and file. None: none readable."""
    pictures, font = [], label_font()
    for rank, i in enumerate(indices, start=1):
        loaded = load(i)
        if loaded is None:
            continue
        image, frame, orig_size = loaded
        dets, gts = s["det_image"] == i, s["gt_image"] == i
        pred = {"boxes": s["det_boxes"][dets].cpu(), "scores": s["det_scores"][dets].cpu(),
                "labels": s["det_labels"][dets].cpu()}
        target = {"boxes": s["gt_boxes"][gts].cpu(), "labels": s["gt_labels"][gts].cpu()}
        size = max(10, round(min(image.shape[-2:]) / 32))  # labels that stay legible in a tile of the grid
        drawn = draw_sample(image, pred, target, orig_size, class_names, score_threshold, frame=frame, font=font,
                            font_size=size if font else None)
        name = (file_names or {}).get(int(image_ids[i]), f"image {int(image_ids[i])}")
        name = Path(name).name
        name = name if len(name) <= 32 else "..." + name[-29:]
        pictures.append((drawn, f"{rank}. AP@0.5 {float(ap[i]):.3f}, {int(num_gt[i])} GT\n{name}"))
    if not pictures:
        return None
    cols = min(columns, len(pictures))
    rows = -(-len(pictures) // cols)
    h, w = pictures[0][0].shape[-2:]
    tile = 4.0
    fig = Figure(figsize=(tile * cols, tile * rows * h / w + 0.5 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for n, (picture, caption) in enumerate(pictures):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(picture.permute(1, 2, 0).numpy())
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
