"""Tests for tools/bench_eval.py: the synthetic COCO set and a tiny benchmark run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from detection.coco_eval import evaluate_coco_results

REPO = Path(__file__).resolve().parents[2]
HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "tools" / "bench_eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_eval = _load_tool()


def test_synthetic_set_is_coco_like_and_deterministic():
    dataset = bench_eval.build_synthetic_coco(40, 7.0, seed=3)
    assert dataset == bench_eval.build_synthetic_coco(40, 7.0, seed=3)
    assert dataset != bench_eval.build_synthetic_coco(40, 7.0, seed=4)
    assert len(dataset["images"]) == 40 and len(dataset["categories"]) == 80
    assert max(c["id"] for c in dataset["categories"]) == 90  # COCO's non-contiguous ids
    anns = dataset["annotations"]
    assert 150 < len(anns) < 420  # Poisson(7) per image
    assert len({a["id"] for a in anns}) == len(anns)
    crowd = [a for a in anns if a["iscrowd"]]
    assert all(a["id"] > 2**31 and isinstance(a["segmentation"]["counts"], list) for a in crowd)
    areas = [a["area"] for a in anns if not a["iscrowd"]]
    assert min(areas) < 32**2 and any(32**2 <= x < 96**2 for x in areas) and max(areas) >= 96**2
    for a in anns:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 480 and w > 0 and h > 0


def test_synthetic_ground_truth_fed_back_gives_ap_100():
    dataset = bench_eval.build_synthetic_coco(20, 5.0, seed=1)
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in dataset["annotations"]
        if not a["iscrowd"]
    ]
    metrics = evaluate_coco_results(dataset, results, ("bbox",), log=lambda _: None)
    assert metrics["bbox/AP"] == pytest.approx(100.0)


def test_synthetic_results_are_detector_like():
    dataset = bench_eval.build_synthetic_coco(15, 7.0, seed=0)
    results = bench_eval.build_synthetic_results(dataset, 12, seed=0)
    per_image = {img["id"]: 0 for img in dataset["images"]}
    for r in results:
        per_image[r["image_id"]] += 1
        assert isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [480, 640]
        assert 0.0 <= r["score"] <= 1.0
    assert set(per_image.values()) == {12}


@pytest.mark.parametrize("with_faster", [False, True])
def test_tiny_benchmark_run_writes_table_and_json(tmp_path, capsys, with_faster):
    if with_faster and not HAS_FASTER:
        pytest.skip("faster-coco-eval is not installed")
    backends = ["pycocotools", "faster_coco_eval"] if with_faster else ["pycocotools"]
    out = tmp_path / "bench.json"
    argv = ["--num-images", "30", "--dets-per-image", "10", "--seed", "2", "--json", str(out), "--backends"]
    assert bench_eval.main([*argv, *backends]) == 0

    printed = capsys.readouterr().out
    assert "| backend | iou type | seconds | AP |" in printed
    assert re.search(r"\| pycocotools \| segm \| [0-9.]+ \| [0-9.]+ \|", printed)
    payload = json.loads(out.read_text())
    assert [(r["backend"], r["iou_type"]) for r in payload["rows"]] == [
        (b, t) for b in backends for t in ("bbox", "segm")
    ]
    assert payload["data"]["images"] == 30 and payload["data"]["results"] == 300
    for row in payload["rows"]:
        assert len(row["stats"]) == 12 and row["seconds"] > 0
        assert 5.0 < row["AP"] < 95.0  # perturbed detections: neither perfect nor useless
        assert row["AP"] == pytest.approx(100.0 * row["stats"][0])
    if with_faster:
        assert payload["agreement_ok"] is True
        assert set(payload["max_abs_diff"]) == {
            "bbox:pycocotools/faster_coco_eval",
            "segm:pycocotools/faster_coco_eval",
        }
        assert max(payload["max_abs_diff"].values()) <= 1e-4
        assert "takes" in printed and "agree" in printed
    else:
        assert payload["max_abs_diff"] == {} and payload["agreement_ok"] is True


def test_bad_arguments_return_an_error(capsys):
    assert bench_eval.main(["--num-images", "0"]) == 2
    assert "--num-images and --dets-per-image must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_eval.main(["--backends", "detectron2"])  # argparse rejects unknown choices
    assert "invalid choice: 'detectron2'" in capsys.readouterr().err
