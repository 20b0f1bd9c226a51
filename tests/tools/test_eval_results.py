"""tools/eval_det.py --results: bad files are one line with exit 2; where metrics go; partial coverage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

GT = {
    "images": [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in (1, 2)],
    "annotations": [
        {"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [8.0, 8.0, 20.0, 20.0], "area": 400.0, "iscrowd": 0}
        for i in (1, 2)
    ],
    "categories": [{"id": 1, "name": "thing"}],
}
GOOD = {"image_id": 1, "category_id": 1, "bbox": [8.0, 8.0, 20.0, 20.0], "score": 0.9}


@pytest.fixture
def ann(tmp_path: Path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    return path


def _run(load_tool, results: Path, ann: Path, *extra: str) -> int:
    return load_tool("eval_det").main(["--results", str(results), "--ann", str(ann), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({**GOOD, "score": float("nan")}, "result #1 (image_id 1) has score nan (float); expected a finite number"),
        ({**GOOD, "score": "0.9"}, "result #1 (image_id 1) has score '0.9' (str); expected a finite number"),
        ({**GOOD, "bbox": [8.0, float("inf"), 20.0, 20.0]}, "result #1 (image_id 1) has bbox [8.0, inf, 20.0, 20.0]"),
        ({k: v for k, v in GOOD.items() if k != "score"}, "result #1 (image_id 1) has no 'score'"),
        ({**GOOD, "image_id": "1"}, "result #1 (image_id '1') has image_id '1' (str); expected an integer id"),
        ([1, 1, 8, 8], "result #1 is a list, not a dict"),
    ],
)
def test_bad_entries_are_refused_naming_the_first(load_tool, ann, tmp_path, capsys, entry, expected) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps([GOOD, entry, entry]))  # json writes NaN / Infinity
    assert _run(load_tool, results, ann) == 2
    assert _one_error_line(capsys).startswith(f"error: {results}: {expected}")
    assert not (tmp_path / "results_eval").exists()


def test_bad_json_and_a_dict_are_one_line(load_tool, ann, tmp_path, capsys) -> None:
    bad = tmp_path / "results.yaml"
    bad.write_text("- image_id: 1\n  score: 0.9\n")
    assert _run(load_tool, bad, ann) == 2
    assert _one_error_line(capsys) == f"error: {bad}: invalid JSON at line 1, column 1: Expecting value"
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"annotations": [GOOD]}))
    assert _run(load_tool, as_dict, ann) == 2
    assert "a COCO results file holds a JSON list of result dicts" in _one_error_line(capsys)
    bad_ann = tmp_path / "bad_gt.json"
    bad_ann.write_text("{")
    good = tmp_path / "good.json"
    good.write_text(json.dumps([GOOD]))
    assert _run(load_tool, good, bad_ann) == 2
    assert _one_error_line(capsys).startswith(f"error: {bad_ann}: invalid JSON at line 1, column 2")


def test_ids_that_match_nothing_are_one_line(load_tool, ann, tmp_path, capsys) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{**GOOD, "image_id": 99}]))
    assert _run(load_tool, results, ann) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {results}: 1 of 1 results have an image_id that is not in the ground truth")


def test_metrics_go_next_to_the_results_and_partial_coverage_warns(load_tool, ann, tmp_path, capsys) -> None:
    results = tmp_path / "preds" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps([GOOD]))  # image 1 only: image 2 is missed
    assert _run(load_tool, results, ann) == 0
    captured = capsys.readouterr()
    out = tmp_path / "preds" / "results_eval" / "metrics.json"
    assert f"wrote {out} (no --output-dir: a folder next to the results file)" in captured.out
    assert f"warning: {results} has results for 1 of the 2 images in {ann}" in captured.err
    assert "--only-result-images" in captured.err
    assert json.loads(out.read_text())["bbox/AP50"] == pytest.approx(50.0, abs=1.0)

    assert _run(load_tool, results, ann, "--only-result-images", "--output-dir", str(tmp_path / "only")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert json.loads((tmp_path / "only" / "metrics.json").read_text())["bbox/AP50"] == pytest.approx(100.0)


def test_empty_results_score_nan(load_tool, ann, tmp_path, capsys) -> None:
    results = tmp_path / "results.json"
    results.write_text("[]")
    with pytest.warns(UserWarning, match="No predictions were made"):
        assert _run(load_tool, results, ann, "--output-dir", str(tmp_path / "o")) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert all(v is None or math.isnan(v) for v in metrics.values())
