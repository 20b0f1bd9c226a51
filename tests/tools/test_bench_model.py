"""tools/benchmark.py model on a tiny configuration: behaviour only, no timing assertions."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_model_benchmark_tiny(load_tool, tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = load_tool("benchmark").main([
        "model", "--arch", "mask_rcnn", "--size", "64", "--batch", "1", "--repeats", "1", "--warmup", "0",
        "--fast", "--what", "backbone", "inference", "train", "memory", "--json", str(out), "--markdown", str(md),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    whats = [row["what"] for row in result["rows"]]
    assert whats[0].startswith("backbone+FPN forward (resnet50, batch 1, fp32)")
    assert any(w.startswith("mask_rcnn inference, 1 image 64px, ours fast fp32 vs torchvision fp32") for w in whats)
    assert any(w.startswith("mask_rcnn train step, batch 1 at 64px, fp32") for w in whats)
    for row in result["rows"]:
        assert row["ratio"] > 0
    memory = [row for row in result["rows"] if "ours_ckpt_mib" in row]
    assert memory and memory[0]["same_loss"] is True
    inference = [row for row in result["rows"] if "inference" in row["what"]][-1]
    assert inference["ours_box_dtype"] == "torch.float32"
    assert "| measurement | ours | torchvision | ours / torchvision |" in md.read_text()
    assert "Machine:" in capsys.readouterr().out
