"""Multi-scale training never upsamples: the training loader delivers the largest multi-scale size
(``data.train_input_size``, derived in the configs), ``MultiScale`` only shrinks it to the drawn size
(antialiased, boxes and frames with it) and refuses a batch smaller than its sizes; evaluation loaders
stay at ``input_size``. References: a loader built for the large size directly, PIL's resize, the
frames of a plain resize computed from the file sizes."""

import os
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import detectors  # noqa: F401  (resolvers)
from detectors.boxes import stretch_frames
from detectors.data.batch_ops import MultiScale
from detectors.data.datamodule import DetectionDataModule
from detectors.data.transforms import letterbox_frame
from tests.test_train_e2e import assert_fast_dev_run_trained_and_validated

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# data.augment: the model's augmentation on a CPU too (the built-in shapes train unaugmented there by default)
SMALL = ["data.source.sizes={train: 4, val: 2, test: 2}", "data.batch_size=2", "data.eval_batch_size=2",
         "data.num_workers=0", "data.augment=${augment}"]


def compose_data(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", *SMALL, *overrides])
    return cfg


def first_batch(loader):
    return next(iter(loader))


def step_drawing(ms: MultiScale, size) -> int:
    """The first batch number at which ``ms`` draws ``size``."""
    return next(step for step in range(10_000) if ms.size_at(step) == tuple(size))


def pil_shrink(images: torch.Tensor, size) -> np.ndarray:
    """(B, 3, H, W) float -> (B, 3, H', W') with PIL's bilinear resize, antialiased when shrinking."""
    h, w = size
    return np.stack([np.stack([np.asarray(Image.fromarray(c.numpy()).resize((w, h), Image.BILINEAR)) for c in im])
                     for im in images])


@pytest.fixture(scope="module", params=["ssd", "yolo"])
def loaders(request):
    """The shapes data of a run with input_size 416 and multiscale.sizes [320, 416, 608], and the same
    source's training loader built for 608 directly (no multi-scale) as the reference."""
    augment = request.param
    cfg = compose_data([f"augment={augment}", "input_size=[416,416]", "multiscale.sizes=[320,416,608]"])
    data = hydra.utils.instantiate(cfg.data)
    augment_args = OmegaConf.to_container(cfg.augment)
    reference = DetectionDataModule(data.source, input_size=(608, 608), augment=augment_args, batch_size=2,
                                    num_workers=0, seed=cfg.seed)
    return cfg, data, reference


def test_the_training_loader_delivers_the_largest_size_and_evaluation_the_input_size(loaders):
    cfg, data, reference = loaders
    assert list(cfg.data.train_input_size) == [608, 608]  # derived by the configs, not written twice
    batch = first_batch(data.train_dataloader())
    assert batch["images"].shape == (2, 3, 608, 608)
    # resized once from the file to 608, exactly as a loader made for 608 does (same seeded augmentation),
    # not an enlarged 416 image
    expected = first_batch(reference.train_dataloader())
    for key in ("images", "boxes", "labels", "frames", "orig_sizes"):
        assert torch.equal(batch[key], expected[key]), key
    torch.testing.assert_close(batch["frames"], stretch_frames(batch["orig_sizes"], (608, 608)))

    val = first_batch(data.val_dataloader())
    assert val["images"].shape == (2, 3, 416, 416)
    if cfg.augment.eval_resize == "letterbox":
        frames = [letterbox_frame(o.tolist(), (416, 416)) for o in val["orig_sizes"]]
    else:
        frames = stretch_frames(val["orig_sizes"], (416, 416))
    torch.testing.assert_close(val["frames"], torch.as_tensor(frames, dtype=torch.float32))


def test_a_smaller_draw_is_the_antialiased_downscale_and_the_largest_is_the_batch_itself(loaders):
    cfg, data, _ = loaders
    batch = first_batch(data.train_dataloader())
    batch = {**batch, "images": batch["images"].float()}
    ms = MultiScale(cfg.multiscale.sizes, every_n_batches=1, seed=cfg.seed)

    # pixel values 0..255: PIL and torch agree to 1e-2 (float rounding of the filter weights)
    small = ms(batch, step_drawing(ms, (320, 320)))
    assert small["images"].shape == (2, 3, 320, 320)
    np.testing.assert_allclose(small["images"].numpy(), pil_shrink(batch["images"], (320, 320)), atol=1e-2)
    # boxes and frames scale by 320/608 (float64 reference), the file sizes stay
    expected = batch["boxes"].double() * (320 / 608)
    torch.testing.assert_close(small["boxes"].double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(small["frames"], stretch_frames(batch["orig_sizes"], (320, 320)))
    assert torch.equal(small["orig_sizes"], batch["orig_sizes"]) and torch.equal(small["labels"], batch["labels"])

    largest = ms(batch, step_drawing(ms, (608, 608)))
    assert largest is batch  # used as delivered: not resampled


def test_non_square_sizes_deliver_the_largest_side_each_and_shrink_per_side():
    """[H, W] sizes: the loader delivers max H x max W, (416, 608) here, and a (320, 480) draw scales
    y by 320/416 and x by 480/608."""
    cfg = compose_data(["input_size=[416,416]", "multiscale.sizes=[[320,480],[416,608]]"])
    assert list(cfg.data.train_input_size) == [416, 608]
    data = hydra.utils.instantiate(cfg.data)
    batch = first_batch(data.train_dataloader())
    assert batch["images"].shape == (2, 3, 416, 608)
    assert first_batch(data.val_dataloader())["images"].shape == (2, 3, 416, 416)
    batch = {**batch, "images": batch["images"].float()}
    ms = MultiScale(cfg.multiscale.sizes, every_n_batches=1)
    out = ms(batch, step_drawing(ms, (320, 480)))
    assert out["images"].shape == (2, 3, 320, 480)
    np.testing.assert_allclose(out["images"].numpy(), pil_shrink(batch["images"], (320, 480)), atol=1e-2)
    scale = torch.tensor([480 / 608, 320 / 416, 480 / 608, 320 / 416], dtype=torch.float64)
    torch.testing.assert_close(out["boxes"].double(), batch["boxes"].double() * scale, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["frames"], stretch_frames(batch["orig_sizes"], (320, 480)))
    # input_size larger than every multi-scale size on one side counts too; no multi-scale: input_size
    wide = compose_data(["input_size=[640,320]", "multiscale.sizes=[[320,480]]"])
    assert list(wide.data.train_input_size) == [640, 480]
    assert list(compose_data(["input_size=[416,416]"]).data.train_input_size) == [416, 416]


def test_multiscale_refuses_a_batch_smaller_than_its_sizes():
    ms = MultiScale([320, 416, 608], every_n_batches=1)
    batch = {"images": torch.zeros(1, 3, 416, 416), "boxes": torch.zeros(1, 0, 4)}
    for size in (608, 320):  # whatever the draw: a 608 draw would upsample, and a 320 one only delays that
        with pytest.raises(ValueError, match=r"416x416 is smaller than the largest multiscale size 608x608"):
            ms(batch, step_drawing(ms, (size, size)))
    # per side: (480, 480) covers (320, 480) and (480, 320); (480, 400) does not
    ms = MultiScale([[320, 480], [480, 320]], every_n_batches=1)
    assert ms.largest == (480, 480)
    assert ms({"images": torch.zeros(1, 3, 480, 480), "boxes": torch.zeros(1, 0, 4)}, 0)["images"].shape[0] == 1
    with pytest.raises(ValueError, match="480x400 is smaller"):
        ms({"images": torch.zeros(1, 3, 480, 400), "boxes": torch.zeros(1, 0, 4)}, 0)


def test_the_module_shrinks_the_delivered_batch_and_passes_the_largest_through():
    """Through ``on_after_batch_transfer`` (normalise, then multi-scale): the network gets the
    normalised delivered batch at a 608 draw and its downscale at a 320 draw."""
    import functools

    from detectors.module import DetectionModule

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)
            self.head = torch.nn.Module()
            self.head.num_classes = 6

        def forward(self, images, targets=None):
            return self.conv(images)

    module = DetectionModule(Tiny(), functools.partial(torch.optim.SGD, lr=0.1), input_size=(416, 416),
                             channels_last=False, multiscale={"sizes": [320, 416, 608], "every_n_batches": 1})
    module.train()
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 256, (2, 3, 608, 608), dtype=torch.uint8, generator=g),
             "boxes": torch.tensor([[[10.0, 20.0, 300.0, 608.0]], [[0.0, 0.0, 608.0, 100.0]]])}
    normalised = (batch["images"].float() - module.mean) / module.std
    for step in range(6):
        module._batches_seen = step
        out = module.on_after_batch_transfer(batch, 0)
        size = module.multiscale.size_at(step)
        if size == (608, 608):
            assert torch.equal(out["images"], normalised) and out["boxes"] is batch["boxes"]
        else:
            assert out["images"].shape[-2:] == size
            np.testing.assert_allclose(out["images"].numpy(), pil_shrink(normalised, size), atol=2e-3)
    assert {module.multiscale.size_at(s) for s in range(6)} >= {(608, 608), (320, 320)}  # both cases ran


