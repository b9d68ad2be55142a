"""evaluate.py's COCO stats equal pycocotools' on the dataset's own annotation file.

The file has what real COCO files have and a cleaned copy would lose: mask areas that differ from
the box areas (they decide small/medium/large), a sub-pixel box, a zero-width box, a box reaching
past the image, crowd regions and images without annotations. Training drops or clips some of
those; evaluation must score every one, as pycocotools does.

The detections come from an oracle (the batch's own boxes, jittered, with wrong-class and
background false positives and random scores), so every stat lands mid-range where an error in
the ground truth would show; the trained checkpoint only provides the model evaluate.py rebuilds.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.data.shapes import ShapesGenerator
from detectors.detector import Detector
from detectors.module import DetectionModule

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 2, "name": "circle"}, {"id": 5, "name": "square"}, {"id": 9, "name": "triangle"}]
STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def write_dataset(root: Path) -> Path:
    """8 images (6 annotated from the shapes generator, 2 empty) and one COCO file for train and val."""
    gen = ShapesGenerator(8, image_size=(240, 320), seed=3, min_objects=2, max_objects=6, min_size=0.05)
    images, anns = [], []
    (root / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        image, boxes, labels = gen.sample(i)
        image_id = 100 + 7 * i  # ids that are not 0..N-1
        Image.fromarray(image).save(root / "val" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 320, "height": 240})
        if i >= 6:
            continue  # two images without annotations
        for box, label in zip(boxes.astype(float), labels):
            if label > 2:
                continue
            x1, y1, x2, y2 = box.tolist()
            w, h = x2 - x1, y2 - y1
            # a mask covers less than its box: areas 0.55..0.9 of the box's, so some objects change bucket
            anns.append({"image_id": image_id, "category_id": CATEGORIES[label]["id"], "bbox": [x1, y1, w, h],
                         "area": w * h * float(rng.uniform(0.55, 0.9)), "iscrowd": 0})
    first, second = images[0]["id"], images[1]["id"]
    anns += [
        {"image_id": first, "category_id": 2, "bbox": [10.2, 12.7, 0.6, 0.4], "area": 0.2, "iscrowd": 0},
        {"image_id": first, "category_id": 5, "bbox": [40.0, 50.0, 0.0, 12.0], "area": 0.0, "iscrowd": 0},
        {"image_id": second, "category_id": 9, "bbox": [300.5, 200.0, 40.0, 60.0], "area": 900.0, "iscrowd": 0},
        {"image_id": second, "category_id": 2, "bbox": [0.0, 0.0, 160.0, 120.0], "area": 15000.0, "iscrowd": 1},
        {"image_id": images[2]["id"], "category_id": 5, "bbox": [150.0, 100.0, 90.0, 70.0], "area": 5000.0,
         "iscrowd": 1},
    ]
    for k, a in enumerate(anns):
        a["id"] = 1000 + k
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def pycocotools_stats(gt_file: Path, results_file: Path) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


@pytest.fixture
def oracle(monkeypatch):
    """Detections made from each evaluation batch's (input-frame) boxes: jittered true positives,
    duplicates, wrong labels and background boxes, with random scores."""
    seen = {}
    transfer = DetectionModule.on_after_batch_transfer

    def spy(self, batch, dataloader_idx):
        seen["batch"] = batch
        return transfer(self, batch, dataloader_idx)

    def predict(self, raw, size):
        batch = seen["batch"]
        g = torch.Generator().manual_seed(int(batch["image_ids"][0]))
        preds = []
        for boxes, labels, mask in zip(batch["boxes"], batch["labels"], batch["mask"]):
            b, lab = boxes[mask].double(), labels[mask]
            wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)
            tp = b + (torch.rand(b.shape, generator=g, dtype=torch.float64) - 0.5) * 0.15 * wh
            wrong = (lab + 1) % 3
            bg = torch.rand(4, 2, generator=g, dtype=torch.float64) * 200
            bg = torch.cat([bg, bg + 20 + torch.rand(4, 2, generator=g, dtype=torch.float64) * 80], 1)
            out_boxes = torch.cat([tp, b, bg]).clamp(0, size[1]).float()
            out_labels = torch.cat([lab, wrong, torch.randint(0, 3, (4,), generator=g)])
            scores = torch.rand(len(out_labels), generator=g)
            order = scores.argsort(descending=True)
            preds.append({"boxes": out_boxes[order], "scores": scores[order], "labels": out_labels[order]})
        return preds

    monkeypatch.setattr(DetectionModule, "on_after_batch_transfer", spy)
    monkeypatch.setattr(Detector, "predict", predict)


@pytest.mark.slow
def test_evaluate_gives_pycocotools_stats_on_the_original_file(tmp_path, oracle):
    data = tmp_path / "data"
    gt_file = write_dataset(data)
    # a model to rebuild: one short epoch on the same file (train and val are this one split)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    train = subprocess.run(
        [sys.executable, "train.py", "data=coco", f"data.root={data}", "data.splits={train: val, val: val, test: val}",
         "augment=none", "trainer.max_epochs=1", "data.batch_size=4", "data.num_workers=0",
         "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    # training dropped the degenerate boxes (and clipped the one past the border)...
    assert "degenerate box" in train.stderr + train.stdout

    from detectors.tasks.evaluate import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                                             "split=val", "num_workers=0", "batch_size=3", "trainer.accelerator=cpu",
                                             f"paths.output_dir={tmp_path / 'eval'}"])
    metrics = evaluate(cfg)
    ours = [float(metrics[k]) for k in STATS]
    # ...and evaluation scored them: pycocotools on the original file, not on a cleaned copy
    reference = pycocotools_stats(gt_file, tmp_path / "eval" / "coco_results.json")
    assert ours == pytest.approx(reference, abs=1e-4), dict(zip(STATS, zip(ours, reference)))
    assert min(reference[:6]) > 0.05 and max(reference[:6]) < 0.95  # mid-range: errors would show
    # the ground-truth file evaluate.py writes carries the same areas and crowd flags
    written = pycocotools_stats(tmp_path / "eval" / "coco_ground_truth.json", tmp_path / "eval" / "coco_results.json")
    assert written == pytest.approx(reference, abs=1e-4)
