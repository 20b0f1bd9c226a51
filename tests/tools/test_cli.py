"""The command-line tools: help, one-line errors, and real runs on tiny inputs."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["train_det", "eval_det", "infer_det", "print_config", "make_shapes", "benchmark", "bench_model", "bench_data", "bench_eval", "analyze"]


@pytest.mark.parametrize("name", TOOLS)
def test_help(load_tool, name, capsys):
    try:
        code = load_tool(name).main(["--help"])
    except SystemExit as exit_:  # argparse exits after printing help; some tools catch it and return 0
        code = exit_.code
    assert code == 0
    assert "usage:" in capsys.readouterr().out


def test_missing_config_is_one_line(load_tool, capsys, tmp_path):
    code = load_tool("train_det").main(["--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def test_unknown_key_on_the_command_line_is_one_line(load_tool, capsys):
    code = load_tool("train_det").main(["--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--set", "train.lr=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --set: unknown key 'train.lr'") and "train.optimizer.lr" in err
    assert "Traceback" not in err


def test_missing_data_path_is_one_line(load_tool, capsys, tmp_path):
    code = load_tool("train_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--output-dir", str(tmp_path),
        "--set", "data.source=coco", f"data.train.ann_file={tmp_path}/missing.json", f"data.train.img_dir={tmp_path}",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: data.train.ann_file: annotation file not found: {tmp_path}/missing.json"


def test_missing_weights_is_one_line(load_tool, capsys, tmp_path):
    code = load_tool("eval_det").main(["--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--weights", str(tmp_path / "w.pth"),
                                       "--set", f"data.shapes.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: weights file not found: {tmp_path / 'w.pth'}"


def test_eval_det_scores_a_results_file(load_tool, coco128, tmp_path, capsys):
    ann = coco128 / "annotations" / "instances.json"
    gt = json.loads(ann.read_text())
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"] if not a["iscrowd"]
    ]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(results))
    code = load_tool("eval_det").main(["--results", str(path), "--ann", str(ann), "--output-dir", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bbox/AP"] == pytest.approx(100.0)
    assert "segm/AP" not in metrics


def test_eval_det_flag_combinations(load_tool, capsys):
    tool = load_tool("eval_det")
    with pytest.raises(SystemExit):
        tool.main(["--results", "x.json"])
    assert "--results and --ann go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([])
    assert "give --config and --weights" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, load_tool):
    out = tmp_path_factory.mktemp("cli-run")
    cache = tmp_path_factory.mktemp("cli-shapes")
    code = load_tool("train_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--output-dir", str(out),
        "--set", f"data.shapes.cache_dir={cache}", "train.max_iters=2",
    ])
    assert code == 0
    return out, cache


def test_train_then_eval_and_infer_from_the_command_line(load_tool, trained, tmp_path):
    out, cache = trained
    assert (out / "metrics.json").is_file()
    code = load_tool("eval_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--weights", str(out / "model_final.pth"),
        "--output-dir", str(tmp_path / "eval"), "--set", f"data.shapes.cache_dir={cache}",
    ])
    assert code == 0
    first = json.loads((out / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["bbox/AP"] == pytest.approx(first["bbox/AP"])
    code = load_tool("eval_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--weights", str(out / "model_final.pth"),
        "--output-dir", str(tmp_path / "eval_fast"), "--optimize", "--set", f"data.shapes.cache_dir={cache}",
    ])
    assert code == 0
    fast = json.loads((tmp_path / "eval_fast" / "metrics.json").read_text())
    assert fast.keys() == again.keys()
    for key in ("bbox/AP", "bbox/AP50", "segm/AP"):  # BN folding changes outputs by ~1e-6 only
        assert fast[key] == pytest.approx(again[key], abs=0.5), key
    images = sorted((next(cache.iterdir()) / "val" / "images").iterdir())
    code = load_tool("infer_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--weights", str(out / "model_final.pth"),
        "--input", str(images[0].parent), "--output-dir", str(tmp_path / "infer"), "--score-threshold", "0.0",
    ])
    assert code == 0
    for image in images:
        assert (tmp_path / "infer" / f"{image.stem}.png").is_file()
    results = json.loads((tmp_path / "infer" / "results.json").read_text())
    index = json.loads((tmp_path / "infer" / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == list(range(1, len(images) + 1))
    assert index["class_names"] == ["__background__", "circle", "square", "triangle"]
    assert all(r["category_id"] in (1, 2, 3) and "segmentation" in r for r in results)


def test_infer_det_missing_input(load_tool, trained, tmp_path, capsys):
    out, _ = trained
    code = load_tool("infer_det").main([
        "--config", str(REPO / "configs/smoke/tiny_cpu.yaml"), "--weights", str(out / "model_final.pth"),
        "--input", str(tmp_path / "nothing"),
    ])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --input: no such file or folder: {tmp_path / 'nothing'}"


def test_every_config_resolves():
    from detection.config import load_config

    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 20
    for path in configs:
        if path.parent.name == "base":
            continue
        cfg = load_config(path)
        assert cfg.model.arch


@pytest.mark.parametrize("name", ["quickstart.yaml", "mask_rcnn_r50_fpn_1x_coco.yaml", "retinanet_r50_fpn_1x_coco.yaml"])
def test_recipes_state_their_published_result(name):
    text = (REPO / "configs" / name).read_text()
    assert re.search(r"\d+\.\d+ (box|mask) AP|box AP", text), name


def test_quickstart_pipeline_short(load_tool, tmp_path):
    """The README's first command, shortened: same config and outputs, a few iterations on a small split."""
    from PIL import Image

    out = tmp_path / "qs"
    code = load_tool("train_det").main([
        "--config", str(REPO / "configs/quickstart.yaml"), "--output-dir", str(out),
        "--set", f"data.shapes.cache_dir={tmp_path / 'shapes'}", "data.shapes.num_train=8", "data.shapes.num_val=4",
        "train.max_iters=3", "train.log_period=1", "data.num_workers=0",
    ])
    assert code == 0
    for png in ("predictions.png", "curves.png"):
        with Image.open(out / png) as img:
            img.load()
            assert img.size[0] >= 200 and img.size[1] >= 200, png
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl",
                "segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl"):
        assert key in metrics, key
    for cls in ("circle", "square", "triangle"):
        assert f"bbox/AP-{cls}" in metrics and f"segm/AP-{cls}" in metrics
    assert (out / "model_final.pth").is_file()


def test_curves_are_skipped_with_one_warning_without_matplotlib(monkeypatch, tmp_path):
    import sys

    from detection.visualize import save_curves

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    records = [{"type": "train", "iteration": 1, "loss": 1.0, "lr": 0.1}]
    with pytest.warns(UserWarning, match="matplotlib is not installed") as caught:
        assert save_curves(records, tmp_path / "curves.png") is None
    assert len(caught) == 1
    assert not (tmp_path / "curves.png").exists()
