"""What ``python -m detectors.export`` does: rebuild the model a checkpoint was trained with, write its
network as an ONNX model (``detectors.export``), then run that model in ONNX Runtime and the checkpoint in
PyTorch on the same images and compare their outputs.

    python -m detectors.export ckpt_path=PATH [format=onnx] [nms=false|true] [output=PATH] [opset=17]
        [image_size=[H,W]] [input_dtype=uint8|float32] [check_images=PATH] [check=false]

The arguments are Hydra overrides of ``configs/export.yaml`` (composed, as evaluate.py's are, so lists,
types and unknown keys are handled as there; no run folder: the output is one file). Exit status 0,
1 when ONNX Runtime and PyTorch disagree (the numbers are printed; the file is kept for inspection),
2 for a user error (one line: a missing checkpoint, a head that cannot be exported, a bad setting).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

import detectors
from detectors.checkpoints import load_checkpoint, restore_model
from detectors.data.image_folder import ImageFiles, collate_images, find_inputs, prepare
from detectors.data.shapes import ShapesGenerator
from detectors.data.transforms import STRETCH_RESIZES
from detectors.export import (
    ExportedDetector,
    ExportError,
    NMSSettings,
    Tolerance,
    export_onnx,
    run_check,
)
from detectors.noise import silence_known_noise
from detectors.tasks.predict import eval_resize_of, first_line, input_size_of

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
USAGE = ("usage: python -m detectors.export ckpt_path=PATH [format=onnx] [nms=false|true] [output=PATH] [opset=17] "
         "[image_size=[H,W]] [input_dtype=uint8|float32] [check_images=PATH] [check=false]")
FORMATS = ("onnx",)
#: (H, W) of the generated shapes images the check runs on: not the input's, so the resize runs as for real images
CHECK_IMAGE_SIZE = (240, 320)


class CheckFailed(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances (the message holds the numbers)."""


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """configs/export.yaml with the command line's overrides; ExportError (one line) for a malformed one."""
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3", job_name="export"):
            return compose("export", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 (Hydra's override and config errors: the first line says what)
        raise ExportError(first_line(e)) from None


def check_images(cfg: DictConfig, run: DictConfig, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """The images the check compares on, resized as the checkpoint's evaluation resizes: (B, 3, H, W)
    uint8, and a line that says what they are."""
    transform, resize, _ = eval_resize_of(run, size)
    count = int(cfg.check_num_images)
    if count < 1:
        raise ExportError(f"check_num_images must be at least 1, got {count}")
    if cfg.get("check_images"):
        try:
            inputs = find_inputs(str(cfg.check_images))
        except FileNotFoundError as e:
            raise ExportError(f"check_images: {first_line(e)}") from None
        if inputs.video is not None:
            raise ExportError("check_images: give images (a file, a folder or a glob), not a video")
        dataset = ImageFiles(inputs, transform, resize)
        batch = collate_images([dataset[i] for i in range(min(count, len(dataset)))])
        for name, reason in batch["skipped"]:
            log.warning("check image %s skipped: %s", name, reason)
        if not batch["names"]:
            raise ExportError(f"check_images: none of the first {count} files of {cfg.check_images} can be read")
        return batch["images"], f"{len(batch['names'])} images of {cfg.check_images} ({resize} to {size[0]}x{size[1]})"
    shapes = ShapesGenerator(count, image_size=CHECK_IMAGE_SIZE, seed=0)
    images = torch.stack([prepare(shapes[i][0], transform, resize, False)["image"] for i in range(count)])
    return images, (f"{count} generated shapes images of {CHECK_IMAGE_SIZE[0]}x{CHECK_IMAGE_SIZE[1]} ({resize} to "
                    f"{size[0]}x{size[1]})")


def metadata_of(run: DictConfig, exported: ExportedDetector, ckpt_path: str, input_dtype: str) -> dict[str, str]:
    """What a user of the ONNX file needs to feed it and read it, as ``metadata_props`` strings."""
    size = exported.image_size
    _, resize, fill = eval_resize_of(run, size)
    how = ("stretched to H x W" if resize in STRETCH_RESIZES
           else f"letterboxed into H x W (aspect kept, centred, fill {fill})")
    meta = {
        "classes": json.dumps(list(run.data.classes)),
        "input": f"images (B, 3, {size[0]}, {size[1]}) {input_dtype} RGB 0..255, {how}; normalised in the graph",
        "image_size": json.dumps(list(size)),
        "eval_resize": resize,
        "fill": json.dumps(fill),
        "head": type(exported.detector.head).__name__,
        "checkpoint": str(ckpt_path),
        "producer": f"detectors {detectors.__version__}",
    }
    if exported.nms is None:
        meta["outputs"] = ("boxes (B, N, 4) xyxy pixels of the input, clipped; scores (B, N, C) per class, "
                           "label = class index; no NMS applied")
    else:
        meta["outputs"] = ("detections (B, K, 6) [x1, y1, x2, y2, score, label] descending score, zero rows after "
                           "num_detections (B,)")
        meta.update({k: str(v) for k, v in vars(exported.nms).items()})
    return meta


def export(cfg: DictConfig) -> dict:
    """Export ``cfg.ckpt_path`` as ``cfg.format`` and check it; returns {path, check: CheckResult | None}.
    Raises ExportError for a user error, CheckFailed when the runtimes disagree."""
    silence_known_noise()
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ExportError("ckpt_path=PATH is required: python -m detectors.export ckpt_path=MODEL.ckpt")
    if cfg.format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    missing = [name for name in ("onnx", *(["onnxruntime"] if cfg.check else [])) if find_spec(name) is None]
    if missing:
        raise ExportError(f"{' and '.join(missing)} not installed: pip install -e '.[export]' (or check=false "
                          "without onnxruntime)")
    try:
        ckpt, run = load_checkpoint(cfg.ckpt_path)
        with open_dict(run):
            run.model.compile = False  # the tracer cannot trace a torch.compile'd network; the weights are the same
        module = restore_model(ckpt, run, cfg.ckpt_path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"ckpt_path: {first_line(e)}") from None
    del ckpt
    module.eval()
    size = input_size_of(cfg, module, key="image_size", error=ExportError)
    overrides = {k: cfg.get(k) for k in ("score_threshold", "iou_threshold", "max_detections", "pre_nms_top_k")}
    settings = NMSSettings.from_head(module.detector.head, overrides) if cfg.nms else None
    exported = ExportedDetector.from_module(module, size, settings)
    ckpt_path = Path(cfg.ckpt_path)
    path = Path(cfg.output) if cfg.get("output") else ckpt_path.with_name(ckpt_path.stem + ("_nms" if cfg.nms else "")
                                                                              + ".onnx")
    export_onnx(exported, path, opset=int(cfg.opset), input_dtype=str(cfg.input_dtype),
                metadata=metadata_of(run, exported, str(ckpt_path), str(cfg.input_dtype)))
    outputs = "detections (B, K, 6), num_detections (B,)" if settings else "boxes (B, N, 4), scores (B, N, C)"
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {type(module.detector.head).__name__}, input "
          f"images (B, 3, {size[0]}, {size[1]}) {cfg.input_dtype}, outputs {outputs}, opset {cfg.opset}")
    if settings is not None:
        print(f"NMS in the graph: {settings}")
    if not cfg.check:
        return {"path": path, "check": None}
    import onnxruntime

    images, what = check_images(cfg, run, size)
    tolerance = Tolerance(**OmegaConf.to_container(cfg.tolerance))
    result = run_check(path, module, exported, images, str(cfg.input_dtype), tolerance)
    header = (f"check: ONNX Runtime {onnxruntime.__version__} (CPU) against PyTorch {torch.__version__} on {what}, "
              f"one batch of {len(images)} (exported at batch 1)")
    report = "\n  ".join([header, *result.lines])
    if not result.ok:
        raise CheckFailed(f"{report}\nthe ONNX model disagrees with PyTorch; {path} is kept for inspection")
    print(report)
    return {"path": path, "check": result}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        export(compose_config(argv))
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"export: check FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
