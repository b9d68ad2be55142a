"""Training to a time budget: durations, the steps that fit, and the callback on a fake clock (the plan, a pace
change that moves the end without a jump in the learning rate, resume, a too-short budget, DDP ranks agreeing)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from detectors.callbacks.time_budget import BudgetTooShort, TimeBudget
from detectors.time_budget import Pace, parse_duration, seconds_to_finish, steps_that_fit, validations_between


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("12m", 720), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 2 m ", 120), ("0.5m", 30)])
def test_durations_as_users_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["12", "", "m", "12x", "-5m", "0s", "12m5"])
def test_durations_without_a_unit_or_malformed_are_refused_in_words(text):
    with pytest.raises(ValueError, match="time_budget=.*(duration|positive)"):
        parse_duration(text)


def test_steps_that_fit_by_hand():
    """1 s a step, a 10 s validation every 20 steps and at the end: in 100 s, 60 steps (60 + 3 x 10 = 90; 61
    steps would add a fourth, final validation: 101 s)."""
    pace = Pace(step_s=1.0, validation_s=10.0, validate_every=20)
    assert validations_between(0, 60, 20) == 3 and validations_between(0, 61, 20) == 4
    assert seconds_to_finish(0, 60, pace) == 90 and seconds_to_finish(0, 61, pace) == 101
    assert steps_that_fit(100, 0, pace) == 60
    # from step 45 with 30 s left: 55 (10 steps, the validation at 60 not reached, a final one) costs 20 s;
    # 60 costs 25; 61 costs 36
    assert steps_that_fit(30, 45, pace) == 60
    assert steps_that_fit(100, 0, pace, cap=50) == 50  # max_epochs' length caps it
    assert steps_that_fit(5, 45, pace) == 45  # not one more step and a validation
    assert steps_that_fit(1e6, 0, Pace(0.5, 0.0, None)) == 2_000_000  # no validation: steps alone
    # a brute-force count agrees on random paces
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        step_s, val_s, left = (torch.rand(3, generator=generator) * torch.tensor([3.0, 30.0, 400.0])).tolist()
        every = int(torch.randint(1, 30, (1,), generator=generator))
        done = int(torch.randint(0, 50, (1,), generator=generator))
        pace = Pace(step_s + 0.01, val_s, every)
        best = max(n for n in range(done, done + 2000) if n == done or seconds_to_finish(done, n, pace) <= left)
        assert steps_that_fit(left, done, pace) == best


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(L.Callback):
    """Advances the fake clock as if every training step took ``step_s`` (``step_s_after`` from step
    ``change_at`` on) and every validation ``validation_s``. Before TimeBudget in the callback list, so the
    budget sees the step's time at its own hook."""

    def __init__(self, clock, step_s=1.0, validation_s=5.0, change_at=None, step_s_after=None):
        self.clock, self.step_s, self.validation_s = clock, step_s, validation_s
        self.change_at, self.step_s_after = change_at, step_s_after
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        late = self.change_at is not None and trainer.global_step > self.change_at
        self.clock.now += self.step_s_after if late else self.step_s
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.clock.now += self.validation_s


def small_module():
    from test_model_matrix import build

    return build("ssdlite", "mobilenet_v1", "backbone.width_mult=0.25", "optimizer=sgd", "scheduler=warmup_cosine",
                 "scheduler.warmup_epochs=0", "scheduler.min_warmup_steps=0")


def batches(count: int, seed: int) -> list[dict]:
    from test_model_matrix import batch_with_an_empty_image

    size = (96, 96)
    out = []
    for i in range(count):
        b = batch_with_an_empty_image(torch.Generator().manual_seed(seed + i), size=size)
        b["orig_sizes"] = torch.tensor([size, size])
        b["iscrowd"] = torch.zeros_like(b["difficult"])
        out.append(b)
    return out


def assert_at_the_schedules_end(trainer, module):
    """The plan ends at the last step, and the learning rate the schedule stepped to after it is its floor."""
    assert module.step_plan.total_steps == trainer.global_step
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(group["initial_lr"] * module.schedule.min_lr_ratio)


def fit(module, budget: TimeBudget, tick: L.Callback, max_epochs: int = -1, ckpt_path=None, sanity_steps: int = 0,
        **trainer_args):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, min_epochs=1,
                        num_sanity_val_steps=sanity_steps,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, logger=False,
                        callbacks=[tick, budget], **trainer_args)
    loader = torch.utils.data.DataLoader(batches(4, 0), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=torch.utils.data.DataLoader(batches(2, 100), batch_size=None),
                ckpt_path=ckpt_path)
    return trainer


