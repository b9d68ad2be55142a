"""The evaluation benchmarks run (tiny sizes on the CPU) and report what they claim; their figures
are taken on the GPU (BENCHMARKS.md), not here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_inference_benchmark_runs_ours_and_torchvision_on_the_same_batch(tmp_path, monkeypatch, capsys):
    import inference

    from tests.test_benchmarks import printed_rows, record_inputs

    seen = {}
    record_inputs(monkeypatch, inference, seen)
    out = inference.main(["--device", "cpu", "--batch", "1", "--warmup", "0", "--iters", "1", "--no-amp",
                          "--num-classes", "3", "--json", str(tmp_path / "r.json")])
    rows = ["ours", "torchvision ssd300_vgg16", "ours decode+NMS only", "torchvision postprocess only"]
    assert list(out["img_per_s"]) == rows and all(v > 0 for v in out["img_per_s"].values())
    # both networks got the same image at the same size, with heads for the same classes
    assert seen["ours"] == seen["torchvision"] == (1, 3, 300, 300)
    assert seen["ours classes"] == seen["torchvision classes"] == 4
    assert (out["batch"], out["size"], out["amp"], out["device"]) == (1, 300, False, "cpu")
    # both decode with the same settings (score > 0.01, top 400 per class, NMS 0.45, 200 per image) ...
    head, theirs = seen["ours model"].detector.head, seen["torchvision model"]
    ours = (head.score_threshold, head.pre_nms_top_k, head.nms_threshold, head.max_detections)
    assert ours == (theirs.score_thresh, theirs.topk_candidates, theirs.nms_thresh, theirs.detections_per_img)
    assert ours == (0.01, 400, 0.45, 200)
    # ... and to the same budget: random weights fill it (every prior scores above 0.01)
    assert out["detections_per_image"] == {"ours": 200.0, "torchvision ssd300_vgg16": 200.0}
    rate = out["img_per_s"]
    assert out["speedup"] == pytest.approx(rate["ours"] / rate["torchvision ssd300_vgg16"], rel=1e-12)
    assert out["postprocess_speedup"] == pytest.approx(
        rate["ours decode+NMS only"] / rate["torchvision postprocess only"], rel=1e-12)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
    # the printed table: img/s, ms per batch (img/s x ms = batch x 1000) and detections per image
    text = capsys.readouterr().out
    assert "SSD300 inference (normalise, forward, decode, NMS), batch 1, 300x300, fp32, cpu" in text
    table = {**printed_rows(text, rows, 2), **printed_rows(text, rows, 3)}
    assert sorted(table) == sorted(rows)
    for name, numbers in table.items():
        assert numbers[0] == pytest.approx(rate[name], abs=0.051)
        assert numbers[1] == pytest.approx(1000 / rate[name], abs=0.051)
        assert numbers[2:] == ([out["detections_per_image"][name]] if name in out["detections_per_image"] else [])
    assert f"ours / torchvision: {out['speedup']:.2f}x end to end, {out['postprocess_speedup']:.2f}x decode+NMS" in text


# pycocotools' summarize() order
COCO_STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def pycocotools_stats(gt: dict, results: list) -> list[float]:
    """The 12 COCO stats straight from pycocotools (not through the benchmark's own wrapper)."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


@pytest.mark.slow
def test_coco_eval_benchmark_gives_pycocotools_stats_on_every_path(tmp_path):
    import coco_eval

    out = coco_eval.main(["--device", "cpu", "--images", "40", "--classes", "8", "--repeats", "1",
                          "--json", str(tmp_path / "r.json")])
    assert set(out["rows"]) == {"ours (cpu)", "pycocotools", "faster-coco-eval"}
    # the case the benchmark evaluated (seed 0), scored by pycocotools here: every row's 12 stats
    case = coco_eval.make_case(40, 15, 100, 8, seed=0)
    assert out["ground_truth"] == len(case["gt"]["annotations"]) and out["detections"] == len(case["results"]) == 4000
    reference = dict(zip(COCO_STATS, pycocotools_stats(case["gt"], case["results"])))
    assert reference["map_50"] > 0.05 and reference["mar_100"] > 0.2  # a case with real matches
    assert out["rows"]["pycocotools"]["stats"] == reference
    for row in ("ours (cpu)", "faster-coco-eval"):
        assert out["rows"][row]["stats"] == pytest.approx(reference, abs=1e-6), row
    assert all(out["identical"].values()) and set(out["identical"]) == set(out["rows"])
    for row, diff in out["max_abs_diff_vs_reference"].items():
        assert diff == max(abs(out["rows"][row]["stats"][s] - reference[s]) for s in COCO_STATS)
    # speed-ups: the quotients of the rows' total times
    total = {k: v["total_s"] for k, v in out["rows"].items()}
    assert out["speedup"] == pytest.approx({
        "ours (cpu) / faster-coco-eval": total["faster-coco-eval"] / total["ours (cpu)"],
        "ours (cpu) / pycocotools": total["pycocotools"] / total["ours (cpu)"]}, rel=1e-12)
    assert all(0 < v["eval_s"] <= v["total_s"] for v in out["rows"].values())
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))


