"""Batch-level mixup and multi-scale resizing: hand-computed cases, the draws, and training steps of
the real SSD300 head under both."""

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException

from detectors.data.batch_ops import BatchMixup, MultiScale, mixup_batch, resize_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def small_batch():
    """3 images of 4x6; image 0 has 2 boxes, image 1 one, image 2 none (M = 2)."""
    images = torch.arange(3 * 3 * 4 * 6, dtype=torch.float32).view(3, 3, 4, 6)
    boxes = torch.tensor([[[0, 0, 2, 2], [1, 1, 4, 3]], [[2, 0, 6, 4], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 2], dtype=torch.float32)
    return {
        "images": images,
        "boxes": boxes,
        "labels": torch.tensor([[0, 1], [2, -1], [-1, -1]]),
        "mask": torch.tensor([[True, True], [True, False], [False, False]]),
        "difficult": torch.tensor([[False, True], [False, False], [False, False]]),
        "weights": torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        "image_ids": torch.tensor([10, 11, 12]),
    }


def test_mixup_batch_hand_computed():
    batch = small_batch()
    # image 0 mixed with image 1 (lam 0.25), image 1 with image 0 (lam 0.6), image 2 left alone
    out = mixup_batch(batch, torch.tensor([1, 0, 2]), torch.tensor([0.25, 0.6, 0.3]))
    x = batch["images"]
    torch.testing.assert_close(out["images"][0], 0.25 * x[0] + 0.75 * x[1])
    torch.testing.assert_close(out["images"][1], 0.6 * x[1] + 0.4 * x[0])
    torch.testing.assert_close(out["images"][2], x[2])  # not mixed: lam ignored
    # own boxes in slots 0..1, the partner's in slots 2..3
    assert out["mask"].tolist() == [[True, True, True, False], [True, False, True, True], [False] * 4]
    torch.testing.assert_close(out["weights"], torch.tensor([[0.25, 0.25, 0.75, 0.0], [0.6, 0.0, 0.4, 0.4], [0.0] * 4]))
    assert out["labels"].tolist() == [[0, 1, 2, -1], [2, -1, 0, 1], [-1] * 4]
    assert out["difficult"].tolist() == [[False, True, False, False], [False, False, False, True], [False] * 4]
    torch.testing.assert_close(out["boxes"][0, 2], torch.tensor([2.0, 0, 6, 4]))
    torch.testing.assert_close(out["boxes"][1, 2:], batch["boxes"][0])
    assert torch.equal(out["image_ids"], batch["image_ids"])
    # the weights of an image's boxes add up to its own total: lam + (1 - lam) per object
    total = out["weights"].sum(1)
    torch.testing.assert_close(total, torch.tensor([0.25 * 2 + 0.75 * 1, 0.6 * 1 + 0.4 * 2, 0.0]))


def test_mixup_draws_follow_beta_and_prob_and_are_seeded():
    mixup = BatchMixup(prob=0.4, alpha=1.5, seed=7)
    partners, lams = zip(*(mixup.draw(16, step) for step in range(2000)))
    partners, lams = np.stack(partners), np.stack(lams)
    mixed = partners != np.arange(16)
    assert abs(mixed.mean() - 0.4) < 0.02
    lam = lams[mixed]
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) (hand formula)
    assert abs(lam.mean() - 0.5) < 0.01
    assert abs(lam.var() - 1 / (4 * (2 * 1.5 + 1))) < 0.005
    assert ((lam > 0) & (lam < 1)).all() and (lams[~mixed] == 1).all()
    # each step's draw is a function of (seed, step) only
    again = BatchMixup(prob=0.4, alpha=1.5, seed=7).draw(16, 1234)
    assert np.array_equal(again[0], partners[1234]) and np.array_equal(again[1], lams[1234])
    assert not np.array_equal(BatchMixup(prob=0.4, alpha=1.5, seed=8).draw(16, 1234)[1], lams[1234])
    # a batch of one is never mixed; prob 1 mixes every image, with another one
    assert (BatchMixup(prob=1.0).draw(1, 0)[0] == 0).all()
    partner, _ = BatchMixup(prob=1.0).draw(8, 3)
    assert (partner != np.arange(8)).all() and sorted(partner) == list(range(8))


