"""Smoke test of tools/bench_data.py on a tiny generated shapes set."""

from __future__ import annotations

import argparse
import json
import re


def test_bench_data_runs_and_reports(shapes_paths, load_tool, tmp_path, capsys):
    tool = load_tool("bench_data")
    parser = argparse.ArgumentParser()
    tool.add_arguments(parser)
    args = parser.parse_args(
        [
            "--ann-file",
            str(shapes_paths["val_ann"]),
            "--img-dir",
            str(shapes_paths["val_img_dir"]),
            "--workers",
            "0",
            "--batch-size",
            "1",
            "--epochs",
            "2",
            "--warmup",
            "1",
            "--jitter-size",
            "96",
        ]
    )
    result = tool.run(args)
    rows = {(r["pipeline"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("ours", 0), ("torchvision", 0)}
    for row in rows.values():
        assert row["images"] == 2 * 4 - 1  # two passes over 4 images, first batch untimed
        assert row["seconds"] > 0 and row["img_per_s"] == row["images"] / row["seconds"]
    assert result["config"]["images_ours"] == result["config"]["images_torchvision"] == 4

    out_json = tmp_path / "bench.json"
    argv = [
        "--ann-file",
        str(shapes_paths["val_ann"]),
        "--img-dir",
        str(shapes_paths["val_img_dir"]),
        "--workers",
        "0",
        "--epochs",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "1",
        "--json",
        str(out_json),
    ]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| workers | ours img/s | torchvision img/s | ours / torchvision |" in printed
    assert re.search(r"^\| 0 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", printed, re.MULTILINE)
    saved = json.loads(out_json.read_text())
    assert [r["pipeline"] for r in saved["rows"]] == ["ours", "torchvision"]


def test_bench_data_errors(load_tool, tmp_path, capsys):
    tool = load_tool("bench_data")
    assert tool.main(["--help"]) == 0
    assert tool.main(["--data-root", str(tmp_path / "missing")]) == 1
    assert (
        f"annotation file not found: {tmp_path / 'missing' / 'annotations' / 'instances.json'}"
        in capsys.readouterr().err
    )