def test_coco_eval_case_is_consistent_across_the_input_forms():
    import coco_eval

    case = coco_eval.make_case(images=5, max_gt=15, dets=30, classes=4, seed=1)
    assert len(case["results"]) == 5 * 30 and len(case["preds"]) == 5
    assert sum(len(t["labels"]) for t in case["targets"]) == len(case["gt"]["annotations"])
    first = case["results"][0]
    x, y, w, h = first["bbox"]
    assert case["preds"][0]["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    ids = [c["id"] for c in case["gt"]["categories"]]
    assert ids == sorted(ids) and first["category_id"] == ids[int(case["preds"][0]["labels"][0])]


@pytest.mark.slow
def test_nms_benchmark_checks_every_strategy_against_per_image_nms(tmp_path, capsys):
    import nms as nms_benchmark

    out = nms_benchmark.main(["--device", "cpu", "--batch", "2", "--classes", "3", "--warmup", "0", "--iters", "1",
                              "--json", str(tmp_path / "r.json")])
    assert [(r["classes"], r["regime"]) for r in out["rows"]] == [(3, "random"), (3, "realistic")]
    compared = set(nms_benchmark.ROWS) - {"torchvision postprocess", "decode + top-k + cut, no NMS"}
    for row in out["rows"]:
        # every row timed (none too big to run at batch 2), every strategy's kept boxes compared
        assert list(row["ms"]) == list(nms_benchmark.ROWS) and not row["skipped"]
        assert all(ms > 0 for ms in row["ms"].values()) and row["timed_once"] == []
        assert set(row["mismatches"]) == compared
        assert all(row["mismatches"][name] == 0 for name in nms_benchmark.EXACT)
        assert row["rule"] == "per_group"
    assert out["exact_checked"] == dict.fromkeys(nms_benchmark.EXACT, True)
    random, realistic = out["rows"]
    assert random["candidates"] == 2 * 3 * 400 and random["above_threshold_fraction"] > 0.99  # every prior
    assert 0.005 < realistic["above_threshold_fraction"] < 0.03  # about 1.5% of priors x classes
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
    text = capsys.readouterr().out
    assert "decode + NMS, SSD300 (8732 priors), batch 2, cpu" in text
    lines = text.splitlines()
    for name in nms_benchmark.ROWS:
        cells = next(line for line in lines if line.startswith(name))[34:].split()  # "ms" or "ms xN"
        numbers = [float(c.rstrip("*")) for c in cells if not c.startswith("x")]
        assert numbers == [pytest.approx(r["ms"][name], abs=0.051) for r in out["rows"]]


def test_nms_benchmark_counts_the_kept_boxes_that_differ():
    import nms as nms_benchmark
    import torch

    def image(rows):
        t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
        return {"boxes": t[:, :4], "scores": t[:, 4], "labels": t[:, 5].long()}

    a, b, c = [0, 0, 1, 1, 0.9, 0], [0, 0, 2, 2, 0.8, 1], [5, 5, 6, 6, 0.7, 0]
    assert nms_benchmark.mismatches([image([a, b]), image([])], [image([a, b]), image([])]) == 0
    assert nms_benchmark.mismatches([image([a, b])], [image([a, c])]) == 2  # b kept instead of c
    assert nms_benchmark.mismatches([image([b, a])], [image([a, b])]) == 1  # same boxes, other order