def test_resize_batch_hand_computed_boxes_and_cv2_pixels():
    """Boxes scale by W'/W and H'/H (hand-computed); the pixels match OpenCV's bilinear resize, whose
    pixel-centre convention is the one that makes box edges scale that way."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 3, 4, 8)).astype(np.float32)
    batch = {
        "images": torch.from_numpy(image),
        "boxes": torch.tensor([[[2.0, 1.0, 6.0, 3.0]], [[0.0, 0.0, 8.0, 4.0]]]),
        "mask": torch.tensor([[True], [True]]),
    }
    out = resize_batch(batch, (6, 12))  # H x1.5, W x1.5
    torch.testing.assert_close(out["boxes"], torch.tensor([[[3.0, 1.5, 9.0, 4.5]], [[0.0, 0.0, 12.0, 6.0]]]))
    for i in range(2):
        ref = cv2.resize(image[i].transpose(1, 2, 0), (12, 6), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        np.testing.assert_allclose(out["images"][i].numpy(), ref, atol=1e-5)
    out = resize_batch(batch, (8, 4))  # H x2, W x0.5
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    assert out["images"].shape == (2, 3, 8, 4)
    assert resize_batch(batch, (4, 8)) is batch  # same size: nothing to do


def test_shrinking_is_antialiased_like_pil_and_boxes_follow():
    """When shrinking, the pixels match PIL's antialiased bilinear resize (the reference torch's
    antialias=True follows), and a bright square's half-maximum extent is its scaled box."""
    from PIL import Image

    image = torch.zeros(1, 3, 40, 60)
    image[..., 10:30, 20:44] = 1.0
    image[:, 1] = torch.rand(40, 60, generator=torch.Generator().manual_seed(0))
    batch = {"images": image, "boxes": torch.tensor([[[20.0, 10.0, 44.0, 30.0]]])}
    out = resize_batch(batch, (20, 30))
    assert out["boxes"][0, 0].tolist() == [10.0, 5.0, 22.0, 15.0]
    for c in (0, 1):
        ref = np.asarray(Image.fromarray(image[0, c].numpy()).resize((30, 20), Image.BILINEAR))
        np.testing.assert_allclose(out["images"][0, c].numpy(), ref, atol=1e-4)
    ys, xs = torch.nonzero(out["images"][0, 0] > 0.5, as_tuple=True)
    assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == [10, 5, 22, 15]


def test_multiscale_sizes_blocks_and_seed():
    sizes = list(range(320, 609, 32))
    ms = MultiScale(sizes, every_n_batches=10, seed=3)
    drawn = [ms.size_at(step) for step in range(3000)]
    assert all(d[0] == d[1] and d[0] in sizes for d in drawn)
    assert {d[0] for d in drawn} == set(sizes)  # every size gets its turn
    for block in range(300):
        assert len(set(drawn[block * 10:(block + 1) * 10])) == 1  # constant within a block of 10 batches
    assert len({drawn[i * 10] for i in range(20)}) > 3  # and it changes between blocks
    assert MultiScale(sizes, 10, seed=3).size_at(1234) == drawn[1234]
    assert MultiScale([[320, 480], 352], 1).sizes == [(320, 480), (352, 352)]
    with pytest.raises(ValueError, match="empty"):
        MultiScale([], 10)
    with pytest.raises(ValueError, match="every_n_batches"):
        MultiScale([320], 0)


# ---- the module and the real SSD300 head ----------------------------------------------------------
@pytest.fixture(scope="module")
def ssd():
    from common import build_ours, random_batch

    # channels-last as on a GPU or a bf16 CPU (float32 on a CPU, the tests' precision, picks NCHW): the batch
    # must follow the network's layout
    module = build_ours(["model=ssd300", "mixup.prob=1.0", "multiscale.sizes=[320,352]",
                         "multiscale.every_n_batches=1", "seed=5", "model.channels_last=true"], num_classes=3)
    # the loader delivers the largest multiscale size (data.train_input_size), which batches shrink from
    return module, random_batch(2, 352, 3, 4, "cpu", seed=1)


def test_eval_batches_are_left_at_the_input_size(ssd):
    from common import random_batch

    module, _ = ssd
    batch = random_batch(2, 300, 3, 4, "cpu", seed=1)  # what the evaluation loader delivers
    module.eval()
    out = module.on_after_batch_transfer(batch, 0)
    assert out["images"].shape == (2, 3, 300, 300) and out["boxes"].shape == (2, 4, 4)
    torch.testing.assert_close(out["boxes"], batch["boxes"])


