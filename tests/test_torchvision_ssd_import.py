"""``python -m detectors.weights torchvision ssd300_vgg16``: torchvision's own model is the reference. Its random
state dict, imported, gives torchvision's detections on real BCCD images through predict.py's path (loader,
float resize, normalisation, head, boxes back in the image's pixels, predictions.json), and a wrong file is
refused in one line."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from detectors.data.formats.common import read_image
from detectors.tasks.predict import predict
from detectors.weights.__main__ import main as weights_main
from tests.conftest import BCCD, ROOT

IMAGES = ["BloodImage_00000.jpg", "BloodImage_00001.jpg", "BloodImage_00007.jpg"]
BOX_TOLERANCE = 1e-3  # px of the original image
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def torchvision_model():
    """ssd300_vgg16 with seeded random weights, its predictors scaled to a trained head's range. Class weights
    halved: the top-200 scores then range over 0.26..0.94 with 16 or so classes among them, 1 to 3 of them
    unnamed ("N/A") ones (at full scale they all sit near 1). Box weights quartered: the random offsets have
    std 2.6 and reach 13 (boxes e^2.6 = 13 times their prior), where float32 noise of the convolutions (ours
    run channels-last) alone moves a box by 1.4e-3 px; quartered, offsets of std 0.65."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.weight.mul_(0.5)
        for conv in model.head.regression_head.module_list:
            conv.weight.mul_(0.25)
    return model


@pytest.fixture(scope="module")
def imported(torchvision_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv_ssd")
    torch.save(torchvision_model.state_dict(), folder / "ssd300_vgg16.pth")
    assert weights_main(["torchvision", "ssd300_vgg16", "--weights", str(folder / "ssd300_vgg16.pth"),
                         "--out", str(folder / "ssd300.ckpt")]) == 0
    return folder / "ssd300.ckpt"


def framework_predictions(ckpt, images, out):
    """predict.py on ``images`` (a folder), float32 on the CPU, every box the head keeps: predictions.json."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={ckpt}", f"input={images}", f"paths.output_dir={out}",
                                            "num_workers=0", "device=cpu", "precision=32", "batch_size=3",
                                            "score_threshold=0", "output.images=false"])
    predict(cfg)
    return json.loads((out / "predictions.json").read_text())


def test_imported_ssd300_detects_as_torchvision(torchvision_model, imported, tmp_path):
    if not (BCCD / "JPEGImages").is_dir():
        pytest.skip(f"BCCD not found at {BCCD} (set BCCD_ROOT)")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in IMAGES:
        (folder / name).symlink_to(BCCD / "JPEGImages" / name)
    ours = framework_predictions(imported, folder, tmp_path / "out")
    by_image = {img["id"]: img["file_name"] for img in ours["images"]}

    from torchvision.models.detection import SSD300_VGG16_Weights

    categories = SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    pixels = [torch.from_numpy(read_image(folder / name)).permute(2, 0, 1).float() / 255 for name in IMAGES]
    with torch.no_grad():
        reference = torchvision_model(pixels)
    worst_box = worst_score = 0.0
    unnamed = 0
    for name, ref in zip(IMAGES, reference):
        mine = [d for d in ours["annotations"] if by_image[d["image_id"]] == name]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)], dtype=torch.float64)
        scores = torch.tensor([d["score"] for d in mine], dtype=torch.float64)
        labels = torch.tensor([d["category_id"] for d in mine])
        # torchvision reports its unnamed ("N/A") columns too, which take places of its 200 per image; ours
        # never reports them, so it has all of torchvision's named detections and, in their places, lower ones
        named = [i for i, label in enumerate(ref["labels"].tolist()) if categories[label] != "N/A"]
        assert len(mine) == 200 and len(named) > 100
        unnamed += len(ref["labels"]) - len(named)
        assert float(ref["scores"].std()) > 0.05  # spread scores: the comparison means something
        matched = torch.zeros(len(mine), dtype=torch.bool)
        for box, score, label in zip(ref["boxes"][named].double(), ref["scores"][named].double(), ref["labels"][named]):
            # the same class, the nearest box (NMS keeps no two boxes of a class alike)
            gap = torch.where(labels == label, (boxes - box).abs().amax(1), torch.inf)
            j = int(gap.argmin())
            assert not matched[j], f"{name}: two of torchvision's boxes match one of ours"
            matched[j] = True
            worst_box, worst_score = max(worst_box, float(gap[j])), max(worst_score, abs(float(scores[j] - score)))
        assert int(matched.sum()) == len(named)
        assert all(float(s) <= float(ref["scores"][named].min()) + SCORE_TOLERANCE for s in scores[~matched]), name
    print(f"largest differences to torchvision: box {worst_box:.2e} px, score {worst_score:.2e}; "
          f"{unnamed} unnamed detections of torchvision's left out")
    assert unnamed > 0  # the case of the N/A columns is exercised
    assert worst_box < BOX_TOLERANCE and worst_score < SCORE_TOLERANCE


def test_checkpoint_carries_torchvision_settings(imported):
    from detectors.checkpoints import load_checkpoint

    ckpt, run = load_checkpoint(imported)
    assert run.head.class_columns == run.category_ids
    assert len(run.data.classes) == 80 and run.data.classes[0] == "person" and run.category_ids[-1] == 90
    assert 12 not in run.category_ids  # an "N/A" id of torchvision's label map
    assert run.data.augment.eval_resize == "stretch_float"
    assert ckpt["state_dict"]["detector.head.cls_convs.0.weight"].shape[0] == 4 * 91


def test_a_wrong_file_is_refused_in_one_line(tmp_path, capsys):
    vgg = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg)
    text = tmp_path / "notes.pth"
    text.write_text("not a state dict")
    for path, reason in [(vgg, "not a state dict of torchvision's ssd300_vgg16"),
                         (text, "is not a readable state dict")]:
        assert weights_main(["torchvision", "ssd300_vgg16", "--weights", str(path),
                             "--out", str(tmp_path / "x.ckpt")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and reason in err, err
    assert not (tmp_path / "x.ckpt").exists()


def test_a_tensor_of_another_shape_is_refused(torchvision_model, tmp_path, capsys):
    state = dict(torchvision_model.state_dict())
    state["backbone.extra.1.0.weight"] = torch.zeros(128, 1024, 1, 1)
    torch.save(state, tmp_path / "odd.pth")
    assert weights_main(["torchvision", "ssd300_vgg16", "--weights", str(tmp_path / "odd.pth"),
                         "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "backbone.extra.1.0.weight is (128, 1024, 1, 1), detector.neck.blocks.0.0.weight here is (256, 1024, 1, 1)" \
        in err and len(err.splitlines()) == 1, err


def test_priors_equal_torchvision_default_boxes():
    """head.priors with torchvision's scales and steps: its DefaultBoxGenerator's boxes, in its order."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    from detectors.anchors import SSDPriors
    from detectors.boxes import box_convert
    from detectors.weights.torchvision_ssd import PRIOR_SCALES, PRIOR_STEPS

    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    shapes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    ref = DefaultBoxGenerator(ratios, scales=list(PRIOR_SCALES), steps=list(PRIOR_STEPS))(
        ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)]), [torch.zeros(1, 1, h, w) for h, w in shapes])[0]
    ours = box_convert(SSDPriors(ratios, scales=PRIOR_SCALES, steps=PRIOR_STEPS)(shapes, (300, 300)), "cxcywh", "xyxy")
    assert ours.shape == ref.shape == (8732, 4)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)


