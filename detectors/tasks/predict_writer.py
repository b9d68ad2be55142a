"""What ``python predict.py`` writes into its run folder, batch by batch.

* ``images/<name>``: each image with its boxes drawn (class colour, "name score"), at its own size; the
  frames of a video go into ``images/<video stem>.mp4`` (one frame per predicted frame), or, where
  OpenCV has no mp4v encoder, into ``images/<video stem>_<frame>.jpg``.
* ``predictions.json``: a COCO dataset with scores, ``{"images": [{id, file_name, width, height}],
  "annotations": [{id, image_id, file_name, category_id, bbox [x, y, w, h], score}], "categories":
  [{id, name}], "skipped": [{file_name, reason}], "score_threshold", "checkpoint"}``. Boxes are in the
  original image's pixels; category ids as evaluation writes them (``evaluation.results``).
  ``annotations`` alone is a COCO results list (pycocotools' ``loadRes``), and pycocotools' ``COCO``
  indexes the whole file as it is.
* ``voc/`` and ``yolo/`` (when asked): the predictions as a dataset this framework reads back
  (``data=voc``/``data=yolo``, split ``split``), written by the formats' own writers
  (``write_voc``, ``write_yolo``), so the boxes read back are the float32 boxes written. The images are
  symlinked (or copied) from the inputs; video frames are first saved, undrawn, to ``frames/``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from detectors.data.convert import ImagePlacer
from detectors.data.formats.common import IMAGE_SUFFIXES
from detectors.data.formats.voc import write_voc
from detectors.data.formats.yolo import write_yolo
from detectors.data.records import Record
from detectors.evaluation.plots import draw_sample, label_font
from detectors.evaluation.results import coco_detections, write_json

log = logging.getLogger(__name__)

__all__ = ["PredictionWriter", "drawing_sizes"]


def drawing_sizes(orig_size: Sequence[int]) -> tuple[int, int]:
    """(line width, label font size) in pixels for an image of ``orig_size`` (H0, W0): 2 and 13 px at
    640 px, growing with the longer side so the boxes stay visible on a 4000 px photo."""
    longest = max(int(orig_size[0]), int(orig_size[1]))
    return max(2, round(longest / 320)), max(11, round(longest / 50))


def _drawn_name(name: str) -> str:
    """The drawn image's file name: the input's, with ``.jpg`` for a suffix OpenCV does not write."""
    return name if Path(name).suffix.lower() in IMAGE_SUFFIXES else f"{name}.jpg"


def _write_rgb(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"OpenCV could not write {path}")


class PredictionWriter:
    """Writes the files of one prediction run into ``output_dir`` (see the module doc).

    Args:
        output_dir: the run folder.
        class_names, category_ids: name and COCO category id of each label 0..C-1.
        draw: write the drawn images (or video) under ``images/``.
        json_file: the results file's name; None: not written.
        voc, yolo: write ``voc/`` and ``yolo/``; ``split``: their split (image set / image folder) name.
        image_files: how ``voc/`` and ``yolo/`` get the images: 'symlink', 'copy' or 'hardlink'.
        max_boxes_drawn: the best-scoring boxes drawn per image (all go into the files).
        video: the input video, if it is one; ``video_fps``: the frame rate of the drawn video.
        score_threshold, checkpoint: recorded in the results file.
        writer_threads: threads that draw and write the images (0: this thread; a video's frames always are).

    ``add`` takes each batch's predictions, already cut to what is written; ``close`` writes the
    rest and returns what was written: kind -> path.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        category_ids: Sequence[int],
        draw: bool = True,
        json_file: str | None = "predictions.json",
        voc: bool = False,
        yolo: bool = False,
        split: str = "predict",
        image_files: str = "symlink",
        max_boxes_drawn: int = 100,
        video: Path | None = None,
        video_fps: float = 0.0,
        score_threshold: float = 0.3,
        checkpoint: str = "",
        writer_threads: int = 2,
    ):
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.category_ids = [int(c) for c in category_ids]
        self.draw = draw
        self.json_file = json_file
        self.voc, self.yolo, self.split = voc, yolo, split
        self.placer = ImagePlacer(image_files)
        self.max_boxes_drawn = max_boxes_drawn
        self.video = Path(video) if video is not None else None
        self.video_fps = video_fps if video_fps > 0 else 25.0
        self.score_threshold = score_threshold
        self.checkpoint = checkpoint
        self.font = label_font() if draw else None
        self.images: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []
        self.records: list[Record] = []
        self.drawn = 0
        # drawing and encoding a picture costs 8 ms at 640 x 480 and 0.6 s at 4000 x 3000 on one core, more than
        # a GPU's forward: threads draw them (OpenCV's encoder and much of PIL release the GIL)
        self._threads = max(int(writer_threads), 0)
        self._pool = ThreadPoolExecutor(self._threads) if draw and self._threads else None
        self._pending: deque[Future] = deque()
        self._video_writer: cv2.VideoWriter | None = None
        self._video_failed = False

    @property
    def needs_originals(self) -> bool:
        """Whether ``add`` needs the decoded images (``originals``): to draw, or to save video frames."""
        return self.draw or (self.video is not None and (self.voc or self.yolo))

    def add(self, batch: dict[str, Any], preds: Sequence[dict[str, Tensor]]) -> None:
        """One batch: ``batch`` as ``collate_images`` made it (CPU), ``preds`` per image ``boxes`` ``(N, 4)``
        xyxy in the original pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` (CPU)."""
        names, indices = batch["names"], batch["indices"].tolist()
        sizes = batch["orig_sizes"].tolist()
        for index, name, (h, w) in zip(indices, names, sizes):
            self.images.append({"id": index, "file_name": name, "width": w, "height": h})
        name_of = dict(zip(indices, names))
        for entry in coco_detections(preds, indices, self.category_ids):
            self.detections.append({"image_id": entry["image_id"], "file_name": name_of[entry["image_id"]],
                                    **{k: entry[k] for k in ("category_id", "bbox", "score")}})
        for i, pred in enumerate(preds):
            original = batch["originals"][i].numpy() if "originals" in batch else None
            if self.draw:
                self._draw(original, pred, names[i])
            if self.voc or self.yolo:
                self._record(pred, names[i], batch["paths"][i], original, sizes[i])

    def _picture(self, original: np.ndarray, pred: dict[str, Tensor]) -> np.ndarray:
        """``(H0, W0, 3)`` uint8 RGB: the original with its boxes drawn."""
        width, font_size = drawing_sizes(original.shape[:2])
        frame = (1.0, 1.0, 0.0, 0.0)  # the boxes are in the original's pixels already
        picture = draw_sample(torch.from_numpy(original).permute(2, 0, 1), pred, None, original.shape[:2],
                              self.class_names, score_threshold=-math.inf, max_boxes=self.max_boxes_drawn,
                              frame=frame, line_width=width, font=self.font, font_size=font_size)
        return np.ascontiguousarray(picture.permute(1, 2, 0).numpy())

    def _draw_file(self, original: np.ndarray, pred: dict[str, Tensor], name: str) -> None:
        _write_rgb(self._picture(original, pred), self.output_dir / "images" / _drawn_name(name))

    def _draw(self, original: np.ndarray, pred: dict[str, Tensor], name: str) -> None:
        self.drawn += 1
        if self.video is not None:  # in order, in this thread: the video's frames follow each other
            picture = self._picture(original, pred)
            if not self._video_frame(picture):
                _write_rgb(picture, self.output_dir / "images" / _drawn_name(name))
            return
        if self._pool is None:
            self._draw_file(original, pred, name)
            return
        # a bounded queue: a fast device must not pile up decoded originals faster than they are written
        while len(self._pending) >= 4 * self._threads:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._draw_file, original, pred, name))

    def _video_frame(self, picture: np.ndarray) -> bool:
        """Append a drawn frame to ``images/<stem>.mp4``; False when no encoder is there (frames as images)."""
        if self._video_failed:
            return False
        if self._video_writer is None:
            path = self.output_dir / "images" / f"{self.video.stem}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            h, w = picture.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), self.video_fps, (w, h))
            if not writer.isOpened():
                log.warning("OpenCV cannot write %s (no mp4v encoder): the drawn frames are written as images", path)
                self._video_failed = True
                return False
            self._video_writer, self.video_path = writer, path
        self._video_writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        return True

    def _record(self, pred: dict[str, Tensor], name: str, path: str | None, original: np.ndarray | None,
                size: Sequence[int]) -> None:
        if path is None:  # a video frame: the datasets need it as a file
            frame_file = self.output_dir / "frames" / name
            _write_rgb(original, frame_file)
            path = str(frame_file)
        self.records.append(Record(image_id=len(self.records), file=path, width=size[1], height=size[0],
                                   boxes=pred["boxes"].numpy(), labels=pred["labels"].numpy()))

    def close(self, skipped: Sequence[tuple[str, str]] = ()) -> dict[str, Path]:
        """Write the results file and the datasets, finish the video; returns kind -> path written."""
        written: dict[str, Path] = {}
        while self._pending:  # a drawing that failed raises here
            self._pending.popleft().result()
        if self._pool is not None:
            self._pool.shutdown()
        if self._video_writer is not None:
            self._video_writer.release()
            written["video"] = self.video_path
        if self.draw and self.drawn and "video" not in written:
            written["images"] = self.output_dir / "images"
        if self.json_file:
            categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
            annotations = [{"id": n + 1, **d} for n, d in enumerate(self.detections)]
            data = {"images": self.images, "annotations": annotations, "categories": categories,
                    "skipped": [{"file_name": f, "reason": r} for f, r in skipped],
                    "score_threshold": self.score_threshold, "checkpoint": self.checkpoint}
            written["json"] = write_json(data, self.output_dir / self.json_file)
        if self.voc:
            root = self.output_dir / "voc"
            write_voc(root, {self.split: self.records}, self.class_names, self.placer)
            # the VOC reader takes the class names from data.classes (or sorts those it finds): here they are
            (root / "classes.txt").write_text("".join(f"{c}\n" for c in self.class_names))
            written["voc"] = root
        if self.yolo:
            root = self.output_dir / "yolo"
            root.mkdir(parents=True, exist_ok=True)
            write_yolo(root, {self.split: self.records}, self.class_names, self.placer)
            written["yolo"] = root
        return written