def test_fast_dev_run_with_sizes_above_the_input_size(tmp_path, monkeypatch):
    """``train.py debug=fast_dev_run 'multiscale.sizes=[320,352]' multiscale.every_n_batches=1`` with
    SSD300 (input_size 300): the loader delivers 352, the network sees the drawn size."""
    from detectors.tasks.train import train

    seen = []
    call = MultiScale.__call__

    def recording(self, batch, step):
        out = call(self, batch, step)
        seen.append((tuple(batch["images"].shape[-2:]), tuple(out["images"].shape[-2:]), self.size_at(step)))
        return out

    monkeypatch.setattr(MultiScale, "__call__", recording)
    cfg = compose_data(["model=ssd300", "debug=fast_dev_run", "multiscale.sizes=[320,352]",
                        "multiscale.every_n_batches=1", f"paths.output_dir={tmp_path}", "data.source.sizes.val=2"])
    assert list(cfg.input_size) == [300, 300] and list(cfg.data.train_input_size) == [352, 352]
    train(cfg)
    assert len(seen) == 1 and seen[0][0] == (352, 352) and seen[0][1] == seen[0][2]


@pytest.mark.slow
def test_fast_dev_run_command_line(tmp_path):
    """The same run as a user types it (a subprocess, the shapes data cut small)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "train.py", "debug=fast_dev_run", "multiscale.sizes=[320,352]",
                           "multiscale.every_n_batches=1", f"hydra.run.dir={tmp_path}", *SMALL[:4]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert_fast_dev_run_trained_and_validated(proc.stdout + proc.stderr, tmp_path)


def test_generated_shapes_are_drawn_at_the_largest_size():
    """The built-in shapes are drawn at the training loader's size, so a 608 batch holds 608 px of detail,
    not an enlarged 416 image; without multi-scale they stay at input_size."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=.", "model=yolov2", "input_size=[416,416]"])
        plain = compose("train", overrides=["paths.output_dir=.", "model=ssd300"])
    assert list(cfg.data.source.image_size) == [608, 608] and list(cfg.data.input_size) == [416, 416]
    assert list(plain.data.source.image_size) == [300, 300]
