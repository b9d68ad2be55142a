"""Export to ONNX: the graph in ONNX Runtime against the checkpoint in PyTorch (decoded boxes and scores,
and detections after the in-graph NMS against ``multiclass_nms``), a dynamic batch, the float input, the
NMS's tensor form against ``multiclass_nms``, the comparison's verdicts, and the refusals."""

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from test_predict import CONFIGS, NET, save_checkpoint  # noqa: E402 (after the skips)

from detectors.checkpoints import load_checkpoint, restore_model  # noqa: E402
from detectors.detector import Detector  # noqa: E402
from detectors.export import (  # noqa: E402
    ExportedDetector,
    ExportError,
    NMSSettings,
    Tolerance,
    compare_decoded,
    compare_detections,
    export_onnx,
    nms_detections,
    onnx_session,
    run_check,
)
from detectors.heads.ssd import SSDHead  # noqa: E402
from detectors.postprocess import multiclass_nms  # noqa: E402
from detectors.tasks.export import export, main  # noqa: E402

TINY = {  # every model at 128 x 160 on MobileNetV2 at width 0.25, a few MB a checkpoint
    "ssdlite": ["backbone.width_mult=0.25"],
    "yolov2": ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "backbone.out_strides=[16,32]",
               "neck.channels=32"],
    "yolov3": ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "neck.channels=32"],
    "yolov1": ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "backbone.out_strides=[32]", "head.channels=16",
               "head.fc_width=32"],
}


def tiny_checkpoint(folder, model):
    """An untrained checkpoint whose head weights are shaken (std 0.3): fresh heads score every box alike
    (SSD) or below the threshold (YOLO's 1% objectness prior), and NMS would have little to do."""
    path = save_checkpoint(folder / f"{model}.ckpt", model, f"input_size=[{NET[0]},{NET[1]}]", *TINY[model])
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, value in ckpt["state_dict"].items():
        if name.startswith("detector.head.") and name.endswith((".weight", ".bias")):
            value += 0.3 * torch.randn(value.shape, generator=g)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_ckpt")
    return {model: tiny_checkpoint(folder, model) for model in TINY}


def restored(path):
    ckpt, run = load_checkpoint(path)
    return restore_model(ckpt, run, path).eval()


