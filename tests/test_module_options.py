"""DetectionModule options: the warm-up schedule's factors, learning the run's length late, and
torch.compile of the network."""

import math
import sys
from pathlib import Path

import pytest
import torch

from detectors.schedules import StepPlan, WarmupSchedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("decay", ["cosine", "multistep", "constant"])
def test_warmup_then_decay_by_hand(decay):
    schedule = WarmupSchedule(decay, warmup_epochs=2, warmup_factor=0.1, min_lr_ratio=0.01, milestones=[0.5, 0.75])
    total, per_epoch = 110, 5  # warm-up: 10 steps, then 100
    f = [schedule.factor(s, total, per_epoch) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55) and f[10] == pytest.approx(1.0)
    if decay == "cosine":
        assert f[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half way: the mean of 1 and 0.01
        assert f[109] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    elif decay == "multistep":
        assert f[59] == 1.0 and f[60] == pytest.approx(0.1) and f[84] == pytest.approx(0.1)
        assert f[85] == pytest.approx(0.01)
    else:
        assert set(f[10:]) == {1.0}


def test_warmup_lasts_at_least_min_warmup_steps_but_at_most_a_quarter_of_the_run():
    """BCCD's 6 steps an epoch: 1 epoch of warm-up alone would be 6 steps."""
    schedule = WarmupSchedule("constant", warmup_epochs=1, min_warmup_steps=100, warmup_factor=0.0)
    f = [schedule.factor(s, 1800, 6) for s in range(200)]
    assert f[50] == pytest.approx(0.5) and f[99] == pytest.approx(0.99) and f[100] == 1.0
    # a 40-step run warms up over 10 steps (a quarter), not over all 40
    f = [schedule.factor(s, 40, 1) for s in range(40)]
    assert f[5] == pytest.approx(0.5) and f[10] == 1.0
    # epochs longer than the floor keep their own warm-up; warmup_epochs=0 stays none
    assert WarmupSchedule("constant", warmup_epochs=2, min_warmup_steps=100, warmup_factor=0.0).factor(150, 5000, 100) == 0.75
    assert WarmupSchedule("constant", warmup_epochs=0, min_warmup_steps=100, warmup_factor=0.0).factor(0, 5000, 100) == 1.0


def test_the_schedule_reads_the_run_length_when_it_is_known():
    """The LambdaLR is made before the trainer knows how many batches an epoch has (see StepPlan):
    until then it holds the warm-up's start, and afterwards it follows the plan."""
    schedule, plan = WarmupSchedule("cosine", warmup_epochs=1, warmup_factor=0.01), StepPlan()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.build(opt, plan)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    plan.total_steps, plan.steps_per_epoch = 20, 4
    for _ in range(4):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # the end of the 4-step warm-up


GRAPHS: list = []  # what the recording backend was handed


def recording_backend(gm, example_inputs):
    """A torch.compile backend that keeps the FX graphs Dynamo captured and runs them as they are."""
    GRAPHS.append(gm)
    return gm.forward


def test_compile_option_compiles_the_network_in_place():
    """``compile`` hands the arguments to torch.compile: the network's forward is captured by Dynamo
    (every conv of it reaches the backend named in the config), computes what the plain network
    computes (outputs, loss, gradients) and leaves the parameter names alone (checkpoints load
    both ways). A backend that runs the captured graphs as they are keeps this test quick; the
    inductor's figures are in BENCHMARKS.md."""
    import torch._dynamo
    from common import build_ours, random_batch
    from torch._dynamo.utils import counters

    if "detectors_test_recording" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(recording_backend, name="detectors_test_recording")
    torch._dynamo.reset()
    GRAPHS.clear()
    torch.manual_seed(0)
    size = 264
    plain = build_ours(["model=ssd300", f"input_size=[{size},{size}]"], num_classes=3)
    compiled = build_ours(["model=ssd300", f"input_size=[{size},{size}]",
                           "model.compile={backend: detectors_test_recording}"], num_classes=3)
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert not [k for k in compiled.state_dict() if "_orig_mod" in k]
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())  # and back: a compiled run's checkpoint loads uncompiled
    assert compiled.detector._compiled_call_impl is not None and plain.detector._compiled_call_impl is None

    batch = plain.on_after_batch_transfer(random_batch(2, size, 3, 4, "cpu"), 0)
    counters.clear()
    raw_plain = plain.detector(batch["images"])
    assert not GRAPHS and not counters["stats"]["unique_graphs"]  # the plain one is not compiled
    raw_compiled = compiled.detector(batch["images"])
    # Dynamo captured the forward and handed it to the configured backend: all of the network's convs
    assert counters["stats"]["unique_graphs"] >= 1 and len(GRAPHS) == counters["stats"]["unique_graphs"]
    convs = [n for g in GRAPHS for n in g.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in compiled.detector.modules())
    torch.testing.assert_close(raw_compiled.cls_logits, raw_plain.cls_logits)
    torch.testing.assert_close(raw_compiled.box_offsets, raw_plain.box_offsets)

    losses = [m.detector.loss(raw, batch, (size, size))["loss"] for m, raw in ((plain, raw_plain), (compiled, raw_compiled))]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.detector.named_parameters(), compiled.detector.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    captured = len(GRAPHS)
    compiled.detector(batch["images"])
    assert len(GRAPHS) == captured  # the same input shape reuses the captured graphs


