"""``python -m detectors.weights darknet``: darknet cfgs + weights carried by the framework's own parts, checked
against OpenCV's darknet reader (``cv2.dnn.readNetFromDarknet``, an implementation of darknet's forward pass
independent of this project), and the importer's refusals.

Each official cfg (../shared/darknet/cfg) runs at a small input (its width and height set to 96) with random
weights written in darknet's format by this file's own writer, which walks the cfg for the channel counts (so the
float count is not the importer's). The predictors' t_w, t_h rows stay small (the framework's decoder caps them at
ln(62.5), far above a trained detector's), their objectness and class rows large, so that some class scores pass
OpenCV's thresholds.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from detectors.checkpoints import load_checkpoint, restore_model
from detectors.layers import DarknetBatchNorm2d
from detectors.losses import class_probabilities
from detectors.necks.passthrough import darknet_reorg
from detectors.weights import ImportError_
from detectors.weights.darknet import load_darknet_model, main

# the reference: OpenCV 4's darknet reader (OpenCV 5 removed it; the dev extra pins opencv below 5)
needs_opencv_darknet = pytest.mark.skipif(
    not hasattr(getattr(cv2, "dnn", None), "readNetFromDarknet"),
    reason=f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromDarknet (OpenCV 5 removed it), the reference of this "
           "test: pip install 'opencv-python-headless>=4.8,<5'")

DARKNET = Path(__file__).resolve().parents[2] / "shared" / "darknet"
SIZE = 96
# OpenCV's yolo layers zero the class scores at or below 0.2 (its default `thresh`); its region layer takes the cfg's
# `thresh` (yolov2.cfg: .6, darknet's training threshold)
YOLO_THRESH = 0.2

pytestmark = pytest.mark.skipif(not (DARKNET / "cfg").is_dir(), reason=f"darknet's cfgs not found at {DARKNET}")


def cfg_sections(path: Path) -> list[tuple[str, dict[str, str]]]:
    sections = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("["):
            sections.append((line[1:-1], {}))
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def small_cfg(name: str, folder: Path, size: int = SIZE) -> Path:
    """The official cfg with its input set to ``size`` x ``size``."""
    text = (DARKNET / "cfg" / f"{name}.cfg").read_text()
    text = re.sub(r"(?m)^width\s*=.*$", f"width={size}", text, count=1)
    text = re.sub(r"(?m)^height\s*=.*$", f"height={size}", text, count=1)
    path = folder / f"{name}.cfg"
    path.write_text(text)
    return path


def uniform(rng: np.random.Generator, n: int, std) -> np.ndarray:
    """n float32 of mean 0 and standard deviation ``std`` (uniform: cheaper to draw than normal by the million)."""
    return (rng.random(n, dtype=np.float32) * 2 - 1) * (np.sqrt(3) * np.asarray(std, np.float32))


def write_empty_weights(path: Path, floats: int, version: tuple[int, int] = (0, 2)) -> None:
    """A header and ``floats`` zeros (a sparse file: nothing written but the header)."""
    with path.open("wb") as f:
        f.write(header(version))
        f.truncate(len(header(version)) + 4 * floats)


def header(version: tuple[int, int]) -> bytes:
    """major, minor, revision, then ``seen``: int64 from version 0.2, int32 before (parser.c's load_weights_upto)."""
    seen = np.array([64000], "<i8" if version[0] * 10 + version[1] >= 2 else "<i4")
    return np.array([*version, 0], "<i4").tobytes() + seen.tobytes()


def cfg_convs(cfg: Path) -> list[tuple[int, int, bool]]:
    """(filters, fan-in, batch-normalised) of each conv of ``cfg``, in order: the channels walked through the cfg's
    routes (concatenations), reorg (x4) and the layers that keep them."""
    channels: list[int] = []
    prev, convs = 3, []
    for i, (kind, o) in enumerate(cfg_sections(cfg)[1:]):
        if kind == "convolutional":
            c = int(o["filters"])
            convs.append((c, prev * int(o["size"]) ** 2, bool(int(o.get("batch_normalize", 0)))))
        elif kind == "route":
            c = sum(channels[j if j >= 0 else i + j] for j in (int(x) for x in o["layers"].split(",")))
        elif kind == "reorg":
            c = prev * 4
        else:
            c = prev
        channels.append(c)
        prev = c
    return convs


def float_count(cfg: Path) -> int:
    return sum((4 * n if bn else n) + n * fan for n, fan, bn in cfg_convs(cfg))


def write_random_weights(cfg: Path, path: Path, seed: int = 0, version: tuple[int, int] = (0, 2)) -> int:
    """darknet's .weights for ``cfg`` (parser.c's save_weights order): header, then per conv biases [, scales,
    rolling mean, rolling variance], kernel. Returns the float count."""
    rng = np.random.default_rng(seed)
    kind, options = next((kind, o) for kind, o in cfg_sections(cfg) if kind in ("yolo", "region"))
    classes, region = int(options["classes"]), kind == "region"
    floats = []
    for n, fan, bn in cfg_convs(cfg):
        if bn:
            floats += [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                       rng.uniform(0.5, 2.0, n), uniform(rng, n * fan, 1 / np.sqrt(fan))]
        else:  # a predictor: rows t_x, t_y, t_w, t_h, t_o, classes per anchor
            row = np.arange(n) % (5 + classes)
            # a softmax (region) needs peaked logits to pass 0.6; sigmoids (yolo) saturate (score ties) if too large
            cls_std, obj_std = (30.0, 10.0) if region else (3.0, 3.0)
            row_std = np.select([row >= 5, row == 4, (row == 2) | (row == 3)], [cls_std, obj_std, 0.3], 3.0)
            floats += [rng.normal(0, 0.1, n), uniform(rng, n * fan, np.repeat(row_std / np.sqrt(fan), fan))]
    body = np.concatenate([f.astype("<f4") for f in floats])
    path.write_bytes(header(version) + body.tobytes())
    return len(body)


def opencv_outputs(cfg: Path, weights: Path, image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """OpenCV's outputs: per detection layer, coarsest first, the predictor conv's map (1, A (5 + C), h, w) and the
    layer's rows (h w A, 5 + C): cx, cy, w, h (fractions of the input), objectness, class scores."""
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    names = list(net.getLayerNames())
    outs = list(net.getUnconnectedOutLayersNames())
    convs = [next(n for n in reversed(names[:names.index(o)]) if n.startswith("conv_")) for o in outs]
    net.setInput(image)
    results = net.forward(convs + outs)
    return results[:len(outs)], results[len(outs):]


def imported(name: str, folder: Path, version: tuple[int, int], size: int = SIZE
             ) -> tuple[Path, Path, torch.nn.Module]:
    """The cfg at ``size``, its random weights (header ``version``) and the framework model the importer fills."""
    cfg = small_cfg(name, folder, size)
    weights = folder / f"{name}.weights"
    write_random_weights(cfg, weights, seed=len(name), version=version)
    return cfg, weights, load_darknet_model(cfg, weights)[0]


def close(ours: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference relative to the reference's scale (its largest magnitude)."""
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


# each cfg with a header version (seen as int32 in 0.1, int64 in 0.2: both as OpenCV reads them) and an input
# size: yolov3-spp's at 256, where its 8 x 8 map tells its 5, 9 and 13 pools apart (at 96 each covers the 3 x 3 map)
CFGS = [("yolov3", (0, 2), SIZE), ("yolov3-voc", (0, 1), SIZE), ("yolov3-spp", (0, 2), 256), ("yolov2", (0, 1), SIZE),
        ("yolov2-voc", (0, 2), SIZE)]


# the tiny cfgs (9-11M parameters) run in the quick tier
TINY_CFGS = [("yolov3-tiny", (0, 2), SIZE), ("yolov2-tiny", (0, 1), SIZE)]


@pytest.mark.parametrize(("name", "version", "size"),
                         [*TINY_CFGS, *(pytest.param(*c, marks=pytest.mark.slow) for c in CFGS)],
                         ids=[name for name, *_ in TINY_CFGS + CFGS])  # slow: 50-60M parameters built, filled, run
@needs_opencv_darknet
def test_outputs_and_detections_equal_opencvs(name, version, size, tmp_path):
    cfg, weights, model = imported(name, tmp_path, version, size)
    head = model.detector.head
    image = np.random.default_rng(1).uniform(0, 1, (1, 3, size, size)).astype(np.float32)
    cv_convs, cv_rows = opencv_outputs(cfg, weights, image)
    with torch.no_grad():
        x = torch.from_numpy(image)
        feats = model.detector.neck(model.detector.backbone(x))
        raw = head(feats)
    predictors = list(head.predictors)[::-1] if hasattr(head, "predictors") else [head.predictor]
    # the detection layers' inputs: every predictor conv's map
    with torch.no_grad():
        maps = [p(f).numpy() for p, f in zip(predictors, feats[::-1])]
    for ours, ref in zip(maps, cv_convs, strict=True):
        assert ours.shape == ref.shape and close(ours, ref) < 1e-4, (ours.shape, ref.shape, close(ours, ref))

    # the detection layers' outputs: decoded boxes, objectness, class scores (thresholded as OpenCV's)
    out = raw.output.float().reshape(-1, raw.output.shape[-1])
    boxes = head.decode(raw, (size, size)).reshape(-1, 4)
    objectness = out[:, 4].sigmoid()
    scores = objectness[:, None] * class_probabilities(head.losses, out[:, 5:])
    rows = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2 / size, (boxes[:, 2:] - boxes[:, :2]) / size,
                      objectness[:, None], scores], 1).numpy()
    counts = [h * w * head.num_anchors for h, w in raw.shapes]
    levels = np.split(rows, np.cumsum(counts)[:-1])[::-1]  # coarsest first, as OpenCV's
    region = not hasattr(head, "predictors")
    thresh = float(next(o.get("thresh", 0.2) for kind, o in cfg_sections(cfg) if kind == "region")) if region \
        else YOLO_THRESH
    for ours, ref in zip(levels, cv_rows, strict=True):
        assert ours.shape == ref.shape
        assert close(ours[:, :5], ref[:, :5]) < 1e-4
        kept = ref[:, 5:] > 0
        assert kept.any(), "no class score passes OpenCV's threshold: the test's weights are too tame"
        assert close(ours[:, 5:][kept], ref[:, 5:][kept]) < 1e-4
        if not region:  # OpenCV zeroes a yolo layer's scores at its threshold only; its region layer runs NMS too
            clear = np.abs(ours[:, 5:] - thresh) > 1e-4  # scores at the threshold may fall either way
            np.testing.assert_array_equal(kept[clear], ours[:, 5:][clear] > thresh)

    if region:
        # OpenCV's region layer keeps darknet's per-class NMS survivors (IoU > 0.4 suppressed, unclipped boxes) of
        # the scores above its threshold: the same set as this head's decoding through torchvision's NMS
        cls_scores = torch.from_numpy(levels[0][:, 5:])
        anchor, label = torch.nonzero(cls_scores > thresh, as_tuple=True)
        keep = batched_nms(boxes[anchor], cls_scores[anchor, label], label, 0.4)
        ours_set = {(int(anchor[k]), int(label[k])) for k in keep}
        assert ours_set == {(int(a), int(c)) for a, c in zip(*np.nonzero(cv_rows[0][:, 5:]))} and ours_set
        return
    # detections: OpenCV's decoded rows, clipped to the image as the head clips, through OpenCV's per-class NMS,
    # against the head's predict at the same thresholds (above OpenCV's, which zeroes the scores below its own)
    score_threshold = 0.3
    head.score_threshold, head.nms_threshold = score_threshold, 0.45
    with torch.no_grad():
        det = head.predict(raw, (size, size))[0]
    ref = np.concatenate(cv_rows[::-1])
    ref_xyxy = np.clip(np.concatenate([ref[:, :2] - ref[:, 2:4] / 2, ref[:, :2] + ref[:, 2:4] / 2], 1) * size, 0, size)
    anchor, label = np.nonzero(ref[:, 5:] > score_threshold)
    keep = cv2.dnn.NMSBoxesBatched([list(map(float, b)) for b in np.concatenate(
        [ref_xyxy[anchor, :2], ref_xyxy[anchor, 2:] - ref_xyxy[anchor, :2]], 1)],
        ref[anchor, 5 + label].tolist(), label.tolist(), score_threshold, 0.45)
    keep = np.asarray(keep, dtype=int).reshape(-1)
    order = np.argsort(-ref[anchor[keep], 5 + label[keep]], kind="stable")[:head.max_detections]
    ref_boxes = ref_xyxy[anchor[keep]][order]
    assert len(det["boxes"]) == len(ref_boxes) > 0
    np.testing.assert_array_equal(det["labels"].numpy(), label[keep][order])
    np.testing.assert_allclose(det["scores"].numpy(), ref[anchor[keep], 5 + label[keep]][order], rtol=1e-4)
    np.testing.assert_allclose(det["boxes"].numpy(), ref_boxes, rtol=1e-4, atol=1e-3)


@pytest.mark.slow  # the command end to end: a 50M-parameter checkpoint written and restored
def test_checkpoint_records_darknets_preprocessing_and_classes(tmp_path):
    cfg = small_cfg("yolov3-voc", tmp_path)
    write_random_weights(cfg, tmp_path / "w.weights")
    names = tmp_path / "coco.names"
    names.write_text((DARKNET / "data" / "voc.names").read_text())
    assert main([str(cfg), str(tmp_path / "w.weights"), "--names", str(names), "--out", str(tmp_path / "m.ckpt")]) == 0
    _, run = load_checkpoint(tmp_path / "m.ckpt")
    assert list(run.data.classes) == (DARKNET / "data" / "voc.names").read_text().split()
    assert run.data.source._target_.endswith("VOCSource")
    assert run.augment.eval_resize == "letterbox" and list(run.augment.fill) == [127.5] * 3
    assert list(run.backbone.mean) == [0, 0, 0] and list(run.backbone.std) == [1, 1, 1]
    assert run.head.nms_threshold == 0.45 and run.head.ignore_threshold == 0.5  # yolov3-voc.cfg: ignore_thresh = .5
    assert list(run.input_size) == [SIZE, SIZE] and run.backbone.darknet_bn and run.neck.darknet_bn
    # evaluate.py's and predict.py's way in: the run config builds the model and the tensors fit it
    ckpt, run = load_checkpoint(tmp_path / "m.ckpt")
    model = restore_model(ckpt, run, tmp_path / "m.ckpt")
    assert isinstance(model.detector.backbone.features[0].bn, DarknetBatchNorm2d)


def test_coco_names_become_cocos_categories():
    from detectors.weights.darknet import run_config_for

    run, model = run_config_for(DARKNET / "cfg" / "yolov3.cfg", (DARKNET / "data" / "coco.names").read_text()
                                .strip().splitlines(), input_size=(416, 416))
    assert model == "yolov3" and run.data.source._target_.endswith("COCOSource")
    # darknet's VOC spellings become COCO's category names (what COCO's annotation files call them)
    assert run.data.classes[3] == "motorcycle" and run.data.classes[62] == "tv" and len(run.data.classes) == 80
    assert list(run.input_size) == [416, 416] and run.head.anchors[-1] == [373, 326]
    assert run.data.classes[9] == "traffic light"
    # predictions.json's ids without the annotation files: each name's index in torchvision's 91-slot COCO list
    from torchvision.models.detection import SSD300_VGG16_Weights

    slots = SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    assert list(run.category_ids) == [slots.index(name) for name in run.data.classes]


def test_weights_of_another_float_count_are_refused_with_both_counts(tmp_path):
    cfg = small_cfg("yolov2-voc", tmp_path)
    need = float_count(cfg)
    write_empty_weights(tmp_path / "more.weights", need + 7, (0, 2))
    with pytest.raises(ImportError_, match=f"more.weights holds {need + 7} floats .*yolov2-voc.cfg takes {need}"):
        load_darknet_model(cfg, tmp_path / "more.weights")
    # the 32-bit header of version 0.1 is 4 bytes shorter
    write_empty_weights(tmp_path / "less.weights", need - 11, (0, 1))
    with pytest.raises(ImportError_, match=f"less.weights holds {need - 11} floats .*yolov2-voc.cfg takes {need}"):
        load_darknet_model(cfg, tmp_path / "less.weights")


def test_layers_the_framework_lacks_are_refused_by_line(tmp_path, capsys):
    # yolov1.cfg's [local] layer (its first unsupported section)
    lines = (DARKNET / "cfg" / "yolov1.cfg").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() == "[local]")
    assert main([str(DARKNET / "cfg" / "yolov1.cfg"), "x.weights", "--out", str(tmp_path / "x.ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: yolov1.cfg line {line}: [local] layer: this framework has no such part (it imports "
                   "[convolutional], [maxpool], [route], [shortcut], [upsample], [yolo], [region], [reorg])")
    # yolo9000's tree softmax
    tree = small_cfg("yolov2", tmp_path)
    tree.write_text(tree.read_text().replace("softmax=1", "softmax=1\ntree=data/9k.tree"))
    with pytest.raises(ImportError_, match=r"yolov2.cfg line \d+: \[region\] with tree="):
        load_darknet_model(tree, tmp_path / "x.weights")
    # a cfg whose layers are not the framework's model: one conv of DarkNet-19 narrower
    text = small_cfg("yolov2-voc", tmp_path).read_text()
    (tmp_path / "odd.cfg").write_text(text.replace("filters=64\n", "filters=48\n", 1))
    write_empty_weights(tmp_path / "x.weights", float_count(tmp_path / "odd.cfg"))
    with pytest.raises(ImportError_, match=r"odd.cfg line \d+: \[convolutional\] filters=48 .* has 64"):
        load_darknet_model(tmp_path / "odd.cfg", tmp_path / "x.weights")


def test_darknet_batch_norm_and_reorg_against_the_c_code():
    """Hand-written from darknet's C: normalize_cpu's (x - mean) / (sqrt(var) + .000001) and reorg_cpu's loops."""
    bn = DarknetBatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1e-8, 4.0, 0.25]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 4, 5)
    mean, var = bn.running_mean.view(1, 3, 1, 1), bn.running_var.view(1, 3, 1, 1)
    expected = (x - mean) / (var.sqrt() + 1e-6) * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(bn(x), expected)

    b, c, h, w, stride = 2, 8, 6, 4, 2
    x = torch.randn(b, c, h, w)
    flat, out = x.flatten().numpy(), np.empty(x.numel(), np.float32)
    out_c = c // (stride * stride)
    for bi in range(b):  # reorg_cpu(x, w, h, c, batch, stride, forward=0, out)
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * bi))
                    c2, offset = k % out_c, k // out_c
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    out[in_index] = flat[w2 + w * stride * (h2 + h * stride * (c2 + out_c * bi))]
    torch.testing.assert_close(darknet_reorg(x), torch.from_numpy(out).view(b, 4 * c, h // 2, w // 2))