def export_cfg(ckpt, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("export", overrides=[f"ckpt_path={ckpt}", f"output={out}", *overrides])


def random_images(batch, seed=0):
    return torch.randint(0, 256, (batch, 3, *NET), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference(module, images):
    """The checkpoint's decoded outputs in PyTorch, normalised as evaluation normalises."""
    with torch.no_grad():
        x = module.on_after_batch_transfer({"images": images}, 0)["images"]
        return module.detector.head.decode_scores(module.detector(x), module.input_size)


def detection_set(boxes, scores, labels, digits=2):
    return sorted(zip(labels.tolist(), [round(s, 5) for s in scores.tolist()],
                      [tuple(round(v, digits) for v in b) for b in boxes.tolist()]))


# ---- the decode the heads share with export ----------------------------------------------------------
@pytest.mark.parametrize("model", list(TINY))
def test_decode_scores_is_what_predict_keeps_boxes_from(model, checkpoints):
    module = restored(checkpoints[model])
    head = module.detector.head
    with torch.no_grad():
        raw = module.detector((random_images(2).float() - module.mean) / module.std)
        boxes, scores = head.decode_scores(raw, NET)
        preds = head.predict(raw, NET)
    assert boxes.shape[:2] == scores.shape[:2] and boxes.shape[2] == 4 and scores.shape[2] == 3
    assert (boxes[..., 0::2] >= 0).all() and (boxes[..., 0::2] <= NET[1]).all() and (boxes[..., 1::2] <= NET[0]).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    # every kept box is one of decode_scores' boxes, with that box's score for its label
    for b, p in enumerate(preds):
        assert len(p["scores"]) > 0
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"]):
            at = (boxes[b] == box).all(1) & (scores[b, :, label] == score)
            assert at.any()


# ---- round trips: the command, then the file on its own ----------------------------------------------
@pytest.mark.parametrize("nms", [False, True])
@pytest.mark.parametrize("model", ["ssdlite", "yolov2"])
def test_export_command_writes_a_model_that_onnx_runtime_runs_as_pytorch(model, nms, checkpoints, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    result = export(export_cfg(checkpoints[model], out, f"nms={str(nms).lower()}"))
    printed = capsys.readouterr().out
    assert result["check"].ok and out.is_file()
    assert "check: ONNX Runtime" in printed and "FAILED" not in printed
    if nms:  # the check compared detections, and there were some
        found = re.search(r"detections: (\d+) in PyTorch, (\d+) in ONNX; (\d+) matched", printed)
        assert int(found[1]) > 0 and int(found[3]) > 0.9 * int(found[1]) and "decides, 0 otherwise" in printed
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == ["circle", "square", "triangle"]
    assert json.loads(meta["image_size"]) == list(NET)
    assert meta["eval_resize"] == ("stretch" if model == "ssdlite" else "letterbox")  # augment=ssd / augment=yolo
    session = onnx_session(out)
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape == ["batch", 3, *NET]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if nms:
        assert outputs == {"detections": ["batch", 200 if model == "ssdlite" else 100, 6], "num_detections": ["batch"]}
    else:
        assert list(outputs) == ["boxes", "scores"]
        anchors = outputs["boxes"][1]  # SSDLite: 6 priors on 8x10, 4x5, 2x3, 1x2, 1x1, 1x1; YOLOv2: 5 on 4x5
        assert outputs == {"boxes": ["batch", anchors, 4], "scores": ["batch", anchors, 3]}
        assert anchors == (6 * (80 + 20 + 6 + 2 + 1 + 1) if model == "ssdlite" else 5 * 20)


@pytest.mark.parametrize("model", ["ssdlite", "yolov2"])
def test_exported_at_batch_1_runs_at_batch_3_as_pytorch(model, checkpoints, tmp_path):
    module = restored(checkpoints[model])
    images = random_images(3, seed=1)
    boxes, scores = reference(module, images)

    path = export_onnx(ExportedDetector.from_module(module), tmp_path / "decoded.onnx", trace_batch=1)
    onnx_boxes, onnx_scores = (torch.from_numpy(o) for o in onnx_session(path).run(None, {"images": images.numpy()}))
    # tolerance: 1e-4 px per px of the input's longer side, 1e-4 on scores (README "Export")
    torch.testing.assert_close(onnx_boxes, boxes, rtol=0, atol=1e-4 * max(NET))
    torch.testing.assert_close(onnx_scores, scores, rtol=0, atol=1e-4)
    one = onnx_session(path).run(None, {"images": images[1:2].numpy()})
    torch.testing.assert_close(torch.from_numpy(one[1][0]), onnx_scores[1], rtol=0, atol=1e-6)

    settings = NMSSettings.from_head(module.detector.head)
    path = export_onnx(ExportedDetector.from_module(module, nms=settings), tmp_path / "nms.onnx", trace_batch=1)
    detections, counts = (torch.from_numpy(o) for o in onnx_session(path).run(None, {"images": images.numpy()}))
    preds = multiclass_nms(boxes, scores, settings.score_threshold, settings.iou_threshold, settings.pre_nms_top_k,
                           settings.max_detections)
    assert detections.shape == (3, settings.max_detections, 6) and counts.dtype == torch.int64
    assert counts.tolist() == [len(p["scores"]) for p in preds] and min(counts.tolist()) > 0
    assert (detections[0, counts[0]:] == 0).all()
    result = compare_detections(detections, counts, preds, (boxes, scores), settings, Tolerance(), NET)
    assert result.ok, result.lines
    assert f"{sum(counts.tolist())} in PyTorch" in result.lines[0]


def test_float_input_gives_the_uint8_models_outputs(checkpoints, tmp_path):
    module = restored(checkpoints["ssdlite"])
    exported = ExportedDetector.from_module(module)
    images = random_images(2, seed=2)
    as_uint8 = onnx_session(export_onnx(exported, tmp_path / "u8.onnx")).run(None, {"images": images.numpy()})
    session = onnx_session(export_onnx(exported, tmp_path / "f32.onnx", input_dtype="float32"))
    assert session.get_inputs()[0].type == "tensor(float)"
    as_float = session.run(None, {"images": images.float().numpy()})
    for a, b in zip(as_uint8, as_float):
        assert (a == b).all()


def test_another_image_size_and_the_nms_settings_are_taken(checkpoints, tmp_path, capsys):
    out = tmp_path / "big.onnx"
    result = export(export_cfg(checkpoints["yolov2"], out, "image_size=[160,192]", "nms=true", "max_detections=7",
                               "check_num_images=2"))
    assert result["check"].ok
    session = onnx_session(out)
    assert session.get_inputs()[0].shape == ["batch", 3, 160, 192]
    assert session.get_outputs()[0].shape == ["batch", 7, 6]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["max_detections"] == "7" and json.loads(meta["image_size"]) == [160, 192]


# ---- the NMS in the graph, eager, against multiclass_nms ----------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_nms_detections_keep_what_multiclass_nms_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(2, 60, 2, generator=g) * 80
    boxes = torch.cat([corner, corner + 5 + torch.rand(2, 60, 2, generator=g) * 40], -1)
    scores = torch.rand(2, 60, 3, generator=g)
    scores[1, :10] = 0.5  # ties
    settings = NMSSettings(score_threshold=0.2, iou_threshold=0.3, pre_nms_top_k=25, max_detections=30)
    detections, counts = nms_detections(boxes, scores, settings)
    preds = multiclass_nms(boxes, scores, 0.2, 0.3, 25, 30)
    assert detections.shape == (2, 30, 6)
    for i, p in enumerate(preds):
        n = int(counts[i])
        assert n == len(p["scores"])
        d = detections[i, :n]
        assert (d[:-1, 4] >= d[1:, 4]).all() and (detections[i, n:] == 0).all()
        # the same detections, but for the order among equal scores at the max_detections cut
        cut = float(d[-1, 4]) if n == settings.max_detections else -1.0
        above, theirs = d[:, 4] > cut, p["scores"] > cut
        ours = detection_set(d[above, :4], d[above, 4], d[above, 5].long())
        assert ours == detection_set(p["boxes"][theirs], p["scores"][theirs], p["labels"][theirs])
        assert n > 0 and above.sum() >= n - 10


# ---- the comparison's verdicts -------------------------------------------------------------------------
def test_decoded_outputs_beyond_tolerance_fail():
    boxes, scores = torch.rand(1, 5, 4) * 100, torch.rand(1, 5, 2)
    assert compare_decoded(boxes + 0.009, scores, boxes, scores, (100, 100), Tolerance()).ok  # <= 1e-4 x 100
    moved = compare_decoded(boxes + 0.02, scores, boxes, scores, (100, 100), Tolerance())
    assert not moved.ok and "FAILED" in moved.lines[0]
    assert not compare_decoded(boxes, scores + 2e-4, boxes, scores, (100, 100), Tolerance()).ok
    assert not compare_decoded(boxes[:, :4], scores[:, :4], boxes, scores, (100, 100), Tolerance()).ok


def test_detections_on_one_side_only_fail_unless_a_threshold_or_the_order_of_ties_decides():
    settings = NMSSettings(score_threshold=0.1, iou_threshold=0.5, pre_nms_top_k=10, max_detections=5)
    # PyTorch's candidates (one image, 2 classes): three boxes of class 1 share a score (a flat region)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [22, 20, 42, 40], [24, 20, 44, 40]]])
    scores = torch.tensor([[[0.9, 0.0], [0.0, 0.6], [0.0, 0.10005], [0.0, 0.6], [0.0, 0.6]]])
    candidates = (boxes, scores)

    def dets(*rows):
        padded = torch.zeros(1, 5, 6)
        for r, (box, score, label) in enumerate(rows):
            padded[0, r] = torch.tensor([*boxes[0, box].tolist(), score, label])
        return padded, torch.tensor([len(rows)])

    def pred(*rows):
        return [{"boxes": boxes[0, [r[0] for r in rows]], "scores": torch.tensor([r[1] for r in rows]),
                 "labels": torch.tensor([r[2] for r in rows])}]

    pytorch = pred((0, 0.9, 0), (1, 0.6, 1), (2, 0.10005, 1))

    def verdict(detections, counts):
        return compare_detections(detections, counts, pytorch, candidates, settings, Tolerance(), (100, 100))

    assert verdict(*dets((0, 0.9, 0), (1, 0.6, 1), (2, 0.10005, 1))).ok
    # the one at the score threshold may be missing
    at_threshold = verdict(*dets((0, 0.9, 0), (1, 0.6, 1)))
    assert at_threshold.ok and "1 on one side only" in at_threshold.lines[0]
    # of equal scores, ONNX took another first: box 3 suppressed box 1 there
    ties = verdict(*dets((0, 0.9, 0), (3, 0.6, 1), (2, 0.10005, 1)))
    assert ties.ok and "2 on one side only" in ties.lines[0]
    # ... but a box PyTorch never had (shifted by 2 px) is no tie, nor a missing box of another score
    shifted, count = dets((0, 0.9, 0), (3, 0.6, 1), (2, 0.10005, 1))
    shifted[0, 1, :4] += torch.tensor([0.0, 2.0, 0.0, 2.0])
    wrong = verdict(shifted, count)
    assert not wrong.ok and "not a PyTorch candidate" in "\n".join(wrong.lines)
    missing = verdict(*dets((1, 0.6, 1), (2, 0.10005, 1)))
    assert not missing.ok and "1 otherwise  FAILED" in missing.lines[0] and "only in PyTorch" in missing.lines[2]
    # a zero-area box has no IoU: it matches by its coordinates
    flat = {"boxes": torch.tensor([[5.0, 5, 5, 5]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    onnx_flat = torch.tensor([[[5.001, 5, 5, 5, 0.9, 0]]])
    result = compare_detections(onnx_flat, torch.tensor([1]), [flat], (flat["boxes"][None], torch.tensor([[[0.9]]])),
                                settings, Tolerance(), (100, 100))
    assert result.lines[0].startswith("detections: 1 in PyTorch, 1 in ONNX; 1 matched")


def test_the_command_fails_loudly_when_the_runtimes_disagree(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    module = restored(checkpoints["ssdlite"])
    exported = ExportedDetector.from_module(module)
    export_onnx(exported, out)
    # at tolerances below float32's reach, PyTorch's own float32 error (against float64) decides, and passes
    tiny = run_check(out, module, exported, random_images(2), "uint8", Tolerance(box=1e-12, score=1e-12))
    assert tiny.ok and "(over)" in tiny.lines[0] and "PyTorch's own float32 error" in tiny.lines[2]
    with torch.no_grad():  # PyTorch's model changes after the export: the runtimes no longer agree
        module.detector.head.box_convs[0][-1].bias += 0.5
    result = run_check(out, module, exported, random_images(2), "uint8", Tolerance())
    assert not result.ok and "FAILED" in result.lines[-2]

    import detectors.tasks.export as task

    monkeypatch.setattr(task, "run_check", lambda *a: result)
    assert main([f"ckpt_path={checkpoints['ssdlite']}", f"output={out}"]) == 1
    err = capsys.readouterr().err
    assert "check FAILED" in err and "max |ONNX - PyTorch|" in err and "kept for inspection" in err


# ---- refusals ------------------------------------------------------------------------------------------
class TwoStageHead(nn.Module):
    """A head that predicts, but has no decode to a fixed set of boxes (as a Faster R-CNN head)."""

    num_classes = 3

    def forward(self, feats, targets=None):
        return feats

    def predict(self, raw, image_size):
        return []


def test_a_head_without_decode_scores_is_refused_in_one_line(checkpoints, monkeypatch, capsys):
    detector = Detector(nn.Identity(), nn.Identity(), TwoStageHead())
    with pytest.raises(ExportError, match=r"^TwoStageHead cannot be exported: it has no decode_scores"):
        ExportedDetector(detector, torch.zeros(3), torch.ones(3), NET)
    monkeypatch.delattr(SSDHead, "decode_scores")
    assert main([f"ckpt_path={checkpoints['ssdlite']}", "check=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: SSDHead cannot be exported: it has no decode_scores") and err.count("\n") == 1


@pytest.mark.filterwarnings("ignore:Exporting to ONNX opset version")
@pytest.mark.parametrize("override, message", [
    ("format=tensorrt", "format must be one of onnx"),
    ("image_size=[20,20]", "image_size (20, 20) is too small"),
    ("opset=9", "opset 9 is too old"),
    ("opset=99", "opset 99: Unsupported onnx_opset_version"),
    ("input_dtype=float16", "input_dtype must be one of"),
    ("nonsense=1", "nonsense"),
])
def test_user_errors_are_one_line(override, message, checkpoints, tmp_path, capsys):
    assert main([f"ckpt_path={checkpoints['ssdlite']}", f"output={tmp_path / 'x.onnx'}", "check=false",
                 override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_yolov1_exports_at_its_own_size_only(checkpoints, tmp_path, capsys):
    assert main([f"ckpt_path={checkpoints['yolov1']}", f"output={tmp_path / 'v1.onnx'}", "image_size=[160,192]"]) == 2
    assert "FC fixes the input size" in capsys.readouterr().err
    result = export(export_cfg(checkpoints["yolov1"], tmp_path / "v1.onnx", "check_num_images=2"))
    assert result["check"].ok


def test_a_checkpoint_of_a_compiled_run_exports_uncompiled(tmp_path):
    """model.compile=true compiles the network when the module is built: the tracer would refuse it."""
    ckpt = save_checkpoint(tmp_path / "compiled.ckpt", "ssdlite", f"input_size=[{NET[0]},{NET[1]}]", *TINY["ssdlite"],
                           "model.compile=true")
    assert main([f"ckpt_path={ckpt}", f"output={tmp_path / 'c.onnx'}", "check_num_images=1"]) == 0


def test_yolov3_exports(checkpoints, tmp_path):
    assert export(export_cfg(checkpoints["yolov3"], tmp_path / "v3.onnx", "nms=true", "check_num_images=2"))["check"].ok
