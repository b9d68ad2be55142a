"""What ``python predict.py`` does: rebuild the model a checkpoint was trained with, run it on the user's
images (a file, a folder, a glob or a video) in batches on the device, and write the boxes, in each
image's own pixels, into the run folder (``predict_writer``).

The images are resized as evaluation resizes them (the checkpoint's ``eval_resize``, stretch or
letterbox, to its input size unless ``input_size`` says otherwise) by the loader's workers, and the
boxes go back through ``DetectionModule.predictions_in_original_frame``: the same frames and the same
inverse as evaluate.py, so a box here is the box evaluation would score.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detectors.callbacks.best_f1_threshold import describe, stored_threshold
from detectors.checkpoints import load_checkpoint, restore_model
from detectors.config import auto_precision
from detectors.data.formats.coco import COCOSource, split_paths
from detectors.data.image_folder import (
    ImageFiles,
    Inputs,
    VideoFrames,
    collate_images,
    device_part,
    find_inputs,
    video_properties,
)
from detectors.data.transforms import EVAL_PRESETS, build_eval_transform
from detectors.evaluation.results import category_ids_of
from detectors.fold_batch_norm import fold_batch_norms
from detectors.noise import silence_known_noise
from detectors.tasks.predict_writer import PredictionWriter
from detectors.tta import tta_from_config

log = logging.getLogger(__name__)

COCO_SOURCE = "detectors.data.formats.coco.COCOSource"
SKIPPED_NAMED = 10  # skipped files named in the closing summary line (the log names every one)


class PredictError(ValueError):
    """A user error predict.py reports in one line: a missing input, a file that is not a checkpoint,
    an unknown class name, a setting the model cannot take."""


def first_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error).splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label_filter(names: Sequence[str] | None, class_names: Sequence[str]) -> list[int] | None:
    """Labels of the class ``names`` to keep (None: every class); PredictError for a name the model lacks."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise PredictError(f"classes: {unknown} not among the model's classes {list(class_names)}")
    return [list(class_names).index(n) for n in names]


def run_category_ids(run: DictConfig, num_classes: int) -> list[int]:
    """The category id of each label as evaluation writes them for the checkpoint's data: label + 1, or
    for a model trained on COCO data the dataset's own ids, read from the categories of the smallest
    annotation file of its splits (they share one list). Without the files: label + 1, with a warning. A run
    config's own ``category_ids`` (an imported model's: ``python -m detectors.weights``) come first."""
    if run.get("category_ids") is not None:
        return category_ids_of(SimpleNamespace(category_ids=list(run.category_ids)), num_classes)
    source = run.get("data", {}).get("source") or {}
    if source.get("_target_") != COCO_SOURCE:
        return category_ids_of(None, num_classes)
    root, splits = Path(str(source.get("root"))), OmegaConf.to_container(source.get("splits") or {})
    present = {s: split_paths(root, spec)[0] for s, spec in splits.items() if split_paths(root, spec)[0].is_file()}
    if present:
        smallest = min(present, key=lambda s: present[s].stat().st_size)
        try:
            coco = COCOSource(root, splits={smallest: splits[smallest]}, classes=list(run.data.classes))
            return category_ids_of(coco, num_classes)
        except (FileNotFoundError, ValueError) as e:
            reason = first_line(e)
    else:
        reason = f"no annotation file of its splits under {root}"
    log.warning("the model was trained on COCO data, but its category ids cannot be read (%s): "
                "predictions.json gives label + 1 as category ids", reason)
    return category_ids_of(None, num_classes)


def score_threshold_of(setting, checkpoint: dict) -> float:
    """``score_threshold``: a number, or ``auto``: the best-F1 threshold (all classes) that training stored
    from its last validation (``detectors.callbacks.best_f1_threshold``), logged with where it comes from."""
    if str(setting) != "auto":
        try:
            return float(setting)
        except (TypeError, ValueError):
            raise PredictError(f"score_threshold must be a number or auto, got {setting!r}") from None
    stored = stored_threshold(checkpoint)
    if stored is None:
        raise PredictError("score_threshold=auto: the checkpoint stores no best-F1 threshold (it was written before "
                           "its first validation, or by a run without the best_f1_threshold callback); give a "
                           "number, e.g. score_threshold=0.3")
    log.info("score_threshold=auto: %s", describe(stored))
    return float(stored["threshold"])


