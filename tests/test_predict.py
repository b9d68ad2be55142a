"""predict.py: a checkpoint's model on the user's own files (folders, odd images, globs, videos), with
the boxes in each image's own pixels and the files it writes read back by this framework's readers."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import detectors  # noqa: F401  (resolvers)
from detectors.data.formats.voc import VOCSource
from detectors.data.formats.yolo import YOLOSource
from detectors.data.image_folder import find_inputs
from detectors.detector import Detector
from detectors.evaluation.plots import class_colors
from detectors.tasks.predict import COCO_SOURCE, PredictError, main, predict, run_category_ids

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLASSES = ["circle", "square", "triangle"]
NET = (128, 160)  # (H, W) of the test checkpoints' input: non-square, so a swapped side shows


def save_checkpoint(path: Path, model: str, *overrides: str) -> Path:
    """A checkpoint as train.py writes it (state dict + the resolved run config), of an untrained model."""
    import hydra

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", f"model={model}", "multiscale.sizes=null", *overrides])
    with open_dict(cfg):
        cfg.data.classes = CLASSES
    module = hydra.utils.instantiate(cfg.model, run_config=OmegaConf.to_yaml(cfg, resolve=True))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"run_config": module.hparams.run_config}},
               path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny SSDLite checkpoints (MobileNetV2 at width 0.25, 128x160 input), made once: 'stretch' evaluates
    stretched (augment=ssd), 'letterbox' letterboxed (augment=yolo, grey fill)."""
    folder = tmp_path_factory.mktemp("ckpt")
    tiny = [f"input_size=[{NET[0]},{NET[1]}]", "backbone.width_mult=0.25"]
    return {"stretch": save_checkpoint(folder / "stretch.ckpt", "ssdlite", *tiny),
            "letterbox": save_checkpoint(folder / "letterbox.ckpt", "ssdlite", "augment=yolo", *tiny)}


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 BGR: smooth (JPEG-friendly) and different per seed."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // max(w - 1, 1) + seed * 40) % 256, y * 255 // max(h - 1, 1),
                     np.full_like(x, 60 + seed * 30)], -1).astype(np.uint8)


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory):
    """A normal JPEG, a corrupt file, a grayscale JPEG, a PNG with alpha, a 4000x3000 JPEG, and a text file."""
    folder = tmp_path_factory.mktemp("odd")
    cv2.imwrite(str(folder / "a_normal.jpg"), gradient(300, 500))
    (folder / "b_corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG " * 20)
    cv2.imwrite(str(folder / "c_gray.jpg"), cv2.cvtColor(gradient(240, 320, 1), cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "d_alpha.png"), np.dstack([gradient(200, 260, 2), np.full((200, 260), 100, np.uint8)]))
    cv2.imwrite(str(folder / "e_large.jpg"), gradient(3000, 4000, 3))
    (folder / "notes.txt").write_text("not an image")
    assert cv2.imread(str(folder / "c_gray.jpg"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert cv2.imread(str(folder / "d_alpha.png"), cv2.IMREAD_UNCHANGED).shape[2] == 4
    return folder


def predict_cfg(ckpt, input_path, out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("predict", overrides=[f"ckpt_path={ckpt}", f"input={input_path}", f"paths.output_dir={out}",
                                             "num_workers=0", "device=cpu", "batch_size=2", *overrides])


@pytest.fixture
def fixed_predictions(monkeypatch):
    """Make every detector "predict" the given boxes, in network pixels, for every image (whatever it shows):
    ``use(boxes, scores, labels)``; the boxes of the i-th image of a batch are shifted by ``i * shift``.
    Returns a dict that gets the ``image_size`` the head was called with."""
    seen = {}

    def use(boxes, scores, labels, shift=0.0):
        def forward(self, images, targets=None):
            return images

        def fixed(self, raw, image_size):
            seen["image_size"] = tuple(image_size)
            b = torch.tensor(boxes, dtype=torch.float32, device=raw.device)
            return [{"boxes": b + i * shift, "scores": torch.tensor(scores, device=raw.device),
                     "labels": torch.tensor(labels, device=raw.device)} for i in range(raw.shape[0])]

        monkeypatch.setattr(Detector, "forward", forward)
        monkeypatch.setattr(Detector, "predict", fixed)
        return seen

    return use


def xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


# ---- the input -----------------------------------------------------------------------------------
def test_inputs_are_a_file_a_folder_recursive_or_not_a_glob_or_a_video(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.png", "sub/c.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    folder = find_inputs(str(tmp_path))
    assert [folder.name(p) for p in folder.files] == ["a.png", "b.jpg"]
    assert [p.name for p in folder.ignored] == ["notes.txt"]
    deep = find_inputs(str(tmp_path), recursive=True)
    assert [deep.name(p) for p in deep.files] == ["a.png", "b.jpg", "sub/c.jpg"]
    pattern = find_inputs(str(tmp_path / "**" / "*.jpg"))
    assert pattern.root == tmp_path and [pattern.name(p) for p in pattern.files] == ["b.jpg", "sub/c.jpg"]
    single = find_inputs(str(tmp_path / "sub" / "c.jpg"))
    assert single.root == tmp_path / "sub" and single.files == [tmp_path / "sub" / "c.jpg"]
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert find_inputs(str(tmp_path / "clip.mp4")).video == tmp_path / "clip.mp4"
    with pytest.raises(FileNotFoundError, match="not found"):
        find_inputs(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_inputs(str(tmp_path / "*.bmp"))
    (tmp_path / "only_deeper" / "deeper").mkdir(parents=True)
    (tmp_path / "only_deeper" / "deeper" / "x.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no images .* in the folder .*recursive=true"):
        find_inputs(str(tmp_path / "only_deeper"))
    assert len(find_inputs(str(tmp_path / "only_deeper"), recursive=True).files) == 1


# ---- a folder of odd files -----------------------------------------------------------------------
def test_a_folder_of_odd_images_skips_the_corrupt_one_and_predicts_the_rest(checkpoints, odd_folder, tmp_path,
                                                                           fixed_predictions, caplog):
    caplog.set_level(logging.INFO, logger="detectors")
    fixed_predictions([[16.0, 32.0, 80.0, 96.0]], [0.9], [2])
    summary = predict(predict_cfg(checkpoints["stretch"], odd_folder, tmp_path))
    assert summary["images"] == 4
    assert [name for name, _ in summary["skipped"]] == ["b_corrupt.jpg"]
    assert "unreadable image" in summary["skipped"][0][1]
    assert any("skipped b_corrupt.jpg" in r.getMessage() for r in caplog.records)  # named when met
    assert any("skipped 1 unreadable: b_corrupt.jpg" in r.getMessage() for r in caplog.records)  # and at the end

    data = json.loads((tmp_path / "predictions.json").read_text())
    sizes = {"a_normal.jpg": (500, 300), "c_gray.jpg": (320, 240), "d_alpha.png": (260, 200),
             "e_large.jpg": (4000, 3000)}
    assert {i["file_name"]: (i["width"], i["height"]) for i in data["images"]} == sizes
    assert [i["id"] for i in data["images"]] == [0, 2, 3, 4]  # the position among the sorted files
    assert data["skipped"] == [{"file_name": "b_corrupt.jpg", "reason": summary["skipped"][0][1]}]
    assert data["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    assert sorted(a["file_name"] for a in data["annotations"]) == sorted(sizes)
    assert all(a["category_id"] == 3 and a["score"] == pytest.approx(0.9) for a in data["annotations"])

    for name, (w, h) in sizes.items():  # drawn at the original's size, converted to 3 channels
        drawn = cv2.imread(str(tmp_path / "images" / name), cv2.IMREAD_UNCHANGED)
        assert drawn.shape == (h, w, 3), name
    # the box is drawn where the JSON says, in the class's colour (PNG: lossless)
    (box,) = [xyxy(a["bbox"]) for a in data["annotations"] if a["file_name"] == "d_alpha.png"]
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "images" / "d_alpha.png")), cv2.COLOR_BGR2RGB)
    x_mid = int((box[0] + box[2]) / 2)
    assert tuple(drawn[int(box[1]), x_mid]) == class_colors(3)[2]
    assert tuple(drawn[int(box[3]) - 1, x_mid]) == class_colors(3)[2]
    assert tuple(drawn[int((box[1] + box[3]) / 2), x_mid]) != class_colors(3)[2]  # not filled


@pytest.mark.parametrize("resize, expected", [
    # stretch: x0 = x * 500 / 160, y0 = y * 300 / 128
    ("stretch", [50.0, 75.0, 250.0, 225.0]),
    # letterbox: scale min(128 / 300, 160 / 500) = 0.32, the 500 x 300 image becomes 160 x 96, padded by
    # (128 - 96) / 2 = 16 rows on top: x0 = x / 0.32, y0 = (y - 16) / 0.32
    ("letterbox", [50.0, 50.0, 250.0, 250.0]),
])
def test_boxes_map_back_to_each_original_by_the_checkpoints_resize(checkpoints, odd_folder, tmp_path, resize, expected,
                                                                   fixed_predictions):
    seen = fixed_predictions([[16.0, 32.0, 80.0, 96.0]], [0.9], [0])
    predict(predict_cfg(checkpoints[resize], odd_folder / "a_normal.jpg", tmp_path))  # 500 x 300
    assert seen["image_size"] == NET
    (entry,) = json.loads((tmp_path / "predictions.json").read_text())["annotations"]
    assert xyxy(entry["bbox"]) == pytest.approx(expected, abs=1e-3)


def test_input_size_and_resize_can_be_set(checkpoints, odd_folder, tmp_path, fixed_predictions):
    seen = fixed_predictions([[0.0, 0.0, 96.0, 64.0]], [0.9], [0])
    predict(predict_cfg(checkpoints["stretch"], odd_folder / "a_normal.jpg", tmp_path, "input_size=[64,96]",
                        "resize=letterbox"))
    assert seen["image_size"] == (64, 96)
    (entry,) = json.loads((tmp_path / "predictions.json").read_text())["annotations"]
    # 500 x 300 letterboxed into 96 x 64: scale 0.192 (96 x 58), 3 rows of padding on top; clipped to the image
    assert xyxy(entry["bbox"]) == pytest.approx([0.0, 0.0, 500.0, 300.0], abs=1e-3)
    with pytest.raises(PredictError, match=r"input_size \(16, 16\) is too small: the backbone needs sides of at least"):
        predict(predict_cfg(checkpoints["stretch"], odd_folder / "a_normal.jpg", tmp_path, "input_size=16"))


# ---- score threshold and classes -----------------------------------------------------------------
def test_score_threshold_and_classes_filter(checkpoints, odd_folder, tmp_path, fixed_predictions):
    boxes = [[10.0, 10.0, 50.0, 50.0]] * 4
    fixed_predictions(boxes, [0.9, 0.8, 0.3, 0.7], [0, 1, 2, 2])
    predict(predict_cfg(checkpoints["stretch"], odd_folder / "a_normal.jpg", tmp_path, "score_threshold=0.3",
                        "classes=[triangle,circle]"))
    entries = json.loads((tmp_path / "predictions.json").read_text())["annotations"]
    # square (label 1) is not asked for; 0.3 is not above the threshold
    assert sorted((e["category_id"], round(e["score"], 3)) for e in entries) == [(1, 0.9), (3, 0.7)]
    with pytest.raises(PredictError, match=r"classes: \['dog'\] not among the model's classes \['circle'"):
        predict(predict_cfg(checkpoints["stretch"], odd_folder / "a_normal.jpg", tmp_path, "classes=[circle,dog]"))


# ---- VOC and YOLO files, read back ----------------------------------------------------------------
def test_voc_and_yolo_outputs_read_back_as_training_data(checkpoints, tmp_path, fixed_predictions):
    images = tmp_path / "in"
    images.mkdir()
    cv2.imwrite(str(images / "x.jpg"), gradient(300, 500))
    cv2.imwrite(str(images / "x.png"), gradient(480, 640, 1))  # same stem: VOC and YOLO name files by it
    cv2.imwrite(str(images / "y.jpg"), gradient(333, 251, 2))
    fixed_predictions([[10.3, 20.7, 77.1, 101.9], [3.25, 0.5, 150.0, 127.0]], [0.9, 0.6], [2, 0], shift=1.37)
    out = tmp_path / "out"
    predict(predict_cfg(checkpoints["letterbox"], images, out, "output.voc=true", "output.yolo=true"))

    data = json.loads((out / "predictions.json").read_text())
    expected = {}
    for image in data["images"]:
        rows = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        expected[(image["width"], image["height"])] = (np.array([xyxy(a["bbox"]) for a in rows], np.float32),
                                                      [a["category_id"] - 1 for a in rows])
    assert len(expected) == 3 and all(len(labels) == 2 for _, labels in expected.values())

    voc = VOCSource(out / "voc", classes=CLASSES, splits={"train": "predict"})
    yolo = YOLOSource(out / "yolo", splits={"train": "predict"})
    assert (out / "voc" / "classes.txt").read_text().split() == CLASSES and yolo.classes == CLASSES
    for source, tolerance in ((voc, 0.0), (yolo, 1e-3)):  # VOC's decimals read back exactly; YOLO's via / W
        records = source.records("train")
        assert len(records) == 3 and not source.skips.counts
        for record in records:
            boxes, labels = expected[(record.width, record.height)]
            order = np.lexsort(record.boxes.T[::-1])
            want = np.lexsort(boxes.T[::-1])
            np.testing.assert_allclose(record.boxes[order], boxes[want], atol=tolerance, rtol=0)
            assert record.labels[order].tolist() == [labels[i] for i in want]
            image, _ = source.load(record)  # the image is there, at the size the annotation gives
            assert image.shape[:2] == (record.height, record.width)


# ---- video ------------------------------------------------------------------------------------------
def test_video_frames_every_nth_named_by_index(checkpoints, tmp_path, fixed_predictions):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    if not writer.isOpened():
        pytest.skip("OpenCV has no MJPG encoder here")
    for k in range(7):  # frame k: a white bar at columns 10k .. 10k + 9
        frame = np.zeros((64, 96, 3), np.uint8)
        frame[:, 10 * k: 10 * k + 10] = 255
        writer.write(frame)
    writer.release()
    fixed_predictions([[10.0, 10.0, 50.0, 50.0]], [0.9], [1])
    out = tmp_path / "out"
    summary = predict(predict_cfg(checkpoints["stretch"], video, out, "video_stride=3", "output.voc=true"))
    assert summary["images"] == 3 and not summary["skipped"]
    data = json.loads((out / "predictions.json").read_text())
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [(0, "clip_000000.jpg"), (3, "clip_000003.jpg"),
                                                                   (6, "clip_000006.jpg")]
    for k in (0, 3, 6):  # the frames saved for voc/ are the video's frames 0, 3, 6, in order
        frame = cv2.imread(str(out / "frames" / f"clip_{k:06d}.jpg"), cv2.IMREAD_GRAYSCALE)
        assert frame[:, 10 * k + 5].mean() > 200 and np.delete(frame, np.s_[10 * k: 10 * k + 10], 1).mean() < 40
    drawn = summary["written"].get("video")
    if drawn is None:  # no mp4v encoder: the drawn frames are images
        assert sorted(p.name for p in (out / "images").iterdir()) == [f"clip_{k:06d}.jpg" for k in (0, 3, 6)]
    else:
        capture = cv2.VideoCapture(str(drawn))
        assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
        capture.release()


# ---- refusals ---------------------------------------------------------------------------------------
def test_a_file_that_is_not_a_checkpoint_and_a_missing_input_are_one_line_errors(checkpoints, odd_folder, tmp_path,
                                                                                   capsys):
    with pytest.raises(PredictError, match="is not a readable checkpoint"):
        predict(predict_cfg(ROOT / "README.md", odd_folder, tmp_path))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, other)
    with pytest.raises(PredictError, match="not a checkpoint written by detectors' train.py"):
        predict(predict_cfg(other, odd_folder, tmp_path))
    with pytest.raises(PredictError, match="input .*nowhere not found"):
        predict(predict_cfg(checkpoints["stretch"], tmp_path / "nowhere", tmp_path))
    assert main(predict_cfg(ROOT / "README.md", odd_folder, tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("predict.py: error: ckpt_path: ")


# ---- category ids ------------------------------------------------------------------------------------
def test_category_ids_of_a_coco_run_come_from_its_annotation_file(tmp_path, caplog):
    (tmp_path / "annotations").mkdir()
    categories = [{"id": 9, "name": "triangle"}, {"id": 3, "name": "circle"}, {"id": 5, "name": "square"}]
    for split, images in (("train", 50), ("val", 1)):  # the smaller one is read
        data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 9, "height": 9} for i in range(images)],
                "annotations": [], "categories": categories}
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    run = OmegaConf.create({"data": {"classes": CLASSES, "source": {
        "_target_": COCO_SOURCE, "root": str(tmp_path), "splits": {"train": "train", "val": "val"}}}})
    assert run_category_ids(run, 3) == [3, 5, 9]
    run.data.source.root = str(tmp_path / "gone")
    assert run_category_ids(run, 3) == [1, 2, 3]
    assert "category ids cannot be read" in caplog.text
    voc = OmegaConf.create({"data": {"classes": CLASSES,
                                     "source": {"_target_": "detectors.data.formats.voc.VOCSource"}}})
    assert run_category_ids(voc, 3) == [1, 2, 3]


# ---- the real network -------------------------------------------------------------------------------
def test_predictions_equal_evaluations_on_the_same_files(checkpoints, tmp_path, bccd_root):
    """The data path and the map back are evaluation's: the letterbox checkpoint's predictions for two BCCD
    images, through predict, equal ``predict_original_frame`` on the evaluation loader's batch of them."""
    from detectors.checkpoints import load_checkpoint, restore_model
    from detectors.data.datamodule import DetectionDataModule
    from detectors.data.dataset import collate_detection

    ckpt, run = load_checkpoint(checkpoints["letterbox"])
    module = restore_model(ckpt, run, checkpoints["letterbox"]).eval()
    augment = OmegaConf.to_container(run.data.augment)
    assert augment["eval_resize"] == "letterbox"
    dataset = DetectionDataModule(VOCSource(bccd_root), input_size=NET, augment=augment, num_workers=0).dataset("test")
    # the two first by name, in name order: the batch predict makes of a folder holding them
    first = sorted(range(len(dataset.records)), key=lambda i: Path(dataset.records[i].file).name)[:2]
    batch = collate_detection([dataset[i] for i in first])
    with torch.inference_mode():
        preds, _ = module.predict_original_frame(module.on_after_batch_transfer(batch, 0))
    folder = tmp_path / "in"
    folder.mkdir()
    for i in first:
        (folder / Path(dataset.records[i].file).name).symlink_to(dataset.records[i].file)
    # the network as evaluation runs it: folded batch norms move scores by float rounding, which can reorder
    # near-ties in NMS (tests/test_fold_batch_norm.py checks the fold itself)
    predict(predict_cfg(checkpoints["letterbox"], folder, tmp_path / "out", "score_threshold=0.0",
                        "fold_batch_norm=false"))
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [i["file_name"] for i in data["images"]] == [Path(dataset.records[i].file).name for i in first]
    for image, pred in zip(data["images"], preds):
        rows = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        kept = pred["scores"] > 0
        assert len(rows) == int(kept.sum()) > 0
        np.testing.assert_allclose(np.array([xyxy(a["bbox"]) for a in rows]), pred["boxes"][kept].numpy(), atol=1e-3)
        np.testing.assert_allclose([a["score"] for a in rows], pred["scores"][kept].numpy(), rtol=1e-6)


@pytest.mark.parametrize("model, overrides", [
    ("ssd300", ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "input_size=[288,288]"]),
    ("yolov1", ["backbone.width_mult=0.25", "backbone=mobilenet_v2", "input_size=[224,288]", "head.channels=64",
                "head.fc_width=32", "head.score_threshold=0.0"]),
    ("yolov2", ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "input_size=[160,192]", "neck.channels=32",
                "head.score_threshold=0.0"]),
    ("faster_rcnn", ["backbone=mobilenet_v2", "backbone.width_mult=0.25", "input_size=[160,192]",
                     "head.anchor_sizes=[32,64,128]", "head.rpn_channels=32", "head.fc_width=32",
                     "head.score_threshold=0.0"]),
])
def test_every_head_predicts_from_its_checkpoint(model, overrides, odd_folder, tmp_path):
    ckpt = save_checkpoint(tmp_path / f"{model}.ckpt", model, *overrides)
    summary = predict(predict_cfg(ckpt, odd_folder / "a_normal.jpg", tmp_path / "out", "score_threshold=0.0",
                                  "precision=bf16"))  # CPU autocast: the GPU's code path
    assert summary["images"] == 1 and summary["boxes"] > 0
    data = json.loads((tmp_path / "out" / "predictions.json").read_text())
    boxes = np.array([xyxy(a["bbox"]) for a in data["annotations"]])
    assert (boxes >= -1e-6).all() and (boxes[:, 2] <= 500 + 1e-3).all() and (boxes[:, 3] <= 300 + 1e-3).all()
    assert (tmp_path / "out" / "images" / "a_normal.jpg").is_file()


# ---- predict.py as a user runs it -----------------------------------------------------------------
@pytest.mark.slow
def test_predict_py_writes_its_run_folder_and_refuses_a_non_checkpoint(checkpoints, odd_folder, tmp_path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}

    def run(*args):
        return subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    proc = run(f"ckpt_path={checkpoints['stretch']}", f"input={odd_folder}", "num_workers=1", "device=cpu",
               "score_threshold=0.2", "output.yolo=true", f"hydra.run.dir={tmp_path / 'run'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "predicted 4 images" in out and "skipped 1 unreadable: b_corrupt.jpg" in out
    assert len(list((tmp_path / "run" / "images").iterdir())) == 4
    assert (tmp_path / "run" / "yolo" / "classes.txt").is_file()
    assert json.loads((tmp_path / "run" / "predictions.json").read_text())["score_threshold"] == 0.2

    proc = run(f"ckpt_path={ROOT / 'README.md'}", f"input={odd_folder}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("predict.py: error: ckpt_path: ") and "is not a readable checkpoint" in proc.stderr
