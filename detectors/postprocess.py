"""decode -> top-k -> batched NMS -> per-image results, shared by every head.

A head decodes its raw outputs into boxes and per-class scores for the whole batch; this keeps the
best ``pre_nms_top_k`` candidates per class and image above a score threshold, runs one
``torchvision.ops.batched_nms`` for the whole batch (one group per image and class), and cuts each
image to its ``max_detections`` best. No Python loop over images or classes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def multiclass_nms(boxes: Tensor, scores: Tensor, score_threshold: float, nms_threshold: float,
                   pre_nms_top_k: int, max_detections: int) -> list[dict[str, Tensor]]:
    """Per-class NMS over a batch.

    Args:
        boxes: (B, A, 4) xyxy, shared by every class (SSD, YOLO), or (B, A, C, 4) class-specific
            (an R-CNN head's per-class regression).
        scores: (B, A, C) per-class scores of foreground classes 0..C-1.
        score_threshold: candidates at or below it are dropped.
        nms_threshold: IoU above which a lower-scored box of the same image and class is suppressed.
        pre_nms_top_k: candidates kept per image and class before NMS.
        max_detections: boxes kept per image after NMS.

    Returns:
        one dict per image: boxes (N, 4), scores (N,) descending, labels (N,) 0..C-1.
    """
    batch, num_anchors, classes = scores.shape
    k = min(pre_nms_top_k, num_anchors)
    top_scores, top_idx = scores.transpose(1, 2).topk(k, dim=2)  # (B, C, k)
    if boxes.dim() == 3:
        top_boxes = boxes.gather(1, top_idx.reshape(batch, -1, 1).expand(-1, -1, 4)).view(batch, classes, k, 4)
    else:  # (B, A, C, 4) -> (B, C, A, 4), then the class's own boxes of its top-k
        per_class = boxes.transpose(1, 2)
        top_boxes = per_class.gather(2, top_idx.unsqueeze(-1).expand(-1, -1, -1, 4))
    image_idx = torch.arange(batch, device=boxes.device).view(-1, 1, 1).expand_as(top_scores)
    class_idx = torch.arange(classes, device=boxes.device).view(1, -1, 1).expand_as(top_scores)

    keep = top_scores > score_threshold
    cand_scores, cand_boxes = top_scores[keep], top_boxes[keep]
    cand_images, cand_classes = image_idx[keep], class_idx[keep]
    kept = batched_nms(cand_boxes, cand_scores, cand_images * classes + cand_classes, nms_threshold)
    return split_per_image(kept, cand_images, batch, max_detections,
                           {"boxes": cand_boxes, "scores": cand_scores, "labels": cand_classes})


def split_per_image(kept: Tensor, images: Tensor, batch: int, max_detections: int,
                    fields: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """``kept``: indices into ``fields`` in descending score order (batched_nms's output); ``images``:
    the image of every candidate. Returns, per image, its best ``max_detections`` entries of each field."""
    # a stable sort by image keeps the score order inside each image
    kept = kept[torch.sort(images[kept], stable=True).indices]
    images_of_kept = images[kept]
    counts = torch.bincount(images_of_kept, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(kept), device=kept.device) - starts[images_of_kept]
    kept = kept[rank < max_detections]
    sizes = counts.clamp(max=max_detections).tolist()
    split = {name: values[kept].split(sizes) for name, values in fields.items()}
    return [{name: split[name][i] for name in fields} for i in range(batch)]
