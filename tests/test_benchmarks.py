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


def test_backbone_benchmark_times_ours_beside_torchvision_on_the_same_architecture(tmp_path):
    import backbones
    from torchvision.models import mobilenet_v2, vgg16

    rows = backbones.main(["--device", "cpu", "--batch", "1", "--sizes", "64", "--warmup", "0", "--iters", "1",
                           "--no-amp", "--backbones", "vgg16", "mobilenet_v2", "darknet19",
                           "--json", str(tmp_path / "b.json")])
    by_name = {r["backbone"]: r for r in rows}
    # the same architecture as torchvision's: parameter counts of its features equal ours
    for name, reference in (("vgg16", vgg16), ("mobilenet_v2", mobilenet_v2)):
        features = reference(weights=None).features
        assert by_name[name]["params_m"] * 1e6 == pytest.approx(sum(p.numel() for p in features.parameters()))
        assert by_name[name]["torchvision"] > 0
    assert by_name["darknet19"]["torchvision"] is None  # no torchvision model: no ratio made up
    # VGG16's convs at 64 px, by hand: sum of 2 * k*k*cin*cout * h*w (+ the pools' and ReLUs' nothing)
    convs = [(3, 64, 64), (64, 64, 64), (64, 128, 32), (128, 128, 32), (128, 256, 16), (256, 256, 16),
             (256, 256, 16), (256, 512, 8), (512, 512, 8), (512, 512, 8), (512, 512, 4), (512, 512, 4), (512, 512, 4)]
    assert by_name["vgg16"]["gflops"] == pytest.approx(sum(2 * 9 * ci * co * s * s for ci, co, s in convs) / 1e9,
                                                      rel=1e-6)
    assert (tmp_path / "b.json").is_file()
