"""Callbacks: DivergenceGuard (a NaN loss is caught at its step, named, skipped or stops the run),
StepTimeBreakdown (each stage of a step gets its own time) and the progress bar's loss (read to the
host every few steps, not every step)."""

import copy

import lightning as L
import pytest
import torch
from torch import nn

from detectors.callbacks.divergence import DivergenceGuard, NonFiniteLossError


class Toy(L.LightningModule):
    """Loss turns NaN at step ``bad_step`` (every step if None), or with ``bad_grad`` one gradient does;
    records the weights before every step."""

    def __init__(self, bad_step: int | None, bad_grad: bool = False, optimizer: str = "sgd", conv: bool = False):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        # a channels-last conv weight (strides of another order) and a transposed view-like layout
        self.conv = nn.Conv2d(1, 3, 3).to(memory_format=torch.channels_last) if conv else None
        self.bad_step = bad_step
        self.bad_grad = bad_grad
        self.optimizer = optimizer
        self.history = []
        self.losses = []

    def _bad(self) -> bool:
        return self.bad_step is None or self.global_step == self.bad_step

    def training_step(self, batch, batch_idx):
        self.history.append(self.layer.weight.detach().clone())
        loss = self.layer(batch["x"]).pow(2).mean()
        if self.conv is not None:
            loss = loss + self.conv(batch["x"].view(1, 1, 2, 2).repeat(1, 1, 3, 3)).pow(2).mean()
        loss = loss * float("nan") if self._bad() and not self.bad_grad else loss
        self.log("train/loss", loss)
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self):
        if self.bad_grad and self._bad():
            self.layer.bias.grad[0] = float("nan")  # the loss stays finite, one gradient does not

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        data = [{"x": torch.ones(2, 2) * (i + 1), "image_ids": torch.tensor([10 * i, 10 * i + 1])} for i in range(4)]
        return torch.utils.data.DataLoader(data, batch_size=None)


def fit(module, guard, *more, accelerator="cpu"):
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, *more])
    trainer.fit(module)
    return trainer


