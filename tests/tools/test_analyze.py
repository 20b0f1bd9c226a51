"""tools/analyze.py: a table and JSON of params and FLOPs per group; one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/smoke/tiny_cpu.yaml")
SMALL = ["model.backbone.base_channels=16", "model.backbone.norm=bn", "model.backbone.fpn.out_channels=32", "model.head.mask_head_channels=[16]",
         "model.head.box_head_dim=64", "model.num_classes=5"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_help(load_tool, capsys):
    assert load_tool("analyze").main(["--help"]) == 0
    assert "--size" in capsys.readouterr().out


def test_table_and_json(load_tool, tmp_path, capsys):
    out = tmp_path / "flops.json"
    code = load_tool("analyze").main(["--config", TINY, "--size", "64", "96", "--set", *SMALL, "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"backbone", "stem", "c2", "c5", "fpn", "rpn", "roi_heads", "box_head", "mask_head", "other", "total"} <= rows
    assert "mask_rcnn, resnet18, num_classes 5" in text and "image 64x96, resized to 64x96" in text
    record = json.loads(out.read_text())
    assert record["arch"] == "mask_rcnn" and record["detections_mode"] == "max"
    assert record["image_size"] == record["input_size"] == [64, 96]
    groups = record["groups"]
    for key in ("params", "trainable_params", "flops"):
        assert sum(g[key] for g in groups.values()) == record["total"][key]
    assert groups["roi_heads.mask_head"]["flops"] > 0 and record["detections"] == 20  # box_detections_per_img
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert f"{record['total']['flops'] / 1e9:.3f}" in total_line


@pytest.mark.parametrize("size", [["0"], ["64px"], ["64", "64", "64"], ["16", "64"]])
def test_bad_size_is_one_line(load_tool, capsys, size):
    assert load_tool("analyze").main(["--config", TINY, "--size", *size]) == 2
    assert _one_error_line(capsys).startswith(f"error: --size: expected S or H W in whole pixels >= 32, got {' '.join(size)!r}")


def test_bad_config_is_one_line(load_tool, capsys, tmp_path):
    tool = load_tool("analyze")
    assert tool.main(["--config", TINY, "--set", "model.backbone.depht=18"]) == 2
    assert "unknown key 'model.backbone.depht'" in _one_error_line(capsys)
    assert tool.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert _one_error_line(capsys) == f"error: config file not found: {tmp_path / 'nope.yaml'}"
