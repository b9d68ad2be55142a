"""YOLOv1 head (Redmon et al. 2016, "You Only Look Once"): four 3x3 convs and two fully connected
layers that regress an S x S grid of B boxes, B confidences and C class probabilities per cell;
darknet's v1 ``detection`` layer for the parametrisation, the assignment and the sum-squared loss.

The FC layers fix the input size: the head is built for one ``input_size`` and refuses any other.
``fully_connected=False`` puts a 1x1 conv in their place (each cell from its own features, any size):
what the BCCD recipe trains, as the FC learned no image-dependent boxes there (BENCHMARKS.md, "Training runs").
The grid is the head's last conv map, ``ceil(H / 64) x ceil(W / 64)`` on a stride-32 backbone map
(7 x 7 at the paper's 448 px): one output cell per conv cell, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectors.assign import cells_of_centres, gather_gt, owner_of_slots
from detectors.boxes import batched_box_iou, clip_boxes
from detectors.heads.class_axes import ClassAxis, layer_axes
from detectors.layers import ConvBN
from detectors.losses import (
    BOX_LOSSES,
    CLASS_LOSSES,
    IOU_LOSSES,
    OBJECTNESS_LOSSES,
    box_regression_loss,
    choose_losses,
    class_loss,
    class_probabilities,
    objectness_loss,
)
from detectors.postprocess import multiclass_nms
from detectors.timing import stage


@dataclass
class YOLOv1Raw:
    """Raw YOLOv1 outputs, linear (darknet v1's detection layer with ``softmax=0``).

    output: (B, S_h, S_w, 5 * num_boxes + C). Per cell, ``num_boxes`` groups of
        (x, y, sqrt(w), sqrt(h), confidence), then C class probabilities. x, y are the box centre's
        offset inside its cell (0..1 of a cell), sqrt(w), sqrt(h) the square roots of its width and
        height as fractions of the image's, confidence Pr(object) * IoU, and the class
        probabilities Pr(class | object) of the cell.
    num_boxes: predictors per cell (B = 2 in the paper).
    """

    output: Tensor
    num_boxes: int

    @property
    def boxes(self) -> Tensor:
        """(B, S_h, S_w, num_boxes, 4): x, y, sqrt(w), sqrt(h) of every predictor."""
        return self._predictors()[..., :4]

    @property
    def confidence(self) -> Tensor:
        """(B, S_h, S_w, num_boxes)."""
        return self._predictors()[..., 4]

    @property
    def class_probs(self) -> Tensor:
        """(B, S_h, S_w, C)."""
        return self.output[..., 5 * self.num_boxes:]

    def _predictors(self) -> Tensor:
        return self.output[..., : 5 * self.num_boxes].unflatten(-1, (self.num_boxes, 5))


@dataclass
class CellAssignment:
    """Which predictor learns which ground truth, for a batch (cells in row-major order).

    owner: (B, cells) long, the padded-axis index of the GT a cell learns, -1 where none.
    responsible: (B, cells, num_boxes) bool, the predictor of an owned cell with the highest IoU.
    iou: (B, cells, num_boxes) IoU of each predicted box with its cell's GT (0 in cells without one).
    ignore: (B, cells) bool, cells holding only difficult GT centres: no confidence loss there.
    target: (B, cells, 4) the owner's x, y offsets in its cell and sqrt(w), sqrt(h) (image fractions).
    """

    owner: Tensor
    responsible: Tensor
    iou: Tensor
    ignore: Tensor
    target: Tensor


class YOLOv1Head(nn.Module):
    """The paper's last layers (Fig. 3) on one backbone map, the sum-squared loss and the decoding.

    Args:
        in_channels: channels of the one feature map (``backbone.out_strides=[32]``; set by ``Detector``).
        num_classes: foreground classes C (labels 0..C-1).
        input_size: (H, W) the network is built for: the first FC's width depends on it.
        strides: the map's stride (set by ``Detector``; 32 when not given).
        channels: width of the four 3x3 convs (1024 in the paper).
        fc_width: units of the first FC layer (4096).
        dropout: after the first FC (0.5).
        fc_batch_norm: BatchNorm on the first FC's outputs, before its leaky ReLU (darknet's ``[connected]
            batch_normalize=1``; not in the paper, off by default: from scratch it keeps the FC's units
            alive, yet the FC still gave every image the same boxes, and a batch of two normalises each
            unit to +-1; BENCHMARKS.md, "Training runs"). Needs training batches of two or more.
        fully_connected: False: a 1x1 conv predicts each cell's 5B + C outputs from that cell's features
            (weights shared by the cells, any input size) in place of the two FC layers; ``dropout`` then
            drops whole channels (``Dropout2d``). On BCCD from scratch it learned where the FC did not
            (BENCHMARKS.md, "Training runs").
        num_boxes: predictors per cell B (2).
        coord_scale: lambda_coord on x, y, sqrt(w), sqrt(h) of responsible predictors (5).
        noobj_scale: lambda_noobj on the confidence of every other predictor (0.5).
        obj_scale, cls_scale: on the responsible predictors' confidence and on the class SSE (1, 1:
            darknet's object_scale and class_scale).
        score_threshold, nms_threshold, max_detections, pre_nms_top_k: decoding (class score =
            confidence x class probability; per-class NMS at 0.5 as darknet's yolo demo and
            validation; at most ``pre_nms_top_k`` candidates per class and image).
        losses: the ``loss`` config. The paper's by default: ``box`` sse (the squared error of x, y,
            sqrt(w), sqrt(h); also smooth_l1 and l1 on those, or iou, giou, diou, ciou on the decoded
            boxes), ``cls`` sse (of the linear class probabilities; ce and softmax_focal read the class
            outputs as softmax logits, bce and focal as sigmoid logits), ``obj`` sse (of the linear
            confidence; bce and focal read it as a logit, against the same IoU target). Prediction reads
            the outputs the way the chosen losses trained them.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        input_size: Sequence[int],
        strides: Sequence[int] = (),
        channels: int = 1024,
        fc_width: int = 4096,
        dropout: float = 0.5,
        fc_batch_norm: bool = False,
        fully_connected: bool = True,
        num_boxes: int = 2,
        coord_scale: float = 5.0,
        noobj_scale: float = 0.5,
        obj_scale: float = 1.0,
        cls_scale: float = 1.0,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        pre_nms_top_k: int = 400,
        losses: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(in_channels) != 1:
            raise ValueError(f"YOLOv1Head predicts from one map, got {len(in_channels)}: set backbone.out_strides=[32]")
        self.num_classes = num_classes
        self.num_boxes = num_boxes
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.stride = int(strides[0]) if strides else 32
        # every backbone here rounds odd maps up (ceil-mode pools, padded stride-2 convs)
        self.map_shape = tuple(math.ceil(s / self.stride) for s in self.input_size)
        self.grid = tuple(math.ceil(s / 2) for s in self.map_shape)  # after the stride-2 conv
        self.coord_scale, self.noobj_scale = coord_scale, noobj_scale
        self.obj_scale, self.cls_scale = obj_scale, cls_scale
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k
        self.losses = choose_losses("YOLOv1", losses, {"box": "sse", "cls": "sse", "obj": "sse"},
                                    {"box": BOX_LOSSES, "cls": ("sse", *CLASS_LOSSES), "obj": OBJECTNESS_LOSSES})
        # Fig. 3: 3x3/1, 3x3/2 (14 -> 7 at 448 px), 3x3/1, 3x3/1; BN (not in the paper, which
        # fine-tunes a pretrained net) since the whole net trains from scratch here
        self.convs = nn.Sequential(ConvBN(in_channels[0], channels, 3), ConvBN(channels, channels, 3, stride=2),
                                   ConvBN(channels, channels, 3), ConvBN(channels, channels, 3))
        cells = self.grid[0] * self.grid[1]
        per_cell = 5 * num_boxes + num_classes
        self.fully_connected = fully_connected
        if fully_connected:
            # without the norm the layers and their state_dict keys are as before it existed (fc.3 the
            # output layer), so earlier checkpoints load
            norm = [nn.BatchNorm1d(fc_width)] if fc_batch_norm else []
            self.fc = nn.Sequential(
                nn.Linear(channels * cells, fc_width, bias=not fc_batch_norm),
                *norm,
                nn.LeakyReLU(0.1, inplace=True),
                nn.Dropout(dropout),
                nn.Linear(fc_width, cells * per_cell),
            )
            nn.init.kaiming_uniform_(self.fc[0].weight, a=0.1, nonlinearity="leaky_relu")
            if self.fc[0].bias is not None:
                nn.init.zeros_(self.fc[0].bias)
            output_layer = self.fc[-1]
        else:
            self.fc = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, per_cell, 1))
            output_layer = self.fc[1]
        for m in self.convs.modules():  # as the darknet backbones: He init for leaky ReLU(0.1)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")
        # small outputs at the start (the SSE of a linear output grows with its scale), every box at the
        # centre of its cell and half the image's side (sqrt(w) = 0.5): the first steps learn offsets
        # from a box of the right magnitude instead of moving every box output from 0 to about 0.5
        nn.init.normal_(output_layer.weight, std=0.01)
        bias = torch.zeros(per_cell)
        bias[: 5 * num_boxes].view(num_boxes, 5)[:, :4] = 0.5
        with torch.no_grad():
            output_layer.bias.copy_(bias.repeat(cells if fully_connected else 1))

    def class_axes(self) -> dict[str, ClassAxis]:
        """The output layer's outputs (``detectors.init_from``): per cell (the FC's) or for every cell (the 1x1
        conv's), the boxes' 5 x num_boxes values then the C class probabilities."""
        return layer_axes(self, [self.fc[-1]], ClassAxis(before=5 * self.num_boxes))

    def forward(self, feats: list[Tensor], targets: dict[str, Tensor] | None = None) -> YOLOv1Raw:
        """feats: [(B, C_in, H / 32, W / 32)] -> YOLOv1Raw with output (B, S_h, S_w, 5 num_boxes + C)."""
        (x,) = feats
        if not self.fully_connected:  # the 1x1 conv takes any map: no fixed input size
            return YOLOv1Raw(self.fc(self.convs(x)).permute(0, 2, 3, 1), self.num_boxes)
        if tuple(x.shape[-2:]) != self.map_shape:
            # a ValueError, not a shape error inside the FC: the module's meta forward at build time
            # (input_size, every multiscale size) reports it as it is
            raise ValueError(
                f"YOLOv1Head is built for {self.input_size[0]}x{self.input_size[1]} inputs (its FC takes the "
                f"{self.map_shape[0]}x{self.map_shape[1]} map at stride {self.stride}) and got a "
                f"{x.shape[-2]}x{x.shape[-1]} map: the FC fixes the input size (no multi-scale training; "
                "head.fully_connected=false predicts with a 1x1 conv, which takes any size)")
        if self.training and x.shape[0] == 1 and isinstance(self.fc[1], nn.BatchNorm1d):
            raise ValueError("YOLOv1Head's FC BatchNorm needs training batches of two or more images: set "
                             "data.batch_size >= 2 (per device), or head.fc_batch_norm=false")
        out = self.fc(self.convs(x).flatten(1))
        return YOLOv1Raw(out.view(x.shape[0], *self.grid, -1), self.num_boxes)

    def loss(self, raw: YOLOv1Raw, targets: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """The paper's sum-squared error (eq. 3) over the batch, divided by the batch size.

        targets: padded batch tensors from ``collate_detection``: boxes (B, M, 4) xyxy pixels, labels
        (B, M), mask (B, M), weights (B, M) (mixup: scale every term of that box), optional difficult
        (B, M). Returns {'loss', 'loss_box', 'loss_obj', 'loss_noobj', 'loss_cls'}. No host sync inside.
        """
        batch, grid = raw.output.shape[0], tuple(raw.output.shape[1:3])
        boxes = raw.boxes.float().flatten(1, 2)  # (B, cells, nb, 4)
        conf = raw.confidence.float().flatten(1, 2)  # (B, cells, nb)
        probs = raw.class_probs.float().flatten(1, 2)  # (B, cells, C)
        with stage("assign"):
            pred_xyxy = decode_boxes(raw.boxes.detach().float(), image_size).flatten(1, 2)
            a = assign_cells(pred_xyxy, targets, grid, image_size)
            has_obj = a.owner >= 0
            weight = gather_gt(targets["weights"].float(), a.owner) * has_obj  # (B, cells), 0 without owner
            # cells without an owner read the padding's -1 (weight 0 there): any valid class will do
            labels = gather_gt(targets["labels"], a.owner).clamp(min=0)
        with stage("loss"):
            resp_weight = a.responsible * weight.unsqueeze(-1)  # (B, cells, nb)
            loss_box = self.coord_scale * (self._box_loss(raw, boxes, a, image_size) * resp_weight).sum() / batch
            # rescore: the responsible predictor's confidence learns the IoU of its own box (detached)
            noobj = ~a.responsible & ~a.ignore.unsqueeze(-1)
            if self.losses.obj == "sse":  # the paper's: the linear confidence's squared error
                obj_per, noobj_per = (conf - a.iou).square(), conf.square()
            else:
                obj_per = objectness_loss(self.losses.obj, conf, a.iou, self.losses.focal_alpha, self.losses.focal_gamma)
                noobj_per = objectness_loss(self.losses.obj, conf, torch.zeros_like(conf), self.losses.focal_alpha,
                                            self.losses.focal_gamma)
            loss_obj = self.obj_scale * (obj_per * resp_weight).sum() / batch
            loss_noobj = self.noobj_scale * (noobj_per * noobj).sum() / batch
            loss_cls = self.cls_scale * (class_loss(self.losses, probs, labels) * weight).sum() / batch
        return {"loss": loss_box + loss_obj + loss_noobj + loss_cls, "loss_box": loss_box, "loss_obj": loss_obj,
                "loss_noobj": loss_noobj, "loss_cls": loss_cls}

    def _box_loss(self, raw: YOLOv1Raw, boxes: Tensor, a: CellAssignment, image_size: tuple[int, int]) -> Tensor:
        """(B, cells, nb) box loss of every predictor against its cell's ground truth."""
        if self.losses.box == "sse":  # the paper's (eq. 3), no factor 1/2
            return (boxes - a.target.unsqueeze(2)).square().sum(-1)
        if self.losses.box in IOU_LOSSES:
            pred = decode_boxes(raw.boxes.float(), image_size).flatten(1, 2)
            target = decode_boxes(a.target.unsqueeze(2).unflatten(1, raw.output.shape[1:3]), image_size).flatten(1, 2)
            return box_regression_loss(self.losses.box, pred, target.expand_as(pred))
        return box_regression_loss(self.losses.box, boxes, a.target.unsqueeze(2).expand_as(boxes),
                                   self.losses.smooth_l1_beta)

    def decode_scores(self, raw: YOLOv1Raw, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Every predictor decoded, in (row, col, predictor) order: boxes (B, S_h S_w num_boxes, 4) xyxy
        pixels of the input, clipped to it, and class scores (B, S_h S_w num_boxes, C) = confidence x class
        probability (eq. 1). With the paper's losses the outputs are linear: confidence and probabilities
        are clamped to [0, 1] first, so two negative ones cannot make a positive score; other losses'
        outputs go through their sigmoid or softmax. What ``predict`` runs NMS on, and what an exported
        model outputs."""
        batch = raw.output.shape[0]
        boxes = clip_boxes(decode_boxes(raw.boxes.float(), image_size), image_size).reshape(batch, -1, 4)
        conf, probs = raw.confidence.float(), raw.class_probs.float()  # (B, S_h, S_w, nb), (B, S_h, S_w, C)
        conf = conf.clamp(0, 1) if self.losses.obj == "sse" else conf.sigmoid()
        probs = class_probabilities(self.losses, probs)
        return boxes, (conf.unsqueeze(-1) * probs.unsqueeze(-2)).reshape(batch, -1, self.num_classes)

    @torch.no_grad()
    def predict(self, raw: YOLOv1Raw, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """``decode_scores``, above ``score_threshold``, per-class NMS, the best ``max_detections`` per image.

        Returns one dict per image: boxes (N, 4) xyxy pixels clipped to the image, scores (N,) descending,
        labels (N,) 0..C-1.
        """
        boxes, scores = self.decode_scores(raw, image_size)
        return multiclass_nms(boxes, scores, self.score_threshold, self.nms_threshold, self.pre_nms_top_k,
                              self.max_detections)


def decode_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(B, S_h, S_w, nb, 4) x, y in the cell, sqrt(w), sqrt(h) of the image -> (B, S_h, S_w, nb, 4) xyxy
    pixels of an image of ``image_size`` (H, W) (darknet v1: w = output ** 2 with ``sqrt=1``)."""
    grid_h, grid_w = boxes.shape[1:3]
    height, width = image_size
    cols = torch.arange(grid_w, device=boxes.device, dtype=boxes.dtype).view(1, 1, grid_w, 1)
    rows = torch.arange(grid_h, device=boxes.device, dtype=boxes.dtype).view(1, grid_h, 1, 1)
    cx = (cols + boxes[..., 0]) * (width / grid_w)
    cy = (rows + boxes[..., 1]) * (height / grid_h)
    half_w = boxes[..., 2].square() * (width / 2)
    half_h = boxes[..., 3].square() * (height / 2)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def encode_targets(gt_boxes: Tensor, row: Tensor, col: Tensor, grid: tuple[int, int],
                   image_size: tuple[int, int]) -> Tensor:
    """(B, M, 4) xyxy pixels in cells (row, col) (B, M) -> (B, M, 4) x, y offsets in the cell, sqrt(w),
    sqrt(h) as image fractions (darknet's label grid: ``x * side - col``, ``sqrt(w)``)."""
    height, width = image_size
    cx = (gt_boxes[..., 0] + gt_boxes[..., 2]) * 0.5 * (grid[1] / width) - col
    cy = (gt_boxes[..., 1] + gt_boxes[..., 3]) * 0.5 * (grid[0] / height) - row
    sqrt_w = ((gt_boxes[..., 2] - gt_boxes[..., 0]).clamp(min=0) / width).sqrt()
    sqrt_h = ((gt_boxes[..., 3] - gt_boxes[..., 1]).clamp(min=0) / height).sqrt()
    return torch.stack([cx, cy, sqrt_w, sqrt_h], dim=-1)


def assign_cells(pred_boxes: Tensor, targets: dict[str, Tensor], grid: tuple[int, int],
                 image_size: tuple[int, int]) -> CellAssignment:
    """YOLOv1's assignment (sec. 2 and 2.2), batched over the padded batch.

    The cell holding a GT's centre is responsible for it; a cell learns one GT, the first of the
    image's list (darknet's label grid skips a cell already filled; darknet shuffles an image's boxes
    first, so which one varies between epochs); of its predictors the one whose current box has the
    highest IoU with that GT learns it (ties: the lower index, e.g. all zero; darknet takes the
    lowest RMSE when every IoU is 0, the paper says nothing of it).
    Difficult GTs claim no cell; a cell holding only difficult centres gets no confidence loss
    (neither object nor no-object: the object is there, but VOC does not ask for it), as SSD's
    head ignores priors matched to difficult objects.

    Args:
        pred_boxes: (B, cells, nb, 4) xyxy pixels of the predicted boxes (detached).
        targets: boxes (B, M, 4), mask (B, M), optional difficult (B, M).
        grid: (S_h, S_w); image_size: (H, W).
    """
    gt_boxes, mask = targets["boxes"].float(), targets["mask"].bool()
    difficult = targets.get("difficult")
    difficult = torch.zeros_like(mask) if difficult is None else difficult.bool() & mask
    batch, cells, num_boxes = pred_boxes.shape[:3]
    row, col = cells_of_centres(gt_boxes, grid, image_size)
    slot = row * grid[1] + col
    owner = owner_of_slots(slot, mask & ~difficult, cells, keep="first")
    has_obj = owner >= 0
    ignore = (owner_of_slots(slot, difficult, cells) >= 0) & ~has_obj
    gt_of_cell = gather_gt(gt_boxes, owner)  # (B, cells, 4)
    iou = batched_box_iou(pred_boxes.reshape(-1, num_boxes, 4), gt_of_cell.reshape(-1, 1, 4))
    iou = iou.view(batch, cells, num_boxes) * has_obj.unsqueeze(-1)
    best = iou.argmax(-1)  # argmax returns the first of equal maxima: the lower predictor index
    responsible = nn.functional.one_hot(best, num_boxes).bool() & has_obj.unsqueeze(-1)
    target = gather_gt(encode_targets(gt_boxes, row, col, grid, image_size), owner)
    return CellAssignment(owner=owner, responsible=responsible, iou=iou, ignore=ignore, target=target)
