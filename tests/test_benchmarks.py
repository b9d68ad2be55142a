"""The benchmark scripts run (tiny sizes on the CPU) and report what they promise: the rows they print
and write in --json, ours and the peer on the same input, ratios that are the quotients of the rows,
parameter counts and FLOPs against independent counts. Their figures are taken on the GPU, not here."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def printed_rows(text: str, names, columns: int) -> dict[str, list[float]]:
    """The numbers printed after each row name (the name padded to a column, then ``columns`` numbers)."""
    rows = {}
    for line in text.splitlines():
        for name in names:
            rest = line[len(name):].split() if line.startswith(name) else []
            if len(rest) == columns and all(re.fullmatch(r"[\d.]+", v) for v in rest):
                rows[name] = [float(v) for v in rest]
    return rows


def record_inputs(monkeypatch, module, seen: dict):
    """Record the shape of the first input of our network and of torchvision's SSD300 backbone, and
    both heads' class counts (with background), as the benchmark builds them."""
    import torchvision.models.detection as tvd

    real_ours, real_theirs = module.build_ours, tvd.ssd300_vgg16

    def keep(key):
        def hook(_, args):
            seen.setdefault(key, tuple(args[0].shape))  # returns None: the input goes on unchanged
        return hook

    def ours(overrides, num_classes):
        m = real_ours(overrides, num_classes)
        seen["ours classes"] = m.detector.head.num_classes + 1
        seen["ours model"] = m
        m.detector.register_forward_pre_hook(keep("ours"))
        return m

    def theirs(**kwargs):
        m = real_theirs(**kwargs)
        seen["torchvision classes"] = m.head.classification_head.num_columns
        seen["torchvision model"] = m
        m.backbone.register_forward_pre_hook(keep("torchvision"))
        return m

    monkeypatch.setattr(module, "build_ours", ours)
    monkeypatch.setattr(tvd, "ssd300_vgg16", theirs)


@pytest.mark.slow
def test_train_throughput_times_ours_and_torchvision_on_the_same_batch(tmp_path, monkeypatch, capsys):
    import train_throughput

    seen = {}
    record_inputs(monkeypatch, train_throughput, seen)
    out = train_throughput.main(["--device", "cpu", "--batch", "2", "--warmup", "0", "--iters", "1", "--no-amp",
                                 "--num-classes", "3", "--json", str(tmp_path / "r.json")])
    rows = ["ours", "torchvision ssd300_vgg16", "torchvision backbone fwd+bwd (floor)"]
    assert list(out) == rows and all(v > 0 for v in out.values())
    # both networks got the same batch at the same size, with heads for the same classes
    assert seen["ours"] == seen["torchvision"] == (2, 3, 300, 300)
    assert seen["ours classes"] == seen["torchvision classes"] == 4
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["batch"] == 2 and written["device"] == "cpu" and written["torch"] == torch.__version__
    assert written["img_per_s"] == pytest.approx(out)
    assert written["speedup"] == pytest.approx(out["ours"] / out["torchvision ssd300_vgg16"], rel=1e-12)
    # the printed table: img/s and ms per step of each row (img/s x ms = batch x 1000), and the ratio
    text = capsys.readouterr().out
    assert "SSD300 training step, batch 2, 300x300, fp32, cpu" in text
    table = printed_rows(text, rows, 2)
    assert list(table) == rows
    for name, (img_s, ms) in table.items():
        assert img_s == pytest.approx(out[name], abs=0.051) and ms == pytest.approx(2000 / out[name], abs=0.051)
    assert f"ours / torchvision: {written['speedup']:.2f}x" in text


def test_backbone_benchmark_times_ours_beside_torchvision_on_the_same_architecture(tmp_path, capsys):
    import backbones
    from torchvision.models import mobilenet_v2, vgg16, vgg16_bn

    rows = backbones.main(["--device", "cpu", "--batch", "1", "--sizes", "64", "--warmup", "0", "--iters", "1",
                           "--no-amp", "--backbones", "vgg16", "vgg16_bn", "mobilenet_v2", "darknet19",
                           "--json", str(tmp_path / "b.json")])
    by_name = {r["backbone"]: r for r in rows}
    assert list(by_name) == ["vgg16", "vgg16_bn", "mobilenet_v2", "darknet19"] and {r["size"] for r in rows} == {64}
    # the same architecture as torchvision's: its features' parameter count and stride-32 map are ours
    x = torch.zeros(1, 3, 64, 64)
    for name, reference in (("vgg16", vgg16), ("vgg16_bn", vgg16_bn), ("mobilenet_v2", mobilenet_v2)):
        features = reference(weights=None).features.eval()
        assert by_name[name]["params_m"] * 1e6 == pytest.approx(sum(p.numel() for p in features.parameters()))
        ours = backbones.ours(name).eval()
        with torch.no_grad():
            out = ours(x)
        assert (out[-1] if isinstance(out, (list, tuple)) else out).shape == features(x).shape
        assert isinstance(by_name[name]["torchvision"], float) and by_name[name]["torchvision"] > 0
    # DarkNet-19 (Redmon & Farhadi 2017, table 6) without its classifier, by hand: 18 convs, BN, no bias
    darknet19 = [(3, 3, 32), (3, 32, 64), (3, 64, 128), (1, 128, 64), (3, 64, 128), (3, 128, 256), (1, 256, 128),
                 (3, 128, 256), (3, 256, 512), (1, 512, 256), (3, 256, 512), (1, 512, 256), (3, 256, 512),
                 (3, 512, 1024), (1, 1024, 512), (3, 512, 1024), (1, 1024, 512), (3, 512, 1024)]
    assert by_name["darknet19"]["params_m"] * 1e6 == pytest.approx(
        sum(k * k * ci * co + 2 * co for k, ci, co in darknet19))
    assert by_name["darknet19"]["torchvision"] is None  # no torchvision model: no ratio made up
    # VGG16's convs at 64 px, by hand: sum of 2 * k*k*cin*cout * h*w (+ the pools' and ReLUs' nothing)
    convs = [(3, 64, 64), (64, 64, 64), (64, 128, 32), (128, 128, 32), (128, 256, 16), (256, 256, 16),
             (256, 256, 16), (256, 512, 8), (512, 512, 8), (512, 512, 8), (512, 512, 4), (512, 512, 4), (512, 512, 4)]
    assert by_name["vgg16"]["gflops"] == pytest.approx(sum(2 * 9 * ci * co * s * s for ci, co, s in convs) / 1e9,
                                                      rel=1e-6)
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["batch"] == 1 and written["amp"] is False and written["rows"] == rows
    # the printed table: one line per row, its ratio the quotient of the two rates
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [row["backbone"], "64", f"{row['params_m']:.2f}", f"{row['gflops']:.2f}"]
        assert cells[4] == f"{row['ours']:.1f}"
        if row["torchvision"] is None:
            assert cells[5:] == ["n/a", "n/a (no torchvision model)"]
        else:
            assert cells[5:] == [f"{row['torchvision']:.1f}", f"{row['ours'] / row['torchvision']:.2f}x"]


