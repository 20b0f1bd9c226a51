"""Which dataset a config selects: split paths mean COCO data, a same-file conflict is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detection.config import ConfigError, load_config
from detection.config.data import check_source_conflict

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _subset(coco128: Path, tmp_path: Path, n: int = 2) -> Path:
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    images = [im for im in data["images"] if any(a["image_id"] == im["id"] for a in data["annotations"])][:n]
    ids = {im["id"] for im in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(data))
    return path


def test_paths_over_a_shapes_base_select_coco(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [f"data.train.ann_file={tmp_path / 'a.json'}", f"data.train.img_dir={tmp_path}"])
    assert cfg.data.source == "coco"
    assert load_config(QUICKSTART).data.source == "shapes"


def test_shapes_and_paths_in_one_file_conflict(tmp_path: Path) -> None:
    tree = {"data": {"source": "shapes", "train": {"ann_file": "a.json", "img_dir": "imgs"}}}
    origins = {"data": "x.yaml", "data.source": "x.yaml", "data.train": "x.yaml",
               "data.train.ann_file": "x.yaml", "data.train.img_dir": "x.yaml"}
    with pytest.raises(ConfigError, match=r"x.yaml: data.source is 'shapes' but data.train.ann_file"):
        check_source_conflict(tree, origins)
    check_source_conflict(tree, {**origins, "data.train.ann_file": "--set", "data.train.img_dir": "--set"})


def test_train_det_uses_the_given_coco_files(coco128: Path, tmp_path: Path, load_tool, capsys) -> None:
    ann = _subset(coco128, tmp_path)
    images = coco128 / "images"
    out = tmp_path / "run"
    code = load_tool("train_det").main([
        "--config", str(QUICKSTART), "--output-dir", str(out), "--set",
        f"data.train.ann_file={ann}", f"data.train.img_dir={images}",
        f"data.val.ann_file={ann}", f"data.val.img_dir={images}",
        "model.min_size=64", "model.max_size=64", "train.max_iters=1", "train.batch_size=1",
        "train.schedule.warmup_iters=0", "data.num_workers=0", "eval.num_vis_images=0", "train.device=cpu",
        "train.amp.enabled=false",
    ])
    assert code == 0
    text = capsys.readouterr()
    log = text.out + text.err
    assert f"data.train: annotations {ann}, images {images}" in log
    assert "shapes" not in log.lower().replace("quickstart", "")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics


def test_reference_gives_val_its_own_text(load_tool, capsys) -> None:
    assert load_tool("print_config").main(["--reference"]) == 0
    reference = capsys.readouterr().out
    val = {line.split()[0] for line in reference.splitlines() if line.startswith("data.val.")}
    assert val == {"data.val.ann_file", "data.val.img_dir"}
    assert "data.train.augment" in reference and "data.train.filter_empty" in reference
    section = reference[reference.index("data.val  ("):reference.index("data.val.ann_file")]
    assert "validation split" in section and "training" not in section


def test_val_paths_alone_ask_for_training_paths(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, [f"data.val.ann_file={tmp_path / 'v.json'}", f"data.val.img_dir={tmp_path}"])
    assert cfg.data.source == "coco"
    with pytest.raises(ConfigError, match=r"data.val.ann_file is set, which selects COCO data, but data.train"):
        cfg.data.validate_for_training()
