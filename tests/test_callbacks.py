"""Callbacks: DivergenceGuard (a NaN loss is caught at its step, named, skipped or stops the run)
and StepTimeBreakdown (each stage of a step gets its own time)."""

import lightning as L
import pytest
import torch
from torch import nn

from detectors.callbacks.divergence import DivergenceGuard, NonFiniteLossError


class Toy(L.LightningModule):
    """Loss turns NaN at step ``bad_step`` (every step if None); records the weights before every step."""

    def __init__(self, bad_step: int | None):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.bad_step = bad_step
        self.history = []

    def training_step(self, batch, batch_idx):
        self.history.append(self.layer.weight.detach().clone())
        loss = self.layer(batch["x"]).pow(2).mean()
        bad = self.bad_step is None or self.global_step == self.bad_step
        return loss * float("nan") if bad else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        data = [{"x": torch.ones(2, 2) * (i + 1), "image_ids": torch.tensor([10 * i, 10 * i + 1])} for i in range(4)]
        return torch.utils.data.DataLoader(data, batch_size=None)


def fit(module, guard):
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(module)
    return trainer


def test_skip_leaves_the_weights_and_goes_on(caplog):
    module = Toy(bad_step=1)
    guard = DivergenceGuard("skip")
    trainer = fit(module, guard)
    assert trainer.global_step == 4 and guard.skipped == 1
    torch.testing.assert_close(module.history[2], module.history[1])  # the NaN step changed nothing
    assert not torch.equal(module.history[1], module.history[0])
    assert torch.isfinite(module.layer.weight).all()
    assert "image ids of the batch: [10, 11]" in caplog.text


def test_stop_raises_with_the_image_ids():
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*image ids of the batch: \[20, 21\]"):
        fit(Toy(bad_step=2), DivergenceGuard("stop"))


def test_too_many_skips_stop():
    module = Toy(bad_step=None)
    with pytest.raises(NonFiniteLossError, match="1 steps skipped already"):
        fit(module, DivergenceGuard("skip", max_skips=1))


class Staged(Toy):
    """A step whose forward/assign/loss take known times."""

    def training_step(self, batch, batch_idx):
        import time

        from detectors.timing import stage

        time.sleep(0.02)
        with stage("assign"):
            time.sleep(0.03)
        with stage("loss"):
            time.sleep(0.01)
            return self.layer(batch["x"]).pow(2).mean()


def test_step_time_breakdown_attributes_each_stage(caplog):
    import logging

    from detectors.callbacks.step_time import StepTimeBreakdown

    timer = StepTimeBreakdown(every_n_steps=1000, skip_first=0)
    with caplog.at_level(logging.INFO):
        fit(Staged(bad_step=-1), timer)
    means = timer.means_ms()
    assert set(means) == {"data_wait", "forward", "assign", "loss", "backward", "optimizer"}
    assert 28 <= means["assign"] < 60 and 8 <= means["loss"] < 40 and 18 <= means["forward"] < 60
    assert all(v >= 0 for v in means.values())
