"""Class names of darknet models and the data config their run config gets.

darknet's ``coco.names`` spells six COCO categories the VOC way (motorbike, aeroplane, sofa, pottedplant,
diningtable, tvmonitor); the checkpoint keeps COCO's own spelling, so that on COCO data ``COCOSource`` finds every
class among the annotation file's categories and evaluation writes COCO's category ids (1..90).
"""

from __future__ import annotations

# COCO's 80 detection categories in category-id order (ids 1..90 with gaps): darknet's label order
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# darknet's coco.names spelling -> COCO's
DARKNET_TO_COCO = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
                   "pottedplant": "potted plant", "diningtable": "dining table", "tvmonitor": "tv"}
# Pascal VOC's 20 classes (darknet's voc.names, the VOC annotation files' spelling)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def data_for_names(names: list[str] | None, num_classes: int) -> tuple[str, list[str]]:
    """(data config, class names) for a darknet model of ``num_classes``: COCO's names (in COCO's spelling) and
    ``data=coco`` when the names are COCO's, VOC's names and ``data=voc`` for VOC's, else ``data=yolo`` with the
    names as given. ``names`` None: COCO's for 80 classes, VOC's for 20, else class_0 ..."""
    if names is None:
        names = list(COCO_CLASSES if num_classes == 80 else VOC_CLASSES if num_classes == 20
                     else (f"class_{i}" for i in range(num_classes)))
    coco = [DARKNET_TO_COCO.get(n, n) for n in names]
    if tuple(coco) == COCO_CLASSES:
        return "coco", coco
    if tuple(names) == VOC_CLASSES:
        return "voc", list(names)
    return "yolo", list(names)