def test_class_columns_score_and_train_the_named_columns():
    """head.class_columns=[3, 1] over 4 logit columns: a plain head of 3 classes relabelled (its class 2 is
    column 3, its class 0 column 1) scores and trains the same; column 2 stays in the softmax, unreported."""
    from detectors.anchors import SSDPriors
    from detectors.heads.ssd import SSDHead, SSDRaw

    priors = SSDPriors([[2]], 0.3, 0.6, None)
    named = SSDHead([8], 2, priors=priors, class_columns=[3, 1])
    plain = SSDHead([8], 3, priors=priors)
    assert named.cls_convs[0].out_channels == plain.cls_convs[0].out_channels == 4 * 4
    torch.manual_seed(0)
    raw = SSDRaw(torch.randn(2, 64, 4), torch.randn(2, 64, 4) * 0.1, [(4, 4)])
    _, scores = named.decode_scores(raw, (64, 64))
    _, plain_scores = plain.decode_scores(raw, (64, 64))
    torch.testing.assert_close(scores, plain_scores[..., [2, 0]])
    targets = {"boxes": torch.tensor([[[4.0, 4.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]] * 2),
               "labels": torch.tensor([[0, 1], [1, -1]]), "mask": torch.tensor([[True, True], [True, False]]),
               "weights": torch.ones(2, 2)}
    relabelled = {**targets, "labels": torch.tensor([[2, 0], [0, -1]])}
    torch.testing.assert_close(named.loss(raw, targets, (64, 64)), plain.loss(raw, relabelled, (64, 64)))
    with pytest.raises(ValueError, match="class_columns must be 2 distinct columns >= 1"):
        SSDHead([8], 2, priors=priors, class_columns=[0, 1])


@pytest.mark.slow
def test_evaluate_on_coco_data_scores_with_coco_ids(torchvision_model, imported, tmp_path):
    """evaluate.py data=coco on a COCO file whose boxes are torchvision's own detections (four classes, by their
    COCO ids) of one BCCD image: the imported model finds them all (AP 1.0), and pycocotools on the dataset's
    own file agrees with the results file it writes: names and ids are COCO's."""
    if not (BCCD / "JPEGImages").is_dir():
        pytest.skip(f"BCCD not found at {BCCD} (set BCCD_ROOT)")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torchvision.models.detection import SSD300_VGG16_Weights

    from detectors.tasks.evaluate import run_evaluation

    categories = SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "val2017" / IMAGES[0]).symlink_to(BCCD / "JPEGImages" / IMAGES[0])
    with torch.no_grad():
        pixels = torch.from_numpy(read_image(BCCD / "JPEGImages" / IMAGES[0])).permute(2, 0, 1) / 255
        ref = torchvision_model([pixels])[0]
    annotations, seen = [], set()
    for (x1, y1, x2, y2), label in zip(ref["boxes"].tolist(), ref["labels"].tolist()):  # best first
        if categories[label] != "N/A" and label not in seen and len(seen) < 4:
            seen.add(label)
            annotations.append({"id": len(seen), "image_id": 7, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    gt_file = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    gt_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": IMAGES[0], "width": 640, "height": 480}], "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(categories) if n not in ("N/A", "__background__")]}))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"ckpt_path={imported}", "data=coco", f"data.root={tmp_path / 'coco'}",
            "data.splits={train: val2017, val: val2017, test: val2017}", "num_workers=0", "batch_size=1",
            "trainer.accelerator=cpu", "trainer.precision=32-true", f"paths.output_dir={tmp_path / 'eval'}",
            "output.pr_curves=false", "output.samples_file=null"])
    metrics, _ = run_evaluation(cfg, verbose=False)
    assert float(metrics["map"]) == pytest.approx(1.0)
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert {r["category_id"] for r in results} >= seen
    gt = COCO(str(gt_file))
    check = COCOeval(gt, gt.loadRes(results), "bbox")
    check.evaluate()
    check.accumulate()
    check.summarize()
    assert check.stats[0] == pytest.approx(1.0)
