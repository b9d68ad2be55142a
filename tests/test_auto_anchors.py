"""head.anchors=auto: the choice between the configured anchors and k-means (against a hand count of the fit),
and the chosen anchors travelling in the head's state dict (what predict, export and a resume load).
The end-to-end run (train.py, evaluate.py, resume) is in tests/test_yolov3_e2e.py."""

import pytest
import torch

from detectors.anchors.auto import choose_anchors
from detectors.heads.yolov3 import YOLOv3Head


def loop_share(wh: torch.Tensor, anchors: torch.Tensor, iou: float = 0.5) -> tuple[float, float]:
    """The share of boxes whose best centre-aligned IoU with an anchor is >= ``iou``, and the mean best IoU,
    counted box by box in Python: the independent reference."""
    reached, total = 0, 0.0
    for w, h in wh.tolist():
        best = 0.0
        for aw, ah in anchors.tolist():
            inter = min(w, aw) * min(h, ah)
            best = max(best, inter / (w * h + aw * ah - inter))
        reached += best >= iou
        total += best
    return reached / len(wh), total / len(wh)


def small_boxes(n: int = 200, seed: int = 0) -> torch.Tensor:
    """(n, 2) boxes of 8..12 px by 8..12 px: nothing like 300 px anchors."""
    g = torch.Generator().manual_seed(seed)
    return 8 + 4 * torch.rand(n, 2, generator=g, dtype=torch.float64)


def test_mismatched_anchors_are_replaced_by_kmeans():
    wh = small_boxes()
    configured = torch.tensor([[300.0, 300.0], [250.0, 320.0], [320.0, 250.0]])
    choice = choose_anchors(wh, configured)
    assert choice.used_kmeans and choice.kmeans is not None
    assert choice.configured.share == 0.0
    assert ((choice.anchors > 7) & (choice.anchors < 13)).all()  # the clusters sit among the boxes
    areas = choice.anchors.prod(1)
    assert torch.equal(areas, areas.sort().values)  # by area: the heads group them by level in this order
    share, mean = loop_share(wh, choice.anchors)
    assert choice.kmeans.share == pytest.approx(share) and share == 1.0
    assert choice.kmeans.mean_iou == pytest.approx(mean)
    line = choice.describe()
    assert line.startswith("anchors: configured fit 0.0000 of 200 boxes >= 0.5 IoU") and "using k-means" in line


def test_matching_anchors_are_kept():
    configured = torch.tensor([[10.0, 12.0], [30.0, 20.0], [60.0, 90.0]])
    wh = configured.repeat(5, 1).double()
    choice = choose_anchors(wh, configured)
    assert not choice.used_kmeans and choice.kmeans is None  # share 1.0 >= 0.98: k-means not even run
    assert torch.equal(choice.anchors, configured)
    assert choice.configured.share == 1.0 and choice.configured.mean_iou == pytest.approx(1.0)
    assert "keeping the configured ones" in choice.describe()


def test_logged_share_equals_a_direct_count():
    # a mix the configured anchors reach only partly; threshold 1.0 always runs k-means
    g = torch.Generator().manual_seed(3)
    wh = torch.cat([small_boxes(60, 1), 40 + 80 * torch.rand(90, 2, generator=g, dtype=torch.float64)])
    configured = torch.tensor([[10.0, 13.0], [33.0, 23.0], [62.0, 45.0], [116.0, 90.0]])
    choice = choose_anchors(wh, configured, threshold=1.0)
    share, mean = loop_share(wh, configured)
    assert 0 < share < 1
    assert choice.configured.share == pytest.approx(share) and choice.configured.mean_iou == pytest.approx(mean)
    k_share, k_mean = loop_share(wh, choice.kmeans_anchors)
    assert choice.kmeans.share == pytest.approx(k_share) and choice.kmeans.mean_iou == pytest.approx(k_mean)
    assert f"configured fit {share:.4f} of 150 boxes" in choice.describe()
    assert f"k-means {k_share:.4f} (mean {k_mean:.4f})" in choice.describe()
    # the better one is kept: the higher share, then the higher mean
    assert choice.used_kmeans == ((k_share, k_mean) > (share, mean))


def test_too_few_box_shapes_keep_the_configured_anchors():
    configured = torch.tensor([[300.0, 300.0], [250.0, 320.0]])
    choice = choose_anchors(torch.tensor([[10.0, 10.0]] * 5), configured)  # one distinct shape for k=2
    assert not choice.used_kmeans and torch.equal(choice.anchors, configured)
    assert "no k-means" in choice.describe()


def head(anchors="auto"):
    return YOLOv3Head([4, 4], 2, anchors=anchors, default_anchors=((8.0, 8.0), (32.0, 32.0)), input_size=(64, 64))


def test_chosen_anchors_travel_in_the_state_dict():
    fitted = head()
    assert fitted.anchors_pending
    chosen = torch.tensor([[5.0, 6.0], [20.0, 40.0]])
    fitted.set_anchors(chosen)
    state = fitted.state_dict()
    assert torch.equal(state["chosen_anchors"], chosen)
    rebuilt = head()  # as predict/export/resume rebuild it from the run config: anchors: auto, the defaults
    assert torch.equal(rebuilt.anchors, torch.tensor([[8.0, 8.0], [32.0, 32.0]]))
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.anchors, chosen) and not rebuilt.anchors_pending
    # the decoding grid uses them (its cache made from the new anchors, not the defaults)
    grid = rebuilt.yolo_anchors.grid([(8, 8), (4, 4)], (64, 64), "cpu")
    assert torch.equal(grid.anchors[0], chosen[0]) and torch.equal(grid.anchors[-1], chosen[1])
    # a head of listed anchors keeps the state dict its checkpoints always had
    assert "chosen_anchors" not in head(anchors=((8.0, 8.0), (32.0, 32.0))).state_dict()


def test_unfitted_auto_head_refuses_to_train():
    h = head().train()
    raw = h([torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)])
    targets = {"boxes": torch.zeros(1, 0, 4), "labels": torch.zeros(1, 0, dtype=torch.long),
               "mask": torch.zeros(1, 0, dtype=torch.bool)}
    with pytest.raises(RuntimeError, match="anchors=auto"):
        h.loss(raw, targets, (64, 64))


def test_bad_anchors_value_is_one_clear_error():
    with pytest.raises(ValueError, match="'auto'"):
        head(anchors="kmeans")
    with pytest.raises(ValueError, match="head.auto_anchors takes threshold and iou"):
        YOLOv3Head([4, 4], 2, anchors="auto", default_anchors=((8.0, 8.0), (32.0, 32.0)), auto_anchors={"thresh": 0.9})


def test_an_auto_head_without_a_datamodule_is_refused_in_words_and_priors_are_not_reported():
    """fit() given plain loaders (no DetectionDataModule): an auto head cannot be fitted (one clear error), and
    the priors' fit report of other heads is skipped rather than failing."""
    from types import SimpleNamespace

    from detectors.callbacks.auto_anchors import AutoAnchors

    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(RuntimeError, match="head.anchors=auto fits the anchors"):
        AutoAnchors()._box_sizes(trainer, (64, 64))
    assert AutoAnchors()._training_boxes(trainer, (64, 64), allow_generated=False) is None