@pytest.mark.slow
def test_rcnn_throughput_times_ours_torchvision_and_the_floor(tmp_path, monkeypatch, capsys):
    import rcnn_throughput
    import torchvision.models.detection as tvd

    # what each side is given: the batch (made once per side), the input its network sees, classes and anchors
    batches, seen = [], {}
    real_batch, real_ours, real_theirs = rcnn_throughput.rect_batch, rcnn_throughput.build_ours, tvd.FasterRCNN

    def rect_batch(args, device):
        batches.append(real_batch(args, device))
        return batches[-1]

    def keep(key):
        def hook(_, args):
            seen.setdefault(key, tuple(args[0].shape))
        return hook

    def ours(overrides, num_classes):
        m = real_ours(overrides, num_classes)
        seen["ours"] = m
        m.detector.backbone.register_forward_pre_hook(keep("ours input"))
        return m

    def theirs(backbone, **kwargs):
        m = real_theirs(backbone, **kwargs)
        seen["torchvision"] = m
        backbone.register_forward_pre_hook(keep("torchvision input"))
        return m

    monkeypatch.setattr(rcnn_throughput, "rect_batch", rect_batch)
    monkeypatch.setattr(rcnn_throughput, "build_ours", ours)
    monkeypatch.setattr(tvd, "FasterRCNN", theirs)
    out = rcnn_throughput.main(["--device", "cpu", "--batch", "1", "--height", "128", "--width", "192", "--warmup", "0",
                                "--iters", "1", "--no-amp", "--num-classes", "3", "--json", str(tmp_path / "r.json")])
    rows = ["ours", "torchvision FasterRCNN", "VGG16 conv5_3 fwd+bwd (floor)"]
    assert list(out) == rows and all(v > 0 for v in out.values())
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["size"] == [128, 192] and written["speedup"] == pytest.approx(out["ours"] / out[rows[1]], rel=1e-12)
    # the overheads are the steps' times beyond the floor's
    for who, key in (("ours", "ours"), ("torchvision", rows[1])):
        assert written["overhead_s"][who] == pytest.approx(1 / out[key] - 1 / out[rows[2]], rel=1e-9)
    text = capsys.readouterr().out
    assert "Faster R-CNN training step, VGG16 conv5_3, batch 1, 128x192, fp32, cpu" in text
    assert list(printed_rows(text, rows, 2)) == rows
    # both sides trained on the same images and boxes, at the same size (torchvision resized nothing), with
    # heads for the same classes and the same anchors
    assert len(batches) == 2 and all(torch.equal(batches[0][k], batches[1][k]) for k in ("images", "boxes", "labels"))
    assert batches[0]["boxes"].shape == (1, 6, 4) and (batches[0]["boxes"][..., 2:] <= torch.tensor([192, 128])).all()
    assert seen["ours input"] == seen["torchvision input"] == (1, 3, 128, 192)
    ours_head, theirs = seen["ours"].detector.head, seen["torchvision"]
    assert ours_head.num_classes + 1 == theirs.roi_heads.box_predictor.cls_score.out_features == 4
    assert tuple(ours_head.anchors.sizes) == theirs.rpn.anchor_generator.sizes[0] == (128, 256, 512)
    assert ours_head.roi_head.fc6.out_features == theirs.roi_heads.box_head.fc6.out_features == 1024


def test_interleaved_timing_takes_a_step_of_each_per_round_and_their_medians(monkeypatch):
    """time_interleaved: warm-ups first, then rounds of one call of each step in turn (a drift in the machine's
    pace falls on every row alike), each row the median of its own calls; on a fake clock that a step advances
    by a cost of its own."""
    import common

    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    calls = []

    def step(name, costs):
        costs = iter(costs)

        def run():
            calls.append(name)
            now[0] += next(costs)
        return run

    seconds = common.time_interleaved({"a": step("a", [9.0, 1.0, 3.0, 2.0]), "b": step("b", [7.0, 5.0, 4.0, 6.0])},
                                      warmup=1, iters=3, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert seconds == {"a": 2.0, "b": 5.0}  # medians of (1, 3, 2) and (5, 4, 6); the warm-ups (9, 7) not counted