def test_the_budget_plans_the_steps_that_fit_and_the_schedule_ends_with_them():
    """1 s a step, 5 s a validation every 4 steps (an epoch) and at the end, 60 s: 25 steps (25 + 7 x 5 = 60),
    ending exactly at the budget, the learning rate at the schedule's end. min_epochs=1 does not hold it."""
    clock = FakeClock()
    budget = TimeBudget("60s", clock=clock)
    tick = Tick(clock)
    module = small_module()
    trainer = fit(module, budget, tick)
    assert budget.planned_steps == 25 and trainer.global_step == 25
    assert budget.elapsed() == pytest.approx(60.0)
    assert_at_the_schedules_end(trainer, module)
    assert budget.plan_lines[0].startswith("budget 1 min: 1.00 s a step, validation 1 s (estimated until one runs)")
    assert budget.plan_lines[-1] == ("budget 1 min: 1.00 s a step, validation 5 s every 4 steps: 25 steps (6.2 epochs), "
                                     "last validation ends at 1:00")


def test_a_slower_pace_moves_the_end_earlier_without_a_jump_in_the_learning_rate():
    """From step 12 on a step takes 2 s: the run plans fewer steps, still ends within the budget, and the
    learning rate goes on from where it was (a plan that restarted the cosine over the new length would
    drop it by half at once)."""
    clock = FakeClock()
    budget = TimeBudget("100s", clock=clock, window=1)  # the pace of the last step: the plan moves at once
    tick = Tick(clock, change_at=12, step_s_after=2.0)
    module = small_module()
    trainer = fit(module, budget, tick)
    steady = steps_that_fit(100, 0, Pace(1.0, 5.0, 4))
    assert trainer.global_step < steady
    assert budget.elapsed() <= 100.0 + 1e-9
    base = tick.lrs[0]
    jumps = [abs(b - a) / base for a, b in zip(tick.lrs, tick.lrs[1:])]
    # the steepest step of the cosine squeezed into the remaining 20 steps: about pi / 2 x 0.68 / 20 = 0.053 (0.061
    # measured); restarting the decay over the new length instead jumps by 0.18 at the change
    assert max(jumps) < 0.08, jumps
    assert_at_the_schedules_end(trainer, module)


class SlowFirstSanityBatch(Tick):
    """The sanity check's first batch takes 10 s (the kernels' first calls), the second 2 s."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            self.clock.now += 10.0 if batch_idx == 0 else 2.0


def test_validation_is_estimated_from_the_sanity_checks_second_batch_until_one_is_measured():
    clock = FakeClock()
    budget = TimeBudget("60s", clock=clock)
    fit(small_module(), budget, SlowFirstSanityBatch(clock), sanity_steps=2)
    # 2 s a batch, 2 validation batches: 4 s (the first batch's 10 s would make it 12 s)
    assert budget.plan_lines[0].startswith("budget 1 min: 1.00 s a step, validation 4 s (estimated until one runs)")
    assert "validation 5 s every 4 steps" in budget.plan_lines[-1]


class AlternatingTick(Tick):
    """Optimizer steps of 1 s and 3 s in turn (multi-scale sizes): 2 s on average."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # the batch that stepped the optimizer
            self.clock.now += 1.0 if trainer.global_step % 2 else 3.0
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_steps_of_varying_cost_under_gradient_accumulation_plan_on_their_mean():
    """Two batches an optimizer step (4 batches an epoch: 2 steps), steps of 1 and 3 s, a validation of 5 s every
    2 steps: the budget counts optimizer steps at their mean, 2 s. In 100 s: 2 N + 5 x (N / 2) <= 100 -> N = 22
    (44 + 55 = 99), ending within the budget."""
    clock = FakeClock()
    budget = TimeBudget("100s", clock=clock, window=4)
    module = small_module()
    trainer = fit(module, budget, AlternatingTick(clock), accumulate_grad_batches=2)
    assert budget.pace(trainer) == Pace(2.0, 5.0, 2)
    assert trainer.global_step == steps_that_fit(100, 0, Pace(2.0, 5.0, 2)) == 22
    assert budget.elapsed() <= 100
    assert_at_the_schedules_end(trainer, module)


def test_max_epochs_stays_a_cap():
    clock = FakeClock()
    budget = TimeBudget("1h", clock=clock)
    trainer = fit(small_module(), budget, Tick(clock), max_epochs=2)
    assert trainer.global_step == 8 and budget.planned_steps == 8
    assert "max_epochs/max_steps end it first" in budget.plan_lines[-1]