def choose_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU; otherwise a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise PredictError(f"device={name}: {first_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device={name}, but no CUDA device is available (device=auto or cpu)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 autocast on a GPU that has it, and on the CPU where training and evaluation default
    to it (``detectors.config.auto_precision``), full precision elsewhere; ``bf16`` or ``32`` as said."""
    precision = str(precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if device.type == "cpu" and auto_precision() == "bf16-mixed" else None
    if precision in ("bf16", "bf16-mixed"):
        return torch.bfloat16
    if precision in ("32", "32-true", "fp32"):
        return None
    raise PredictError(f"precision must be auto, bf16 or 32, got {precision!r}")


def input_size_of(cfg: DictConfig, module: torch.nn.Module, key: str = "input_size",
                  error: type[ValueError] = PredictError) -> tuple[int, int]:
    """``cfg[key]`` (an int for a square, or [H, W]), checked against the model; null: the checkpoint's
    ``input_size``. A size the model cannot take raises ``error`` in one line."""
    size = cfg.get(key)
    if size is None:
        return module.input_size
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 2:
        raise error(f"{key} must be an int or [H, W], got {list(size)}")
    try:
        module._check_input_size(size, label=key)
    except ValueError as e:
        raise error(first_line(e)) from None
    return size


def eval_resize_of(run: DictConfig, size: tuple[int, int], resize: str | None = None) -> tuple[A.Compose, str, list]:
    """The checkpoint's evaluation resize to ``size`` (H, W): (transform, 'stretch' or 'letterbox', the
    letterbox's fill RGB); ``resize`` overrides the checkpoint's ``augment.eval_resize``."""
    augment = run.get("data", {}).get("augment") or {}
    resize = resize or augment.get("eval_resize", "stretch")
    if resize not in EVAL_PRESETS:
        raise PredictError(f"resize must be one of {', '.join(EVAL_PRESETS)} (or null: the checkpoint's), "
                           f"got {resize!r}")
    fill = augment.get("fill")
    fill = list(fill) if fill is not None else list(inspect.signature(build_eval_transform).parameters["fill"].default)
    return build_eval_transform(resize, size, fill=fill), resize, fill


def build_dataset(inputs: Inputs, cfg: DictConfig, run: DictConfig, size: tuple[int, int],
                  keep_original: bool) -> tuple[Dataset, int, float]:
    """The input dataset (images resized as evaluation resizes them), its length (frames: as the video
    states it, 0 if it does not) and the video's frame rate."""
    transform, resize, _ = eval_resize_of(run, size, cfg.get("resize"))
    log.info("images resized to %dx%d (H x W, %s, as the checkpoint's evaluation)", size[0], size[1], resize)
    if inputs.video is None:
        return ImageFiles(inputs, transform, resize, keep_original), len(inputs.files), 0.0
    stride = int(cfg.get("video_stride", 1))
    if stride < 1:
        raise PredictError(f"video_stride must be at least 1, got {stride}")
    frames, fps = video_properties(inputs.video)
    return VideoFrames(inputs.video, transform, resize, stride, keep_original), -(-frames // stride), fps / stride


def keep(preds: list[dict[str, Tensor]], score_threshold: float, labels: Tensor | None) -> list[dict[str, Tensor]]:
    """The boxes scored above ``score_threshold`` (and of ``labels``, when given), on the CPU."""
    out = []
    for p in preds:
        mask = p["scores"] > score_threshold
        if labels is not None:
            mask &= torch.isin(p["labels"], labels)
        out.append({"boxes": p["boxes"][mask].float().cpu(), "scores": p["scores"][mask].float().cpu(),
                    "labels": p["labels"][mask].long().cpu()})
    return out


def progress_bar() -> Progress:
    return Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    TimeRemainingColumn())


def predict(cfg: DictConfig) -> dict:
    """Run ``cfg.ckpt_path`` on ``cfg.input`` and write the outputs into ``cfg.paths.output_dir``.

    Returns a summary: ``images`` (predicted), ``boxes`` (written), ``skipped`` [(name, reason)],
    ``written`` {kind: path}, ``seconds`` (the loop), ``images_per_second``."""
    silence_known_noise()
    for key in ("ckpt_path", "input"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise PredictError(f"{key}=PATH is required: python predict.py ckpt_path=MODEL.ckpt input=IMAGES")
    try:
        inputs = find_inputs(str(cfg.input), bool(cfg.get("recursive", False)))
    except FileNotFoundError as e:
        raise PredictError(first_line(e)) from None
    if inputs.ignored:
        log.info("%d files of %s are not images by their suffix and are not read (e.g. %s)", len(inputs.ignored),
                 inputs.root, inputs.ignored[0].name)
    try:
        ckpt, run = load_checkpoint(cfg.ckpt_path)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(f"ckpt_path: {first_line(e)}") from None
    try:
        module = restore_model(ckpt, run, cfg.ckpt_path)
    except ValueError as e:
        raise PredictError(first_line(e)) from None
    threshold = score_threshold_of(cfg.score_threshold, ckpt)
    del ckpt
    class_names = list(run.data.classes)
    labels = label_filter(cfg.get("classes"), class_names)
    size = input_size_of(cfg, module)
    try:  # tta=true: flipped and scaled views of each image, merged (detectors/tta.py)
        tta = tta_from_config(module, cfg.get("tta"))
        if tta is not None and size != module.input_size:
            log.info(tta.describe(size))
    except ValueError as e:
        raise PredictError(first_line(e)) from None
    device = choose_device(str(cfg.get("device", "auto")))
    dtype = autocast_dtype(cfg.get("precision", "auto"), device)
    module.eval().to(device)
    if cfg.get("fold_batch_norm", True):  # one pass over each map instead of two (detectors/fold_batch_norm.py)
        log.info("batch norms folded into their convolutions: %d", fold_batch_norms(module.detector))

    out = cfg.get("output") or {}
    writer = PredictionWriter(
        cfg.paths.output_dir, class_names, run_category_ids(run, len(class_names)),
        draw=bool(out.get("images", True)), json_file=out.get("json", "predictions.json"),
        voc=bool(out.get("voc", False)), yolo=bool(out.get("yolo", False)), split=str(out.get("split", "predict")),
        image_files=str(out.get("image_files", "symlink")), max_boxes_drawn=int(out.get("max_boxes_drawn", 100)),
        video=inputs.video, score_threshold=threshold,
        checkpoint=str(cfg.ckpt_path), writer_threads=int(out.get("writer_threads", 2)))
    dataset, total, fps = build_dataset(inputs, cfg, run, size, writer.needs_originals)
    writer.video_fps = fps if fps > 0 else writer.video_fps
    workers = int(cfg.num_workers) if inputs.video is None else min(int(cfg.num_workers), 1)  # a video decodes in order
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), num_workers=workers, collate_fn=collate_images,
                        pin_memory=device.type == "cuda")
    keep_labels = torch.tensor(labels, device=device) if labels is not None else None
    log.info("%s on %s%s, %d classes; boxes scored above %g%s are written", type(module.detector.head).__name__,
             device, " (bf16 autocast)" if dtype is not None else "", len(class_names), threshold,
             f" of {list(cfg.classes)}" if labels is not None else "")

    skipped: list[tuple[str, str]] = []
    images = boxes = 0
    start = time.perf_counter()
    with progress_bar() as bar, torch.inference_mode():
        task = bar.add_task("predict", total=total or None)
        for batch in loader:
            for name, reason in batch["skipped"]:
                log.warning("skipped %s: %s", name, reason)
            skipped += batch["skipped"]
            if batch["names"]:
                on_device = module.on_after_batch_transfer(device_part(batch, device), 0)  # normalise, as evaluation
                autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
                with autocast:
                    preds = module.predictions_in_original_frame(on_device)
                preds = keep(preds, threshold, keep_labels)
                writer.add(batch, preds)
                images += len(preds)
                boxes += sum(len(p["scores"]) for p in preds)
            bar.update(task, advance=len(batch["names"]) + len(batch["skipped"]))
    written = writer.close(skipped)  # waits for the drawings still being written: they count in the time
    seconds = time.perf_counter() - start

    rate = images / seconds if seconds > 0 else 0.0
    summary = f"predicted {images} images, {boxes} boxes above {threshold:g}, in {seconds:.1f} s ({rate:.1f} images/s)"
    if skipped:
        named = ", ".join(name for name, _ in skipped[:SKIPPED_NAMED])
        more = f" and {len(skipped) - SKIPPED_NAMED} more" if len(skipped) > SKIPPED_NAMED else ""
        summary += f"; skipped {len(skipped)} unreadable: {named}{more}"
    else:
        summary += "; nothing skipped"
    log.info(summary)
    for kind, path in written.items():
        log.info("  %-6s %s", kind, path)
    return {"images": images, "boxes": boxes, "skipped": skipped, "written": written, "seconds": seconds,
            "images_per_second": rate}


def main(cfg: DictConfig) -> int:
    """predict.py's body: the exit status, 0; a user error is one line on stderr and status 2."""
    try:
        predict(cfg)
    except PredictError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    return 0
