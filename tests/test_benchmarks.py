"""The benchmark scripts run (tiny sizes on the CPU); their figures are taken on the GPU, not here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_train_throughput_runs_ours_and_torchvision(tmp_path):
    import train_throughput

    out = train_throughput.main(["--device", "cpu", "--batch", "2", "--warmup", "0", "--iters", "1", "--no-amp",
                                 "--json", str(tmp_path / "r.json")])
    assert set(out) == {"ours", "torchvision ssd300_vgg16", "torchvision backbone fwd+bwd (floor)"}
    assert all(v > 0 for v in out.values())
    assert (tmp_path / "r.json").is_file()