def test_ssd_training_step_under_mixup_and_multiscale(ssd):
    """The training batch is normalised, shrunk with its boxes from the loader's 352 to the drawn size,
    and mixed (both images' boxes, weights lam and 1 - lam); SSD300 builds its priors for that size and the loss, box term included,
    is the lam-weighted sum of the terms of the two images' boxes, and trains."""
    module, batch = ssd
    module.train()
    module._batches_seen = 0
    out = module.on_after_batch_transfer(batch, 0)
    size = module.multiscale.size_at(0)
    partner, lam = module.mixup.draw(2, 0)
    assert out["images"].shape == (2, 3, *size) and out["images"].is_contiguous(memory_format=torch.channels_last)
    scale = size[1] / 352
    torch.testing.assert_close(out["boxes"][:, :4], batch["boxes"] * scale)
    torch.testing.assert_close(out["boxes"][:, 4:], batch["boxes"][torch.from_numpy(partner)] * scale)
    torch.testing.assert_close(out["weights"][:, 0], torch.from_numpy(lam))
    torch.testing.assert_close(out["weights"][:, 4], torch.from_numpy(1 - lam))

    raw = module.detector(out["images"])
    assert raw.box_offsets.shape[1] == module.detector.head.make_priors(raw, size).shape[0]
    losses = module.detector.loss(raw, out, size)
    # matching ignores the weights, so the box term is linear in them: the mixed loss is, image by image,
    # lam times the loss of the own boxes alone plus (1 - lam) times the loss of the partner's alone
    own_w = torch.cat([batch["weights"], torch.zeros_like(batch["weights"])], 1)
    other_w = torch.cat([torch.zeros_like(batch["weights"]), batch["weights"]], 1)
    with torch.no_grad():
        expected = sum(
            lam[i] * module.detector.loss(raw, {**out, "weights": _only(own_w, i)}, size)["loss_box"]
            + (1 - lam[i]) * module.detector.loss(raw, {**out, "weights": _only(other_w, i)}, size)["loss_box"]
            for i in range(2)
        )
    assert expected > 0
    torch.testing.assert_close(losses["loss_box"].detach(), expected.float(), rtol=1e-4, atol=1e-5)
    losses["loss"].backward()
    grads = [p.grad for p in module.detector.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(losses["loss"])

    # the next batch gets the next draw
    out2 = module.on_after_batch_transfer(batch, 0)
    assert out2["images"].shape[-2:] == module.multiscale.size_at(1)


def _only(weights, i):
    """``weights`` (B, M) with every image but ``i`` zeroed (their boxes keep their matches)."""
    weights = weights.clone()
    weights[torch.arange(len(weights)) != i] = 0
    return weights


def test_defaults_leave_the_batch_path_as_it_was():
    from common import build_ours, random_batch

    module = build_ours(["model=ssd300"], num_classes=3)
    assert module.mixup is None and module.multiscale is None
    module.train()
    batch = random_batch(2, 300, 3, 4, "cpu")
    out = module.on_after_batch_transfer(batch, 0)
    torch.testing.assert_close(out["images"], (batch["images"].float() - module.mean) / module.std)
    assert out["boxes"] is batch["boxes"] and out["weights"] is batch["weights"]


def test_too_small_a_multiscale_size_is_refused_when_the_model_is_built():
    from common import build_ours

    # the module's ValueError, as Hydra's instantiate passes it on (wrapped, the message kept)
    with pytest.raises(InstantiationException,
                       match=r"ValueError\(.multiscale size \(256, 256\) is too small for this detector") as raised:
        build_ours(["model=ssd300", "multiscale.sizes=[256,320]"], num_classes=3)
    assert isinstance(raised.value.__cause__, ValueError)
    build_ours(["model=ssd300", "multiscale.sizes=[257]"], num_classes=3)  # the smallest SSD300 takes
    # every size is checked, not the smallest by area: (600, 256) is larger than 300 x 300 but too narrow
    with pytest.raises(InstantiationException,
                       match=r"ValueError\(.multiscale size \(600, 256\) is too small") as raised:
        build_ours(["model=ssd300", "multiscale.sizes=[300,[600,256]]"], num_classes=3)
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(InstantiationException,
                       match=r"ValueError\(.input_size \(24, 24\) is too small: "
                             r"the backbone needs sides of at least 32") as raised:
        build_ours(["model=ssd300", "input_size=[24,24]", "backbone.out_strides=[8,16,32]"], num_classes=3)
    assert isinstance(raised.value.__cause__, ValueError)


def test_a_size_the_head_cannot_take_is_refused_with_the_part_that_needs_it():
    from common import build_ours

    # Faster R-CNN's head clips proposals to its stride-16 map's extent: it declares multiples of 16 itself,
    # and Detector combines that with the backbone's own divisor (least common multiple)
    small = ["model=faster_rcnn", "head.fc_width=16", "head.rpn_channels=16"]
    with pytest.raises(InstantiationException,
                       match=r"input_size \(376, 384\) is not a multiple of 16 \(the head FasterRCNNHead") as raised:
        build_ours([*small, "input_size=[376,384]"], num_classes=3)
    assert isinstance(raised.value.__cause__, ValueError)
    module = build_ours([*small, "input_size=[384,384]", "backbone.size_divisor=24"], num_classes=3)
    assert module.detector.size_requirements()["head"] == (1, 16) and module.detector.size_divisor == 48
    # a size that meets one part's divisor but not the other's names both, and the multiple they make
    with pytest.raises(InstantiationException, match=r"multiscale size \(400, 400\) is not a multiple of 48 "
                       r"\(backbone.size_divisor 24; the head FasterRCNNHead takes multiples of 16\)") as raised:
        build_ours([*small, "input_size=[480,480]", "backbone.size_divisor=24", "multiscale.sizes=[400,480]"],
                   num_classes=3)
    assert isinstance(raised.value.__cause__, ValueError)


# ---- under a Lightning trainer: exact resume of the draws ------------------------------------------
class RecordingDetector(torch.nn.Module):
    """A one-conv stand-in for a detector that records what each training batch looks like."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.head = torch.nn.Module()
        self.head.num_classes = 6
        self.seen: list[tuple] = []

    def forward(self, images, targets=None):
        return self.conv(images), images

    def loss(self, raw, batch, image_size):
        feats, images = raw
        w = batch["weights"]
        self.seen.append((tuple(images.shape[-2:]), tuple(image_size), round(float(images.double().sum()), 3),
                          round(float(w.sum()), 5), int(batch["mask"].sum()), round(float(batch["boxes"].sum()), 3)))
        loss = (feats.mean() - w.sum() / 10) ** 2
        return {"loss": loss}

    def predict(self, raw, image_size):
        self.seen.append(("eval", tuple(raw[1].shape[-2:])))
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in range(len(raw[1]))]


def fit(tmp_path, name, epochs_to_run=None, ckpt_path=None, train_input_size=(80, 80)):
    import functools

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from detectors.data.datamodule import DetectionDataModule
    from detectors.data.formats.shapes import ShapesSource
    from detectors.module import DetectionModule
    from stop_callback import StopAfterEpochs

    L.seed_everything(0)
    module = DetectionModule(
        RecordingDetector(), functools.partial(torch.optim.SGD, lr=0.01), input_size=(64, 64), channels_last=False,
        mixup={"prob": 0.5, "alpha": 1.5, "seed": 1}, multiscale={"sizes": [48, 64, 80], "every_n_batches": 1, "seed": 1},
    )
    source = ShapesSource({"train": 8, "val": 2}, image_size=(64, 64), seed=0)
    data = DetectionDataModule(source, input_size=(64, 64), train_input_size=train_input_size,
                               augment={"preset": "ssd"}, batch_size=2, num_workers=0, seed=0)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / name, save_last=True)]
    if epochs_to_run:
        callbacks.append(StopAfterEpochs(epochs_to_run))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=callbacks, deterministic=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.detector.seen


def test_resumed_run_draws_the_same_mixup_and_sizes(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    full = fit(tmp_path, "full")
    fit(tmp_path, "first", epochs_to_run=1)
    resumed = fit(tmp_path, "resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    train = [s for s in full if s[0] != "eval"]
    assert len(train) == 8  # 4 batches an epoch
    assert resumed == full[len(full) // 2:]  # the second epoch, batch for batch
    assert {s[0] for s in train} == {(48, 48), (64, 64), (80, 80)}  # the sizes are drawn and used...
    assert all(s[0] == s[1] for s in train)  # ...and the loss gets the size the network saw
    assert any(s[4] > 0 and s[3] != s[4] for s in train)  # some batch mixed (weights below 1)
    assert all(s == ("eval", (64, 64)) for s in full if s[0] == "eval")  # validation at the input size


def test_a_run_whose_loader_delivers_less_than_the_largest_size_stops_at_its_first_batch(tmp_path):
    """Training batches at input_size 64 under sizes up to 80: the first training batch is refused,
    whatever size it draws (an 80 would be an upsampled 64), before any step runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with pytest.raises(ValueError, match=r"training batch of 64x64 is smaller than the largest multiscale size 80x80"):
        fit(tmp_path, "small", train_input_size=(64, 64))
