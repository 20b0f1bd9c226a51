"""tools/infer_det.py: results named by COCO id or file stem, bad images skipped, output scored by eval_det."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from detection.config import load_config
from detection.data import CategoryMapping
from detection.run import class_labels
from detection.trainer import train

REPO = Path(__file__).resolve().parents[2]
IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


@pytest.fixture(scope="module")
def tiny_run(coco128, tmp_path_factory) -> Path:
    """A Mask R-CNN trained for 2 iterations on the real COCO subset at 64 px (box_score_thresh=0: it detects)."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "smoke" / "tiny_cpu.yaml", [
        "data.source=coco", f"data.train.ann_file={coco128 / 'annotations' / 'instances.json'}",
        f"data.train.img_dir={coco128 / 'images'}", "model.backbone.base_channels=32",
        "model.backbone.fpn.out_channels=32", "model.min_size=64", "model.max_size=64",
        "model.head.box_score_thresh=0.0", "train.max_iters=2", "train.checkpoint_period=0", "data.train.augment=[]",
    ])
    train(cfg, output_dir=out, log=lambda s: None)
    return out


@pytest.fixture
def folder(coco128, tmp_path) -> Path:
    """Three COCO images, renamed copies of them, and an unreadable file."""
    images = tmp_path / "images"
    images.mkdir()
    for name in IMAGES:
        shutil.copy(coco128 / "images" / name, images / name)
    (images / "000000000034.jpg").write_bytes(b"not an image")  # listed in the annotations, unreadable
    return images


def _images_json(out: Path) -> dict:
    return json.loads((out / "images.json").read_text())


def test_with_ann_results_carry_coco_ids_and_eval_det_scores_them(load_tool, tiny_run, folder, coco128, tmp_path, capsys):
    ann = coco128 / "annotations" / "instances.json"
    out = tmp_path / "out"
    rc = load_tool("infer_det").main(["--weights", str(tiny_run), "--input", str(folder), "--ann", str(ann),
                                      "--output-dir", str(out), "--score-threshold", "0"])
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cannot read image {folder / '000000000034.jpg'}: ")
    assert err[0].endswith("; skipped")
    coco_ids = {Path(im["file_name"]).name: im["id"] for im in json.loads(ann.read_text())["images"]}
    listed = _images_json(out)["images"]
    assert {im["id"]: Path(im["file_name"]).name for im in listed} == {coco_ids[n]: n for n in IMAGES}
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {coco_ids[n] for n in IMAGES}
    assert {r["category_id"] for r in results} <= {c["id"] for c in json.loads(ann.read_text())["categories"]}
    rc = load_tool("eval_det").main(["--results", str(out / "results.json"), "--ann", str(ann),
                                     "--output-dir", str(out / "eval")])
    assert rc == 0
    assert "bbox/AP" in json.loads((out / "eval" / "metrics.json").read_text())


def test_without_ann_ids_are_file_stems(load_tool, tiny_run, folder, tmp_path, capsys):
    shutil.copy(folder / IMAGES[0], folder / "holiday.jpg")
    out = tmp_path / "out"
    assert load_tool("infer_det").main(["--weights", str(tiny_run / "model_final.pth"), "--input", str(folder),
                                        "--output-dir", str(out), "--score-threshold", "0"]) == 0
    ids = {Path(im["file_name"]).name: im["id"] for im in _images_json(out)["images"]}
    assert ids == {"000000000009.jpg": 9, "000000000025.jpg": 25, "000000000030.jpg": 30, "holiday.jpg": 35}
    assert {r["image_id"] for r in json.loads((out / "results.json").read_text())} == set(ids.values())
    assert (out / "holiday.png").is_file()
    assert capsys.readouterr().err.count("; skipped\n") == 1


def test_on_bad_image_error_stops_with_one_line_and_keeps_the_results_so_far(load_tool, tiny_run, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = load_tool("infer_det").main(["--weights", str(tiny_run), "--input", str(folder), "--output-dir", str(out),
                                      "--on-bad-image", "error"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read image {folder / '000000000034.jpg'}")
    assert [im["id"] for im in _images_json(out)["images"]] == [9, 25, 30]  # sorted files: the bad one is last


def test_stem_ids_are_numbers_without_clashes(load_tool):
    files = [Path(n) for n in ("0007.jpg", "a.png", "7.png", "12.jpg", "b.jpg")]
    assert load_tool("infer_det").stem_ids(files) == [7, 13, 14, 12, 15]


def test_help_shows_the_defaults(load_tool, capsys):
    with pytest.raises(SystemExit):
        load_tool("infer_det").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5)" in text and "(default: skip)" in text


def test_labels_come_from_the_stored_category_mapping(capsys):
    mapping = CategoryMapping([{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}])
    names, to_cat_id = class_labels(mapping, 3, "ckpt.pth")
    assert names == ["__background__", "dog", "cat"]
    assert [to_cat_id(1), to_cat_id(2)] == [3, 7]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("num_classes", [4, 91])  # 91: no special case for torchvision's COCO models
def test_without_a_mapping_labels_are_plain_class_numbers(num_classes, capsys):
    names, to_cat_id = class_labels(None, num_classes, "weights.pth")
    assert names == ["__background__"] + [f"class {i}" for i in range(1, num_classes)]
    assert to_cat_id(2) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"weights.pth: no category mapping stored; labels are named 'class 1'..'class {num_classes - 1}' and "
        f"written as category ids 1..{num_classes - 1}"
    ]
