"""The evaluation benchmarks run (tiny sizes on the CPU) and report what they claim; their figures
are taken on the GPU (BENCHMARKS.md), not here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_inference_benchmark_runs_ours_and_torchvision(tmp_path):
    import inference

    out = inference.main(["--device", "cpu", "--batch", "1", "--warmup", "0", "--iters", "1", "--no-amp",
                          "--json", str(tmp_path / "r.json")])
    assert set(out["img_per_s"]) == {"ours", "torchvision ssd300_vgg16", "ours decode+NMS only",
                                     "torchvision postprocess only"}
    assert all(v > 0 for v in out["img_per_s"].values())
    # both decode to the same budget: random weights fill it (every prior scores above 0.01)
    assert out["detections_per_image"] == {"ours": 200.0, "torchvision ssd300_vgg16": 200.0}
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == pytest.approx(out["speedup"])


@pytest.mark.slow
def test_coco_eval_benchmark_gives_pycocotools_stats_on_every_path(tmp_path):
    import coco_eval

    out = coco_eval.main(["--device", "cpu", "--images", "40", "--classes", "8", "--repeats", "1",
                          "--json", str(tmp_path / "r.json")])
    assert set(out["rows"]) == {"ours (cpu)", "pycocotools", "faster-coco-eval"}
    assert all(out["identical"].values()), out["max_abs_diff_vs_reference"]
    reference = out["rows"]["pycocotools"]["stats"]
    assert reference["map_50"] > 0.05 and reference["mar_100"] > 0.2  # a case with real matches
    assert set(out["speedup"]) == {"ours (cpu) / faster-coco-eval", "ours (cpu) / pycocotools"}
    assert (tmp_path / "r.json").is_file()


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
