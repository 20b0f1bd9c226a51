"""tools/print_config.py: the resolved config, origins, the key reference, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detection.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "base")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_print_config_prints_the_resolved_config(load_tool, tmp_path, capsys):
    tool = load_tool("print_config")
    path = write(tmp_path, "exp.yaml", "model: {arch: faster_rcnn}\n")
    assert (
        tool.main(["--config", str(path), "--set", "train.batch_size=5", "model.backbone.name=resnet18"]) == 0
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["arch"] == "faster_rcnn"
    assert resolved["train"]["batch_size"] == 5
    assert resolved["model"]["backbone"]["name"] == "resnet18"
    assert resolved["train"]["optimizer"]["lr"] == 0.02
    assert resolved["model"]["head"] == {}

    assert tool.main(["--config", str(path), "--show-origin"]) == 0
    assert f"arch: faster_rcnn  # {path}" in capsys.readouterr().out


def test_reference_lists_every_key_with_type_default_and_range(load_tool, capsys):
    tool = load_tool("print_config")
    assert tool.main(["--reference"]) == 0
    out = capsys.readouterr().out
    assert "data.train.ann_file  (str or null; default: null)" in out
    assert "train.optimizer.lr  (float; default: 0.02; > 0)" in out
    assert "model.head  (section: HeadConfig)" in out
    assert "model.head.box_score_thresh  (float or null; default: null; in [0, 1])" in out
    assert "model.head.box_head_convs  (list of int or null; default: null; >= 1)" in out
    assert "model.head.center_sampling_radius  (float or null; default: null; > 0)" in out
    block = out.split("model.head.center_sampling_radius  ", 1)[1].split("\n\n", 1)[0]
    assert " ".join(block.split()).endswith("Applies to the FCOS arch (fcos).")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_recipe_prints_and_round_trips(load_tool, capsys, tmp_path, recipe):
    tool = load_tool("print_config")
    assert tool.main(["--config", str(recipe)]) == 0
    printed = write(tmp_path, "printed.yaml", capsys.readouterr().out)
    cfg = load_config(recipe)
    assert load_config(printed) == cfg
    assert yaml.safe_load(printed.read_text()) == config_to_dict(cfg)


def test_print_config_reports_one_line_errors(load_tool, tmp_path, capsys):
    tool = load_tool("print_config")
    path = write(tmp_path, "bad.yaml", "model:\n  backbone:\n    trainable_layers: 3\n")
    assert tool.main(["--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {path}: unknown key 'model.backbone.trainable_layers'")

    assert tool.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"error: config file '{tmp_path / 'missing.yaml'}' not found\n"

    broken = write(tmp_path, "broken.yaml", "a: [1\n")
    assert tool.main(["--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {broken}: invalid YAML at line 2")

    assert tool.main(["--set", "oops"]) == 2
    assert capsys.readouterr().err.startswith("error: --set: malformed override 'oops'")


def test_head_typo_is_one_line_with_the_closest_key(load_tool, tmp_path, capsys):
    tool = load_tool("print_config")
    path = write(tmp_path, "typo.yaml", "model:\n  head:\n    box_score_tresh: 0.1\n")
    assert tool.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        f"error: {path}: unknown key 'model.head.box_score_tresh' (did you mean 'box_score_thresh'?)"
    )


def test_print_config_help_returns_zero(load_tool, capsys):
    tool = load_tool("print_config")
    assert tool.main(["--help"]) == 0
    assert "--show-origin" in capsys.readouterr().out
    assert tool.main(["--no-such-flag"]) == 2
