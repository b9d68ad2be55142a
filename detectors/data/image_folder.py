"""The inputs of ``python predict.py``: image files (one, a folder, a glob) or the frames of a video,
decoded to RGB and resized as evaluation resizes them, with the frame that maps boxes back.

A sample is a dict:

* ``image`` ``(3, H, W)`` uint8 at network size (``build_eval_transform``: stretch or letterbox);
* ``orig_size`` ``(H0, W0)`` of the decoded file (EXIF orientation applied);
* ``frame`` ``(scale_x, scale_y, pad_left, pad_top)``: where the original lies in ``image``
  (``transforms.input_frame``, what ``DetectionModule.predictions_in_original_frame`` inverts);
* ``name``: the file's path relative to the input's root (``sub/a.jpg``), or ``<video stem>_<frame>.jpg``;
* ``index``: the image id, the file's position in the sorted list or the frame's number in the video;
* ``path``: the file (image files only); ``original``: ``(H0, W0, 3)`` uint8 RGB, when asked for.

A file that cannot be decoded (or resized) gives ``{"name", "index", "error"}`` instead: the loader
goes on, and the caller names it. Grayscale, 16-bit and alpha images decode to 3-channel 8-bit RGB
(OpenCV's ``IMREAD_COLOR``: the alpha channel is dropped, not composited).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from detectors.data.formats.common import IMAGE_SUFFIXES, read_image
from detectors.data.transforms import input_frame

log = logging.getLogger(__name__)

# suffixes read as videos without probing (any other non-image file is probed with OpenCV)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
_GLOB_CHARS = "*?["


@dataclass
class Inputs:
    """What ``input=`` names: image files (sorted) with the folder their names are relative to, or a video.

    ``ignored``: files of a named folder that are not images by their suffix (not read, counted)."""

    root: Path
    files: list[Path] = field(default_factory=list)
    video: Path | None = None
    ignored: list[Path] = field(default_factory=list)

    def name(self, path: Path) -> str:
        """``path`` relative to the root: unique among the inputs, and the name of its outputs."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return Path(os.path.relpath(path, self.root)).as_posix()


def is_video(path: Path) -> bool:
    """A video file by its suffix, or a non-image file that OpenCV opens with more than one frame (a GIF)."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    capture = cv2.VideoCapture(str(path))
    try:
        return capture.isOpened() and capture.get(cv2.CAP_PROP_FRAME_COUNT) > 1
    finally:
        capture.release()


def _glob_root(pattern: str) -> Path:
    """The folder part of ``pattern`` before its first wildcard (names are relative to it)."""
    literal = []
    for part in Path(pattern).parts[:-1]:
        if any(c in part for c in _GLOB_CHARS):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def find_inputs(spec: str, recursive: bool = False) -> Inputs:
    """Resolve ``input=``: an image file, a folder (its images, sorted by path; subfolders too with
    ``recursive``), a glob (every file it matches, sorted; ``**`` spans folders), or a video file.

    A folder's files are picked by suffix (``IMAGE_SUFFIXES``); a glob's and a single file are read
    whatever their suffix, so an unreadable one is reported as skipped rather than left out silently.

    Raises:
        FileNotFoundError: nothing there, no image in the folder, or a glob that matches no file.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if p.is_file())
        files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            hint = "" if recursive else " (recursive=true also reads its subfolders)"
            raise FileNotFoundError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in the folder {path}{hint}")
        return Inputs(root=path, files=files, ignored=[p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES])
    if path.is_file():
        return Inputs(root=path.parent, video=path) if is_video(path) else Inputs(root=path.parent, files=[path])
    if any(c in spec for c in _GLOB_CHARS):
        pattern = os.path.expanduser(spec)
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"input {spec}: no file matches this pattern")
        return Inputs(root=_glob_root(pattern), files=matches)
    raise FileNotFoundError(f"input {spec} not found (give an image, a folder of images, a glob or a video file)")


def prepare(image: np.ndarray, transform: A.Compose, resize: str, keep_original: bool) -> dict[str, Any]:
    """The network input of one decoded ``(H0, W0, 3)`` uint8 RGB image, as ``DetectionDataset`` makes it."""
    out = transform(image=image, bboxes=np.zeros((0, 4), np.float32), box_index=np.zeros(0, np.int64))["image"]
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1),
        "orig_size": tuple(image.shape[:2]),
        "frame": input_frame(image.shape[:2], out.shape[:2], resize),
    }
    if keep_original:
        sample["original"] = torch.from_numpy(np.ascontiguousarray(image))
    return sample