def test_csv_logger_continues_a_resumed_runs_metrics(tmp_path):
    """The resumed part appends to the run's metrics.csv; rows the killed run wrote from the resumed
    step on are dropped (they are logged again), and a new column keeps the old rows."""
    import csv

    from detectors.loggers import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for step in range(10):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = CSVLogger(tmp_path, name="csv", version="", purge_step=6)
    resumed.log_metrics({"train/loss": 60.0, "val/map_50": 0.5}, step=6)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [float(r["train/loss"]) for r in rows] == [0, 1, 2, 3, 4, 5, 60]
    assert rows[0]["val/map_50"] == "" and rows[-1]["val/map_50"] == "0.5"


def test_per_step_terms_are_logged_only_at_the_steps_the_loggers_write_and_drop_counts_once_an_epoch(tmp_path):
    """``self.log`` costs host time at every call: the module logs its per-step loss terms only where
    Lightning writes them (every ``log_every_n_steps``, plus the first and an epoch's last step, which the
    progress bar reads), keeps every step's terms in ``last_loss_terms`` for the divergence guard, and
    logs the epoch's drop counts once, summed over all its steps."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from test_model_matrix import batch_with_an_empty_image, build

    module = build("ssdlite", "mobilenet_v1", "backbone.width_mult=0.25")
    size = (264, 296)
    batches = []
    for i in range(7):
        b = batch_with_an_empty_image(torch.Generator().manual_seed(i), size=size)
        b["num_skipped"] = torch.tensor(i)  # 0 + 1 + ... + 6 = 21 in the epoch
        b["num_dropped_boxes"] = torch.tensor(1)
        batches.append(b)
    calls = []
    original = type(module).log

    def spy(self, name, value, *args, **kwargs):
        calls.append((self.trainer.global_step, name))
        return original(self, name, value, *args, **kwargs)

    type(module).log = spy
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, log_every_n_steps=3, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            logger=CSVLogger(tmp_path, name="csv", version=""))
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    finally:
        type(module).log = original
    loss_steps = [step for step, name in calls if name == "train/loss"]
    # Lightning writes at steps 2 and 5 (every 3rd batch); step 0 for the bar's first read, step 6 the epoch's last
    assert loss_steps == [0, 2, 5, 6]
    assert set(module.last_loss_terms) >= {"train/loss", "train/loss_box", "train/loss_cls"}
    assert [name for _, name in calls].count("train/skipped_samples") == 1
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [2, 5]
    epoch_rows = [r for r in rows if r.get("train/skipped_samples")]
    assert len(epoch_rows) == 1 and float(epoch_rows[0]["train/skipped_samples"]) == 21
    assert float(epoch_rows[0]["train/dropped_boxes"]) == 7