class KillAfterValidation(L.Callback):
    """Saves a checkpoint at the validation after ``step`` (as last.ckpt is written) and kills the run."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("killed")


def test_a_resumed_run_keeps_the_budget_and_the_time_spent(tmp_path):
    """Killed after 12 steps and 3 validations (27 s of the 60); the resumed process, whose clock starts anew,
    plans the rest of the same budget from the time spent and ends where the uninterrupted run ends (25 steps,
    60 s), at the schedule's end."""
    clock = FakeClock()
    budget = TimeBudget("60s", clock=clock)
    path = tmp_path / "last.ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, num_sanity_val_steps=0, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            callbacks=[Tick(clock), budget, KillAfterValidation(path, 12)])
        trainer.fit(small_module(), train_dataloaders=torch.utils.data.DataLoader(batches(4, 0), batch_size=None),
                    val_dataloaders=torch.utils.data.DataLoader(batches(2, 100), batch_size=None))
    stored = torch.load(path, weights_only=False)
    assert stored["callbacks"]["TimeBudget"]["spent_s"] == pytest.approx(12 + 3 * 5)
    assert stored["step_plan"]["total_steps"] == 25

    clock2 = FakeClock()
    clock2.now = 5.0  # another process: its own clock
    resumed = TimeBudget("60s", clock=clock2)
    module = small_module()
    tick = Tick(clock2)
    trainer = fit(module, resumed, tick, ckpt_path=path)
    assert trainer.global_step == 25 and resumed.elapsed() == pytest.approx(60.0)
    assert_at_the_schedules_end(trainer, module)


def test_a_budget_too_short_is_refused_saying_the_minimum():
    clock = FakeClock()
    budget = TimeBudget("8s", clock=clock, min_steps=10)
    with pytest.raises(BudgetTooShort, match=r"time_budget 8 s is too short for this run: .* at least \d+:\d\d"):
        fit(small_module(), budget, Tick(clock))


def _rank_plans(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    class Strategy:
        @staticmethod
        def broadcast(obj, src=0):
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]

    clock = FakeClock()
    budget = TimeBudget("100s", clock=clock, probe_steps=1)
    budget._steps.extend([1.0 + rank] * 3)  # rank 1 measured twice rank 0's pace
    budget._probe_left = 0
    budget._cap = None
    plan = SimpleNamespace(total_steps=None, replan=lambda total, step: setattr(plan, "total_steps", total))
    trainer = SimpleNamespace(is_global_zero=rank == 0, world_size=world, strategy=Strategy(), num_val_batches=[0],
                              log_every_n_steps=1, num_training_batches=10, accumulate_grad_batches=1,
                              datamodule=None, val_check_batch=10, check_val_every_n_epoch=1)
    budget._plan(trainer, SimpleNamespace(step_plan=plan), step=4)
    torch.save(budget.planned_steps, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 10 s of start-up
def test_ddp_ranks_agree_on_rank_zeros_plan(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_plans, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    plans = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    # rank 0: nothing spent of 100 s at 1 s a step, no validation: 100 more steps after step 4 (rank 1, alone,
    # would plan 50)
    assert plans == [104, 104]


@pytest.mark.slow
def test_a_real_short_run_ends_within_its_budget_at_the_schedules_end(tmp_path):
    """train.py with time_budget=20s on shapes (SSDLite at 128 px, the budget alone: max_epochs=-1): it plans,
    validates every epoch, ends with its last validation within the budget (a tenth over at most: the last
    steps' pace), having used most of it, and its last epoch ends at the schedule's floor (or a step or two
    short of it)."""
    import re

    from omegaconf import OmegaConf

    from test_train_e2e import run, run_dir

    out = run("train.py", "model=ssdlite", "time_budget=20s", "trainer.max_epochs=-1", "input_size=[128,128]",
              "data.source.sizes={train: 32, val: 8, test: 8}", "data.batch_size=8", "data.num_workers=0",
              "trainer.accelerator=cpu", "optimizer=sgd", run_dir(tmp_path, "budget"))
    assert re.search(r"budget 20 s: [0-9.]+ s a step, validation \d+ s .*every 4 steps: \d+ steps of 8", out), out[-3000:]
    used = re.search(r"time budget 20 s \(20 s\): (\d+) s used \((\d+)%\), (\d+) steps", out)
    assert used, out[-3000:]
    assert 0.75 * 20 <= int(used.group(1)) <= 1.1 * 20
    config = OmegaConf.load(tmp_path / "budget" / ".hydra" / "config.yaml")
    last_lr = float(re.findall(r"epoch \d+ step \d+: .*? lr ([0-9.e-]+),", out)[-1])
    floor = config.optimizer.lr * config.scheduler.min_lr_ratio
    # at the floor, or a step or two short of it: where the pace slows in the last steps, the plan shrinks to the
    # current step and the run stops there (a schedule stopped half way would be about half the range above it)
    assert floor * 0.99 <= last_lr <= floor + 0.03 * (config.optimizer.lr - floor), (last_lr, floor)