class StateRecorder(L.Callback):
    """Weights and optimizer state as the optimizer is about to update them (after the guard's hook),
    and once more at the end of training."""

    def __init__(self):
        self.records = []

    def _record(self, pl_module, optimizer):
        weights = [p.detach().clone() for p in pl_module.parameters()]
        self.records.append((weights, copy.deepcopy(optimizer.state_dict()["state"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._record(pl_module, optimizer)

    def on_train_end(self, trainer, pl_module):
        self._record(pl_module, trainer.optimizers[0])


def same(a, b) -> bool:
    (wa, sa), (wb, sb) = a, b
    if not all(torch.equal(x, y) for x, y in zip(wa, wb)) or sa.keys() != sb.keys():
        return False
    return all(sa[i].keys() == sb[i].keys() and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
                                                     for k in sa[i]) for i in sa)


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_skip_leaves_the_weights_and_goes_on(caplog, deferred):
    module = Toy(bad_step=1)
    guard = DivergenceGuard("skip", deferred=deferred)
    trainer = fit(module, guard)
    assert trainer.global_step == 4 and guard.skipped == 1
    torch.testing.assert_close(module.history[2], module.history[1])  # the NaN step changed nothing
    assert not torch.equal(module.history[1], module.history[0])
    assert torch.isfinite(module.layer.weight).all()
    assert "at epoch 0 step 1 (last logged {'train/loss': nan}); image ids of the batch: [10, 11]" in caplog.text


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("bad_step", [0, 2, 3])  # the first step (no optimizer state yet), a middle one, the last
def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were(caplog, deferred, optimizer, bad_step):
    module, recorder = Toy(bad_step=bad_step, bad_grad=True, optimizer=optimizer), StateRecorder()
    guard = DivergenceGuard("skip", deferred=deferred)
    fit(module, guard, recorder)
    assert guard.skipped == 1
    assert f"at epoch 0 step {bad_step} " in caplog.text
    assert f"image ids of the batch: [{10 * bad_step}, {10 * bad_step + 1}]" in caplog.text
    records = recorder.records  # before steps 0..3, then after training
    assert len(records) == 5
    # momentum buffers, Adam moments and step counts included (and none made by a skipped first step)
    assert same(records[bad_step], records[bad_step + 1])
    assert all(not same(records[i], records[i + 1]) for i in range(4) if i != bad_step)  # the others update


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_deferred_good_steps_equal_unguarded_steps_bit_for_bit(optimizer):
    """The snapshot and the select over flat buffers leave every finite update exactly as the optimizer
    made it, channels-last weights included; a bad step in a model with such weights is reverted too."""
    runs = []
    for guard in (None, DivergenceGuard("skip", deferred=True)):
        torch.manual_seed(0)
        module, recorder = Toy(bad_step=-1, optimizer=optimizer, conv=True), StateRecorder()
        fit(module, *([guard] if guard else []), recorder)
        runs.append(recorder.records)
    assert all(same(a, b) for a, b in zip(*runs)) and len(runs[0]) == 5

    torch.manual_seed(0)
    module, recorder = Toy(bad_step=2, bad_grad=True, optimizer=optimizer, conv=True), StateRecorder()
    guard = DivergenceGuard("skip", deferred=True)
    fit(module, guard, recorder)
    assert guard.skipped == 1 and same(recorder.records[2], recorder.records[3])
    assert module.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_checkpoint_written_right_after_a_skipped_step_holds_the_state_before_it(tmp_path):
    """Deferred: the verdict is read before a checkpoint packs the optimizer state, so the first
    step's momentum buffers, made by a skipped step, are not saved (nor its update)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = Toy(bad_step=0, bad_grad=True)
    initial = module.layer.bias.detach().clone()
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[DivergenceGuard("skip", deferred=True), every_step])
    trainer.fit(module)
    after_bad = torch.load(tmp_path / "step=1.ckpt", weights_only=True)
    assert after_bad["optimizer_states"][0]["state"] == {}
    torch.testing.assert_close(after_bad["state_dict"]["layer.bias"], initial, rtol=0, atol=0)
    assert torch.load(tmp_path / "step=2.ckpt", weights_only=True)["optimizer_states"][0]["state"] != {}


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_stop_raises_with_the_image_ids(deferred):
    with pytest.raises(NonFiniteLossError, match=r"epoch 0 step 2 .*image ids of the batch: \[20, 21\]"):
        fit(Toy(bad_step=2), DivergenceGuard("stop", deferred=deferred))


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_stop_on_a_bad_gradient_names_its_step(deferred):
    module = Toy(bad_step=1, bad_grad=True)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*image ids of the batch: \[10, 11\]"):
        fit(module, DivergenceGuard("stop", deferred=deferred))
    assert torch.isfinite(module.layer.bias).all()  # the bad update was not kept


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_too_many_skips_stop(deferred):
    module = Toy(bad_step=None)
    with pytest.raises(NonFiniteLossError, match="1 steps skipped already"):
        fit(module, DivergenceGuard("skip", max_skips=1, deferred=deferred))


READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy")


def test_deferred_guard_reads_no_tensor_in_its_step_hooks_but_the_last_steps_flag(monkeypatch):
    """The structure that makes the GPU path sync-free: in a run that does not diverge, the guard's
    per-step hooks never read a tensor to the host, except, in ``_read_flag``, the previous step's
    flag (on a GPU its pinned copy behind an event the GPU passed a step ago)."""
    guard = DivergenceGuard("skip", deferred=True)
    where = {"hook": False, "read": False}
    bad_reads, flag_reads = [], []

    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if where["hook"] and not where["read"]:
                bad_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def wrap(method, flag):
        def wrapped(*args, **kwargs):
            where[flag] = True
            try:
                return method(*args, **kwargs)
            finally:
                where[flag] = False
        return wrapped

    for name in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "_after_step"):
        monkeypatch.setattr(guard, name, wrap(getattr(guard, name), "hook"))
    read_flag = guard._read_flag

    def counted_read(pending):
        flag_reads.append((pending.step, trainer_ref[0].global_step))
        return read_flag(pending)

    monkeypatch.setattr(guard, "_read_flag", wrap(counted_read, "read"))
    trainer_ref = []

    class Ref(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer_ref.append(trainer)

    fit(Toy(bad_step=-1), guard, Ref())
    assert bad_reads == []
    # each step's flag read once, a step late (the last one at the end of the epoch)
    assert flag_reads == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_deferred_guard_on_the_gpu_never_syncs_and_still_skips(monkeypatch, optimizer):
    guard, recorder = DivergenceGuard("skip"), StateRecorder()  # deferred: the default on CUDA

    def no_sync(method):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return wrapped

    for name in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "_after_step"):
        monkeypatch.setattr(guard, name, no_sync(getattr(guard, name)))
    module = Toy(bad_step=2, bad_grad=True, optimizer=optimizer)
    fit(module, guard, recorder, accelerator="gpu")
    assert guard.skipped == 1
    assert same(recorder.records[2], recorder.records[3])  # AdamW's step counts live on the CPU: put back too
    assert not same(recorder.records[3], recorder.records[4])


class SlowBackward(torch.autograd.Function):
    """The identity, whose backward takes 20 ms."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import time

        time.sleep(0.02)
        return grad


class SlowBatches(torch.utils.data.Dataset):
    """Toy's batches, each taking 20 ms to load."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import time

        time.sleep(0.02)
        return {"x": torch.ones(2, 2) * (i + 1)}


class Staged(Toy):
    """A step whose data wait, forward, assign, loss and backward take known times."""

    def training_step(self, batch, batch_idx):
        import time

        from detectors.timing import stage

        time.sleep(0.02)
        with stage("assign"):
            time.sleep(0.03)
        with stage("loss"):
            time.sleep(0.01)
            return SlowBackward.apply(self.layer(batch["x"]).pow(2).mean())

    def train_dataloader(self):
        return torch.utils.data.DataLoader(SlowBatches(), batch_size=None)


def test_step_time_breakdown_attributes_each_stage(caplog):
    import logging
    import time

    from detectors.callbacks.step_time import StepTimeBreakdown

    class Clock(L.Callback):
        """When each step starts and ends, seen by a callback beside the timer."""

        def __init__(self):
            self.starts, self.ends = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    timer, clock = StepTimeBreakdown(every_n_steps=1000, skip_first=0), Clock()
    with caplog.at_level(logging.INFO):
        fit(Staged(bad_step=-1), timer, clock)
    means = timer.means_ms()
    assert set(means) == {"data_wait", "forward", "assign", "loss", "backward", "optimizer"}
    assert 28 <= means["assign"] < 60 and 8 <= means["loss"] < 40 and 18 <= means["forward"] < 60
    assert 18 <= means["backward"] < 60
    assert 0.75 * 18 <= means["data_wait"] < 60  # the first step has no wait (its batch came before the timer)
    # the stages partition the time: over the 4 steps they add up to the wall time from the first step's
    # start to the last one's end (each step's data wait is the gap since the previous one ended), no
    # interval counted twice or lost (the two callbacks read the clock a few microseconds apart)
    assert len(clock.ends) == 4
    assert 4 * sum(means.values()) == pytest.approx(1000 * (clock.ends[-1] - clock.starts[0]), abs=3)


def test_progress_bar_reads_the_loss_every_n_steps_only():
    from detectors.callbacks.progress import RichProgressBar

    bar = RichProgressBar(every_n_steps=2)
    shown = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown.append(bar.get_metrics(trainer, pl_module).get("train/loss"))

    module = Toy(bad_step=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar, Look()])
    trainer.fit(module)
    losses = module.losses
    assert len(set(losses)) == 4  # every step's loss differs: the shown one says which step it is
    # read after the first step, then after steps 2 and 4; in between the last read value stays
    assert shown == pytest.approx([losses[0], losses[1], losses[1], losses[3]])