class ImageFiles(Dataset):
    """The images of ``inputs.files``, each resized by ``transform`` (an evaluation transform whose resize is
    ``resize``, 'stretch' or 'letterbox'); ``keep_original``: also return the decoded file (for drawing)."""

    def __init__(self, inputs: Inputs, transform: A.Compose, resize: str, keep_original: bool = False):
        self.inputs = inputs
        self.transform = transform
        self.resize = resize
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.inputs.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.inputs.files[index]
        name = self.inputs.name(path)
        try:
            sample = prepare(read_image(path), self.transform, self.resize, self.keep_original)
        except Exception as e:  # noqa: BLE001 (whatever a user's file does to the decoder, it is skipped and named)
            return {"name": name, "index": index, "error": str(e) or type(e).__name__}
        return {**sample, "name": name, "index": index, "path": str(path)}


class VideoFrames(IterableDataset):
    """Every ``stride``-th frame of a video (frame numbers 0, stride, 2 * stride, ...), in order.

    Decoding is sequential, so one loader worker reads (any others yield nothing); the frames in
    between are only grabbed, not converted. A video that opens but gives no frame yields one error.
    """

    def __init__(self, path: Path, transform: A.Compose, resize: str, stride: int = 1, keep_original: bool = False):
        if stride < 1:
            raise ValueError(f"video_stride must be at least 1, got {stride}")
        self.path = Path(path)
        self.transform = transform
        self.resize = resize
        self.stride = int(stride)
        self.keep_original = keep_original

    def frame_name(self, index: int) -> str:
        return f"{self.path.stem}_{index:06d}.jpg"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        if worker is not None and worker.id > 0:
            return
        capture = cv2.VideoCapture(str(self.path))
        read = 0
        try:
            if not capture.isOpened():
                yield {"name": self.path.name, "index": 0, "error": f"unreadable video {self.path}"}
                return
            index = 0
            while True:
                if index % self.stride:
                    if not capture.grab():
                        break
                else:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    read += 1
                    image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    yield {**prepare(image, self.transform, self.resize, self.keep_original),
                           "name": self.frame_name(index), "index": index}
                index += 1
            if not read:
                yield {"name": self.path.name, "index": 0,
                       "error": f"no frame of the video {self.path} could be decoded"}
        finally:
            capture.release()


def video_properties(path: Path) -> tuple[int, float]:
    """(frame count as the container states it, 0 if unknown; frames per second, 0 if unknown)."""
    capture = cv2.VideoCapture(str(path))
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0), max(float(capture.get(cv2.CAP_PROP_FPS)), 0.0)
    finally:
        capture.release()


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of the decoded samples, and the names of those that failed.

    Returns ``names`` (list), ``indices`` ``(B,)`` int64, ``paths`` (list; None for video frames) and
    ``skipped`` (list of (name, reason)); when B > 0 also ``images`` ``(B, 3, H, W)`` uint8, ``orig_sizes``
    ``(B, 2)`` int64 (H0, W0), ``frames`` ``(B, 4)`` float32, and ``originals`` (list of ``(H0, W0, 3)``
    uint8) if the samples carry them. B may be 0 (every file of the batch unreadable).
    """
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {
        "skipped": [(s["name"], s["error"]) for s in samples if "error" in s],
        "names": [s["name"] for s in good],
        "indices": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "paths": [s.get("path") for s in good],
    }
    if good:
        batch["images"] = torch.stack([s["image"] for s in good])
        batch["orig_sizes"] = torch.tensor([s["orig_size"] for s in good], dtype=torch.long)
        batch["frames"] = torch.tensor([s["frame"] for s in good], dtype=torch.float32)
        if all("original" in s for s in good):
            batch["originals"] = [s["original"] for s in good]
    return batch


def device_part(batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """The tensors the model needs (``images``, ``orig_sizes``, ``frames``), on ``device``."""
    return {k: batch[k].to(device, non_blocking=True) for k in ("images", "orig_sizes", "frames")}
