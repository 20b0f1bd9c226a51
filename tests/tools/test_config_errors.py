"""Config mistakes stop every tool at load time: exit 2, one line naming the key and the closest valid value."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/smoke/tiny_cpu.yaml")

CASES = {
    "augment name": ("data.train.augment=[{name: hflip}]",
                     "--set: data.train.augment[0].name is 'hflip', not a known transform (did you mean 'horizontal_flip'?)"),
    "augment parameter": ("data.train.augment=[{name: horizontal_flip, prob: 0.5}]",
                          "--set: data.train.augment[0] is invalid: 'horizontal_flip': unknown parameter(s) ['prob']"),
    "augment value": ("data.train.augment=[{name: horizontal_flip, p: 2}]",
                      "--set: data.train.augment[0] is invalid: 'horizontal_flip': invalid parameters {'p': 2}"),
    "head option": ("model.head.box_score_tresh=0.1",
                    "--set: unknown key 'model.head.box_score_tresh' (did you mean 'box_score_thresh'?)"),
    "anchor levels": ("model.anchor_sizes=[[16],[32]]", "--set: model.anchor_sizes has 2 size list(s)"),
    "aspect ratios": ("model.aspect_ratios=[0]", "--set: model.aspect_ratios must hold numbers > 0"),
}


def _argv(tool: str, tmp_path: Path) -> list[str]:
    weights = str(tmp_path / "model.pth")
    return {
        "train_det": ["--output-dir", str(tmp_path / "run")],
        "eval_det": ["--weights", weights, "--output-dir", str(tmp_path / "run")],
        "infer_det": ["--weights", weights, "--input", str(tmp_path), "--output-dir", str(tmp_path / "run")],
        "print_config": [],
    }[tool]


@pytest.mark.parametrize("tool", ["train_det", "eval_det", "infer_det", "print_config"])
@pytest.mark.parametrize("case", list(CASES))
def test_config_mistake_is_one_line_before_any_data(load_tool, capsys, tmp_path, tool, case):
    override, expected = CASES[case]
    cache = tmp_path / "shapes"
    argv = ["--config", TINY, *_argv(tool, tmp_path), "--set", override, f"data.shapes.cache_dir={cache}"]
    code = load_tool(tool).main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {expected}"), err
    assert not cache.exists() and not (tmp_path / "run").exists()  # nothing was built or written
