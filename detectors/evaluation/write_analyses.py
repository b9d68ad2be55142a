"""The files of an evaluation beyond mAP: the confusion matrix, P/R/F1 against the score threshold and
the per-image AP ranking, all from one matching at IoU 0.5 (see each module for the definitions).

Written into the evaluation's folder:

* ``confusion_matrix.csv``, ``confusion_matrix.png`` (counts), ``confusion_matrix_normalized.png``
  (row-normalised), at IoU 0.5 and the operating threshold (:mod:`detectors.evaluation.confusion`);
* ``threshold_curves.csv`` and ``.png``: precision, recall, F1 against the threshold per class and all
  classes; ``best_f1_thresholds.csv``: the best-F1 threshold of each class and of all classes
  (:mod:`detectors.evaluation.threshold_curves`);
* ``per_image_ap.csv``, ``lowest_ap_images.png``, ``highest_ap_images.png``
  (:mod:`detectors.evaluation.image_ranking`).

The operating threshold is the one given (evaluate.py: the checkpoint's best-F1 threshold of its last
validation, as ``predict.py score_threshold=auto`` uses it), else this evaluation's own best-F1
threshold over all classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detectors.evaluation.confusion import confusion_matrix, plot_confusion_matrix, write_confusion_csv
from detectors.evaluation.image_ranking import per_image_ap, plot_ranked_images, ranked_images, write_per_image_csv
from detectors.evaluation.scored_detections import match_at_iou50
from detectors.evaluation.threshold_curves import (
    CSV_GRID,
    PLOT_GRID,
    best_f1_table,
    curves_on_grid,
    format_best_f1,
    plot_threshold_curves,
    write_best_f1_csv,
    write_threshold_curves_csv,
)

log = logging.getLogger(__name__)

__all__ = ["FALLBACK_THRESHOLD", "write_analyses"]

# the operating threshold when none is given and no threshold of this evaluation finds a true positive
FALLBACK_THRESHOLD = 0.5


def write_analyses(
    s: dict[str, Tensor],
    class_names: Sequence[str],
    image_ids: Sequence[int],
    out_dir: str | Path,
    operating_threshold: float | None = None,
    operating_threshold_source: str = "",
    file_names: Mapping[int, str] | None = None,
    num_ranked_images: int = 10,
    load_picture: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Write the files listed in the module docstring.

    Args:
        s: ``ScoredDetections.gathered()``'s flat tensors; image ``i`` of them has id ``image_ids[i]``.
        class_names: the names of labels 0..C-1.
        out_dir: the folder.
        operating_threshold: the confusion matrix's and the pictures' score threshold (None: this
            evaluation's best-F1 threshold); ``operating_threshold_source`` says where it comes from.
        file_names: image id -> file, in the CSV and the picture titles.
        num_ranked_images: images drawn at each end of the ranking (0: no pictures).
        load_picture: image id -> (image ``(3, H, W)`` uint8 at network size, frame ``(4,)``, ``(H0, W0)``) or
            None; without it no pictures are drawn.

    Returns:
        ``written`` (kind -> path), ``best_f1`` (:func:`best_f1_table`), ``operating_threshold`` and
        ``operating_threshold_source``, ``confusion`` ``(C + 1, C + 1)``, ``per_image_ap`` ``(I,)``.
    """
    out = Path(out_dir)
    names = list(class_names)
    matches = match_at_iou50(s, len(names))
    table = best_f1_table(s, matches, names)
    if operating_threshold is None:
        overall = table[-1]["threshold"]
        operating_threshold = overall if overall is not None else FALLBACK_THRESHOLD
        operating_threshold_source = ("the best-F1 threshold (all classes) of this evaluation" if overall is not None
                                      else "no threshold gives a true positive here: a fixed 0.5")
    threshold = float(operating_threshold)
    where = f"score > {threshold:.4f}: {operating_threshold_source}" if operating_threshold_source else \
        f"score > {threshold:.4f}"
    written: dict[str, Path] = {}

    curves = curves_on_grid(s, matches, len(names), CSV_GRID)
    written["thr_curves"] = write_threshold_curves_csv(curves, CSV_GRID, names, out / "threshold_curves.csv")
    written["thr_curves_png"] = plot_threshold_curves(curves_on_grid(s, matches, len(names), PLOT_GRID), PLOT_GRID,
                                                      names, table[-1], out / "threshold_curves.png")
    written["best_f1"] = write_best_f1_csv(table, out / "best_f1_thresholds.csv")

    matrix = confusion_matrix(s, matches, len(names), threshold)
    written["confusion"] = write_confusion_csv(matrix, names, out / "confusion_matrix.csv")
    written["confusion_png"] = plot_confusion_matrix(matrix, names, out / "confusion_matrix.png", False, where)
    written["confusion_nrm"] = plot_confusion_matrix(matrix, names, out / "confusion_matrix_normalized.png", True,
                                                     where)

    ap, num_gt = per_image_ap(s, matches, len(names), len(image_ids))
    kept = s["det_scores"] > threshold
    num_dets = torch.bincount(s["det_image"][kept].cpu(), minlength=len(image_ids))
    written["per_image_ap"] = write_per_image_csv(ap, num_gt, num_dets, image_ids, dict(file_names or {}),
                                                  out / "per_image_ap.csv")
    if num_ranked_images > 0 and load_picture is not None:
        lowest, highest = ranked_images(ap, num_gt, num_ranked_images)
        for kind, indices in (("lowest", lowest), ("highest", highest)):
            title = (f"the {len(indices)} images of {kind} AP@0.5; GT black in white, predictions with {where}")
            path = plot_ranked_images(indices, s, ap, num_gt, image_ids, dict(file_names or {}),
                                      lambda i: load_picture(int(image_ids[i])), names, threshold, title,
                                      out / f"{kind}_ap_images.png")
            if path is not None:
                written[f"{kind}_ap"] = path

    log.debug("best-F1 score thresholds at IoU 0.5 (boxes scored above the threshold are kept):\n%s",
             format_best_f1(table))
    log.info("confusion matrix and ranked pictures at %s", where)
    return {"written": written, "best_f1": table, "operating_threshold": threshold,
            "operating_threshold_source": operating_threshold_source, "confusion": matrix, "per_image_ap": ap}
