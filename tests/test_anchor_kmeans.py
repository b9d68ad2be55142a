"""k-means anchors (YOLOv2 dimension clusters) against known shapes, hand-worked IoUs, a plain loop,
and the CLI on BCCD against boxes read straight from the XML."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from detectors.anchors import iou_kmeans, kmeans_anchors, kmeans_plus_plus, mean_best_iou
from detectors.data.records import Record
from detectors.tasks.anchors import box_sizes_at_input, main, split_arguments

SHAPES = torch.tensor([[12.0, 30.0], [40.0, 18.0], [60.0, 80.0], [150.0, 110.0]])  # by area


def jittered(shapes: torch.Tensor, per_shape: int, jitter: float, seed: int) -> torch.Tensor:
    """(len(shapes) * per_shape, 2): each shape with independent Gaussian relative jitter on w and h."""
    g = torch.Generator().manual_seed(seed)
    wh = shapes.repeat_interleave(per_shape, 0)
    return wh * (1 + jitter * torch.randn(wh.shape, generator=g))


def shape_iou_np(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(N, K) IoU of centre-aligned boxes, written out independently of detectors.assign."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    return inter / (wh[:, None, 0] * wh[:, None, 1] + anchors[None, :, 0] * anchors[None, :, 1] - inter)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_shapes(seed):
    wh = jittered(SHAPES, 200, 0.05, seed=10 + seed)
    anchors = kmeans_anchors(wh, 4, seed=seed)
    assert anchors.shape == (4, 2) and anchors.dtype == wh.dtype
    assert torch.all(anchors.prod(1).diff() > 0)  # sorted by area
    # the members' mean is the shape up to the jitter's standard error (5% / sqrt(200) = 0.35%)
    torch.testing.assert_close(anchors, SHAPES, rtol=0.02, atol=0)
    assert mean_best_iou(wh, anchors) > 0.9


def test_mean_best_iou_hand_worked():
    wh = torch.tensor([[10.0, 10.0], [20.0, 10.0], [5.0, 40.0]])
    anchors = [[10.0, 10.0], [10.0, 20.0]]
    # [10,10]: 1 with the first. [20,10]: 100 / (200 + 100 - 100) = 1/2 vs 100 / (200 + 200 - 100) = 1/3.
    # [5,40]: 50 / (200 + 100 - 50) = 1/5 vs 100 / (200 + 200 - 100) = 1/3
    assert mean_best_iou(wh, anchors) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert mean_best_iou(wh, torch.tensor(anchors)) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_same_seed_same_anchors():
    wh = torch.exp(torch.randn(500, 2, generator=torch.Generator().manual_seed(0))) * 30
    a, b = kmeans_anchors(wh, 5, seed=3), kmeans_anchors(wh, 5, seed=3)
    assert torch.equal(a, b)
    # the seed is used: on unstructured data other seeds end in other local optima
    assert any(not torch.allclose(a, kmeans_anchors(wh, 5, seed=s)) for s in range(4, 10))


def test_k_above_distinct_shapes_raises():
    wh = torch.tensor([[10.0, 20.0], [30.0, 30.0], [5.0, 8.0]]).repeat(20, 1)  # 60 boxes, 3 shapes
    with pytest.raises(ValueError, match="k=4 clusters need at least 4 distinct box shapes; the 60 boxes have 3"):
        kmeans_anchors(wh, 4)
    torch.testing.assert_close(kmeans_anchors(wh, 3), torch.tensor([[5.0, 8.0], [10.0, 20.0], [30.0, 30.0]]))
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors(torch.tensor([[10.0, 0.0], [3.0, 4.0]]), 1)


def test_lloyd_against_a_plain_loop():
    wh = (torch.exp(torch.randn(300, 2, generator=torch.Generator().manual_seed(1))) * 40).double()
    start = kmeans_plus_plus(wh, 5, torch.Generator().manual_seed(0))
    assert len(torch.unique(start, dim=0)) == 5 and all((wh == c).all(1).any() for c in start)  # distinct boxes
    ours, converged = iou_kmeans(wh, start.clone())
    assert converged

    boxes, centroids, previous = wh.numpy(), start.numpy().copy(), None
    for _ in range(300):
        assign = [max(range(5), key=lambda j: shape_iou_np(b[None], centroids[j][None])[0, 0]) for b in boxes]
        if assign == previous:
            break
        previous = assign
        for j in range(5):
            members = [b for b, a in zip(boxes, assign) if a == j]
            assert members  # no empty cluster on this data: the reseeding is tested below
            centroids[j] = np.mean(members, axis=0)
    np.testing.assert_allclose(ours.numpy(), centroids, rtol=1e-12)
    # a fixed point: each centroid is the mean of the boxes whose best centroid it is
    best = shape_iou_np(boxes, centroids).argmax(1)
    np.testing.assert_allclose(np.stack([boxes[best == j].mean(0) for j in range(5)]), centroids, rtol=1e-12)


def test_empty_cluster_is_reseeded_at_the_farthest_box():
    wh = torch.tensor([[10.0, 10.0]] * 5 + [[100.0, 100.0]] * 5)
    # both centroids equal: every box ties and goes to the first, the second is left empty
    centroids, converged = iou_kmeans(wh, torch.tensor([[10.0, 10.0], [10.0, 10.0]]))
    assert converged
    torch.testing.assert_close(centroids, torch.tensor([[10.0, 10.0], [100.0, 100.0]]))


def test_box_sizes_at_input_hand_worked():
    r = Record(0, "a.jpg", width=100, height=50,
               boxes=[[0, 0, 10, 20], [5, 5, 45, 15], [0, 0, 30, 30], [0, 0, 1, 40]], labels=[0, 0, 0, 0],
               difficult=[False, False, True, False])
    # stretch to (H, W) = (64, 64): x * 0.64, y * 1.28; the 1 px wide box is 0.64 px there, under 1
    wh, left_out = box_sizes_at_input([r], (64, 64), letterbox=False, min_box_size=1.0)
    torch.testing.assert_close(wh, torch.tensor([[6.4, 25.6], [25.6, 12.8]], dtype=torch.float64))
    assert list(left_out.values()) == [1, 1]
    # letterbox: one factor min(64 / 100, 64 / 50) = 0.64 (100 x 50 -> 64 x 32, no rounding)
    wh, _ = box_sizes_at_input([r], (64, 64), letterbox=True, min_box_size=0.5)
    torch.testing.assert_close(wh, torch.tensor([[6.4, 12.8], [25.6, 6.4], [0.64, 25.6]], dtype=torch.float64))


def test_split_arguments():
    own, overrides = split_arguments(["data=voc", "k=9", "seed=3", "out=x.yaml", "+head.anchors=[[1,2]]", "model.k=1"])
    assert own == {"k": 9, "seed": 3, "iters": 300, "out": "x.yaml"}
    assert overrides == ["data=voc", "+head.anchors=[[1,2]]", "model.k=1"]
    with pytest.raises(ValueError, match="k must be an integer"):
        split_arguments(["k=five"])


def bccd_train_wh(root, size=(300, 300)) -> np.ndarray:
    """BCCD's training boxes at a stretched input (H, W), straight from the XML: VOC is 1-based inclusive
    (w = xmax - xmin + 1), boxes clipped to the image, the ones then empty or under 1 px at the input
    and the difficult ones left out."""
    wh = []
    for i in (root / "ImageSets" / "Main" / "train.txt").read_text().split():
        ann = ET.parse(root / "Annotations" / f"{i}.xml").getroot()
        W, H = (float(ann.find("size").findtext(k)) for k in ("width", "height"))
        for obj in ann.iter("object"):
            if obj.findtext("difficult", "0").strip() == "1":
                continue
            x1, y1, x2, y2 = (float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            w = min(x2, W) - max(x1 - 1, 0)
            h = min(y2, H) - max(y1 - 1, 0)
            w, h = w * size[1] / W, h * size[0] / H
            if w >= 1 and h >= 1:
                wh.append((w, h))
    return np.array(wh)


def printed(pattern: str, out: str) -> str:
    m = re.search(pattern, out)
    assert m, out
    return m.group(1)


def test_cli_on_bccd(bccd_root, tmp_path, capsys):
    given = [[10, 10], [20, 20], [40, 40], [80, 80], [160, 160]]
    out_file = tmp_path / "a.yaml"
    code = main(["kmeans", "data=voc", f"data.root={bccd_root}", "model=ssd300", "k=5", f"out={out_file}",
                 "+head.anchors=" + str(given).replace(" ", "")])
    out = capsys.readouterr().out
    assert code == 0, out
    reference = bccd_train_wh(bccd_root)
    assert int(printed(r"boxes clustered: (\d+)", out)) == len(reference)
    assert float(printed(r"mean IoU of the 5 anchors: ([\d.]+)", out)) > 0.6
    expected_given = shape_iou_np(reference, np.array(given, float)).max(1).mean()
    current = float(printed(r"mean IoU of the config's head.anchors \(5\): ([\d.]+)", out))
    assert current == pytest.approx(expected_given, abs=1e-4)

    written = OmegaConf.load(out_file)
    anchors = OmegaConf.to_container(written.head.anchors)
    assert len(anchors) == 5 and all(len(a) == 2 for a in anchors)
    # the anchors of the boxes read independently, rounded as written
    expected = kmeans_anchors(torch.from_numpy(reference), 5, seed=0)
    np.testing.assert_allclose(anchors, expected.numpy(), atol=0.005 + 1e-9)
    assert float(printed(r"mean IoU of the 5 anchors: ([\d.]+)", out)) == pytest.approx(
        shape_iou_np(reference, np.array(anchors)).max(1).mean(), abs=1e-4)


def test_cli_model_without_anchors_and_letterbox(bccd_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out file lands in the current directory
    code = main(["kmeans", "data=voc", f"data.root={bccd_root}", "augment=yolo", "input_size=[416,416]", "k=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the model has no anchors (no head.anchors in the config)" in out
    assert "letterbox" in out
    # 640 x 480 -> 416 x 312: the widths scale as under stretch to 416, the heights by 416 / 640, not 416 / 480
    stretched = kmeans_anchors(torch.from_numpy(bccd_train_wh(bccd_root, (416, 416))), 3)
    anchors = np.array(OmegaConf.to_container(OmegaConf.load(tmp_path / "anchors_k3.yaml").head.anchors))
    np.testing.assert_allclose(anchors, stretched.numpy() * [1, 480 / 640], atol=0.006)


def test_cli_errors(bccd_root, capsys):
    assert main(["kmeans", "data=voc", f"data.root={bccd_root}", "k=5000"]) == 1
    assert "k=5000 clusters need at least 5000 distinct box shapes" in capsys.readouterr().out
    assert main(["cluster"]) == 2
    assert main(["kmeans", "k=x"]) == 2


def test_cli_on_generated_shapes(tmp_path, capsys):
    """The shapes source makes its boxes with its images: its records carry none until loaded."""
    from detectors.data.formats.shapes import ShapesSource

    code = main(["kmeans", "data.source.sizes={train: 6, val: 1, test: 1}", "k=2", f"out={tmp_path / 'a.yaml'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    # the generator as the default config sets it on this machine (the CPU's and the GPU's differ)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        generator = compose("train", overrides=["data.classes=[a]"]).data.source.generator
    source = ShapesSource({"train": 6, "val": 1, "test": 1}, (300, 300), seed=0,
                          generator=OmegaConf.to_container(generator, resolve=True))
    expected = sum(len(source.load(r)[1].boxes) for r in source.records("train"))
    assert int(printed(r"boxes clustered: (\d+)", out)) == expected > 0
