"""benchmarks/loop_throughput.py runs (tiny sizes on the CPU): the isolated step and trainer.fit with
the project's callbacks are timed over the same images, and the ratio is the one of the two rows."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_loop_benchmark_times_the_step_and_the_loop_over_the_same_images(tmp_path):
    import loop_throughput

    out = loop_throughput.main(["--device", "cpu", "--batch", "2", "--size", "160", "--warmup", "1", "--iters", "1",
                                "--rounds", "2", "--no-amp", "--json", str(tmp_path / "loop.json"), "model=ssdlite"])
    rows = out["rows"]
    assert set(rows) == {"isolated step", "trainer.fit"}
    # batch x iters x rounds, in both rows
    assert rows["isolated step"]["images"] == rows["trainer.fit"]["images"] == 2 * 1 * 2
    assert len(out["round_ratios"]) == 2
    assert all(r["img_per_s"] > 0 for r in rows.values())
    assert out["ratio"] == pytest.approx(rows["trainer.fit"]["img_per_s"] / rows["isolated step"]["img_per_s"])
    cpu = {k: r["img_per_cpu_s"] for k, r in rows.items()}
    assert out["cpu_ratio"] == pytest.approx(cpu["trainer.fit"] / cpu["isolated step"])
    # the real loop: warm-up and timed steps, with the default callbacks and the CSV logger
    assert out["loop"]["steps"] == 1 + 1
    assert {"DivergenceGuard", "RichProgressBar", "EpochSummary", "ModelCheckpoint"} <= set(out["loop"]["callbacks"])
    assert out["loop"]["loggers"] == ["CSVLogger"]
    assert json.loads((tmp_path / "loop.json").read_text())["ratio"] == pytest.approx(out["ratio"])


def test_loop_timer_counts_only_the_timed_batches():
    import time

    import loop_throughput
    import torch

    class Module:
        device = torch.device("cpu")

    timer = loop_throughput.LoopTimer(warmup=2, iters=3)
    # each "batch" sleeps before it ends: 0.05 s in the timed batches 2, 3, 4, 0.3 s in the warm-up ones and
    # in the one after (not timed). The timed window is from the end of batch 1 to the end of batch 4: 0.15 s
    # of sleep; a window one batch off either way would hold at least 0.4 s.
    sleeps = [0.3, 0.3, 0.05, 0.05, 0.05, 0.3]
    for i, seconds in enumerate(sleeps):
        time.sleep(seconds)
        timer.on_train_batch_end(None, Module(), None, {"images": torch.zeros(4, 3, 8, 8)}, i)
    assert timer.images == 3 * 4
    wall, cpu = timer.seconds
    assert 0.15 <= wall < 0.4, wall
    # sleeping costs this process no CPU: the second figure is CPU time, not the wall clock again
    assert 0 <= cpu < 0.1, cpu
    with pytest.raises(RuntimeError, match="ended before"):
        _ = loop_throughput.LoopTimer(warmup=0, iters=5).seconds
