"""Loss pieces shared by the heads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from detectors.boxes import DeltaBoxCoder


def hard_negative_mask(
    background_loss: Tensor,
    positive: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives: int = 0,
    exclude: Tensor | None = None,
) -> Tensor:
    """Hard negative mining (SSD, Liu et al. 2016, sec. 2.2), batched over images.

    Per image keep the ``neg_pos_ratio * num_positives`` negatives with the highest
    classification loss (at least ``min_negatives``, so images without objects still teach the
    background; SSD's own rule keeps none there), never more than there are negatives.

    Args:
        background_loss: (B, A) classification loss of each prior against the background class.
        positive: (B, A) bool.
        exclude: (B, A) bool, priors that are neither positive nor eligible as negatives (ignored).
    Returns:
        (B, A) bool mask of the selected negatives (disjoint from ``positive`` and ``exclude``).
    """
    unavailable = positive if exclude is None else positive | exclude
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = (num_pos * neg_pos_ratio).long().clamp(min=min_negatives)
    num_neg = torch.minimum(num_neg, (~unavailable).sum(dim=1, keepdim=True))
    loss = background_loss.detach().masked_fill(unavailable, float("-inf"))
    # rank of each prior in descending loss order: argsort of the argsort
    order = loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    return (rank < num_neg) & ~unavailable



# ---- loss terms chosen by config (configs/loss/): each maps (pred, target[, ...]) to a per-element loss,
# reduced by the head with its own weights (per-box mixup weights, positives, normalisation) ---------

#: box-regression losses: on the coder's offsets (smooth_l1, l1, sse) or on decoded xyxy boxes (the IoU family)
BOX_LOSSES = ("smooth_l1", "l1", "sse", "iou", "giou", "diou", "ciou")
IOU_LOSSES = ("iou", "giou", "diou", "ciou")
#: classification losses: softmax over C + 1 (ce, softmax_focal) or independent sigmoids over C (bce, focal)
CLASS_LOSSES = ("ce", "softmax_focal", "bce", "focal")
SIGMOID_CLASS_LOSSES = ("bce", "focal")
#: objectness losses (one sigmoid per prediction)
OBJECTNESS_LOSSES = ("bce", "sse", "focal")


def box_regression_loss(name: str, pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Per-box loss (...,) of ``pred`` against ``target`` (..., 4).

    smooth_l1 / l1 / sse: summed over the 4 coordinates of the coder's offsets (smooth L1 with ``beta``,
    as ``F.smooth_l1_loss``; sse is half the squared error, darknet's delta as gradient). iou / giou /
    diou / ciou: 1 - IoU and torchvision.ops' generalized, distance and complete IoU losses of xyxy boxes.
    """
    import torch.nn.functional as F
    from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

    from detectors.boxes import paired_box_iou

    if name == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(-1)
    if name == "l1":
        return (pred - target).abs().sum(-1)
    if name == "sse":
        return 0.5 * (pred - target).pow(2).sum(-1)
    # the IoU family works on float32 boxes (torchvision's eps is for float32). A slot without a ground truth
    # has a degenerate target (padding's zeros): CIoU's atan(w / h) of it is NaN, and so would the gradient be
    # even where the head masks the slot out (0 x NaN); such targets are replaced by the prediction itself
    pred, target = pred.float(), target.float()
    degenerate = ((target[..., 2:] - target[..., :2]) <= 0).any(-1, keepdim=True)
    target = torch.where(degenerate, pred.detach(), target)
    if name == "iou":
        return 1.0 - paired_box_iou(pred, target)
    if name == "giou":
        return generalized_box_iou_loss(pred, target, reduction="none")
    if name == "diou":
        return distance_box_iou_loss(pred, target, reduction="none")
    if name == "ciou":
        return complete_box_iou_loss(pred, target, reduction="none")
    raise ValueError(f"unknown box loss {name!r}; choose from {BOX_LOSSES}")


def softmax_focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss over a softmax (Lin et al. 2017, eq. 5 with the softmax's p_t), per row:
    ``-(1 - p_t)^gamma log p_t``. logits (N, K), labels (N,) -> (N,). gamma 0 is cross-entropy."""
    log_p = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    return -((1.0 - log_p.exp()).pow(gamma)) * log_p


def sigmoid_class_loss(name: str, logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-element loss of independent sigmoids: ``bce`` or ``focal`` (torchvision.ops.sigmoid_focal_loss,
    RetinaNet's alpha and gamma; gamma 0 with alpha < 0 is BCE). logits and targets (..., K) in 0..1."""
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    if name == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if name == "focal":
        return sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    raise ValueError(f"unknown sigmoid class loss {name!r}; choose from {SIGMOID_CLASS_LOSSES}")


def objectness_loss(name: str, logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-element objectness loss: ``bce``, ``focal`` (as ``sigmoid_class_loss``) or ``sse`` (half the
    squared error of the sigmoid, darknet's)."""
    if name == "sse":
        return 0.5 * (logits.float().sigmoid() - targets.float()).pow(2)
    if name in ("bce", "focal"):
        return sigmoid_class_loss(name, logits, targets, alpha, gamma)
    raise ValueError(f"unknown objectness loss {name!r}; choose from {OBJECTNESS_LOSSES}")


@dataclass(frozen=True)
class LossChoice:
    """The loss terms a head uses (None: the head has no such term) and their parameters."""

    box: str | None
    cls: str | None
    obj: str | None = None
    smooth_l1_beta: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def choose_losses(head: str, losses: Mapping[str, Any] | None, defaults: dict[str, str | None],
                  allowed: dict[str, tuple[str, ...]]) -> LossChoice:
    """The loss terms a head uses: the config's ``loss.box``/``cls``/``obj`` where set (not null), the head's
    defaults otherwise, and the parameters (``smooth_l1_beta``, ``focal_alpha``, ``focal_gamma``). One clear
    line, at build time, for a name the head cannot use or a term it does not have."""
    losses = dict(losses or {})
    chosen = {}
    for term, default in defaults.items():
        name = losses.get(term) or default
        if name is not None and name not in allowed[term]:
            what = "has no objectness" if not allowed[term] else f"takes loss.{term} among {list(allowed[term])}"
            raise ValueError(f"loss.{term}={name} does not fit the {head} head: it {what}")
        chosen[term] = name
    for term in ("box", "cls", "obj"):
        if term not in defaults and losses.get(term):
            raise ValueError(f"loss.{term}={losses[term]} does not fit the {head} head: it has no {term} term")
    return LossChoice(**chosen, smooth_l1_beta=float(losses.get("smooth_l1_beta", 1.0)),
                      focal_alpha=float(losses.get("focal_alpha", 0.25)),
                      focal_gamma=float(losses.get("focal_gamma", 2.0)))


def class_loss(losses: LossChoice, logits: Tensor, labels: Tensor, background: bool = False) -> Tensor:
    """Per-slot class loss (...) of ``losses.cls``, the one switch every head's class term goes through.

    logits (..., K), labels (...). ``background=False``: K = C foreground classes, labels 0..C-1 (the YOLO
    heads). ``background=True``: K = C + 1 with the background at column 0, labels 0 (background) to C (SSD,
    the RoI head): the sigmoid losses score only the C foreground columns, a background slot learns all zeros.
    ``ce`` and ``softmax_focal`` are over a softmax of the K; ``bce`` and ``focal`` over one sigmoid per
    class, summed over the classes (YOLOv3's multi-label classifiers); ``sse`` the squared error of linear
    outputs against the one-hot (YOLOv1's class probabilities: no activation, no factor 1/2).
    """
    import torch.nn.functional as F

    name = losses.cls
    if name == "ce":
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)
    if name == "softmax_focal":
        return softmax_focal_loss(logits.flatten(0, -2), labels.flatten(), losses.focal_gamma).view_as(labels)
    one_hot = F.one_hot(labels, logits.shape[-1])
    if background:
        logits, one_hot = logits[..., 1:], one_hot[..., 1:]
    if name == "sse":
        return (logits - one_hot.float()).square().sum(-1)
    if name in SIGMOID_CLASS_LOSSES:
        return sigmoid_class_loss(name, logits, one_hot, losses.focal_alpha, losses.focal_gamma).sum(-1)
    raise ValueError(f"unknown class loss {name!r}; choose from {('sse', *CLASS_LOSSES)}")


def class_probabilities(losses: LossChoice, logits: Tensor, background: bool = False) -> Tensor:
    """(..., C) the class probabilities as ``class_loss`` trained the logits (..., K), K and
    ``background`` as there: one sigmoid per class (bce, focal), a softmax over the K (ce, softmax_focal;
    the background's column dropped), or the linear outputs clamped to [0, 1] (sse)."""
    if losses.cls in ("ce", "softmax_focal"):
        probs = logits.softmax(-1)
        return probs[..., 1:] if background else probs
    if background:
        logits = logits[..., 1:]
    return logits.clamp(0, 1) if losses.cls == "sse" else logits.sigmoid()


def delta_box_loss(losses: LossChoice, deltas: Tensor, target_boxes: Tensor, coder: DeltaBoxCoder,
                   references: Tensor) -> Tensor:
    """Per-box loss (...) of a head that predicts ``coder``'s deltas (SSD, RPN, RoI): ``losses.box`` on the
    deltas (..., 4) against the encoding of ``target_boxes`` (..., 4) xyxy, or for the IoU family on the
    decoded deltas against the boxes themselves. references (..., 4) cxcywh, broadcastable."""
    if losses.box in IOU_LOSSES:
        return box_regression_loss(losses.box, coder.decode(deltas, references), target_boxes)
    return box_regression_loss(losses.box, deltas, coder.encode(target_boxes, references), losses.smooth_l1_beta)
