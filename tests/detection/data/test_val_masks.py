"""A validation file's masks are checked when evaluation will score segm: bad ones never reach COCOeval."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from detection.config import load_config
from detection.data import CocoDetection, DatasetError
from detection.experiment import Run, build_datasets

H, W = 30, 40
BAD_RLE = {"size": [H, W], "counts": [10, 5, 20]}  # sums to 35 pixels, not 1200
PROBLEM = "has RLE counts summing to 35 pixels, not height x width = 1200"


@pytest.fixture
def val_file(write_coco, make_ann):
    anns = [make_ann(1, 1, 1, [1, 1, 9, 9]), make_ann(7, 1, 1, [2, 2, 9, 9], segmentation=BAD_RLE)]
    return write_coco([{"id": 1, "width": W, "height": H}], anns)


def test_check_masks_without_decoding_them(val_file):
    ann_file, img_dir = val_file
    with pytest.raises(DatasetError, match=re.escape(f"{ann_file}: annotation 7 (image 1) {PROBLEM}; fix it, or set "
                                                     "data.on_bad_annotation: skip")):
        CocoDetection(ann_file, img_dir, train=False, with_masks=False, check_masks=True)
    _, target = CocoDetection(ann_file, img_dir, train=False, with_masks=False)[0]  # unchecked: as before
    assert "masks" not in target and len(target["boxes"]) == 2


def test_skip_drops_the_annotation_from_the_targets_and_the_ground_truth(val_file):
    ann_file, img_dir = val_file
    with pytest.warns(UserWarning, match=re.escape(f"ids 7; first: annotation 7 {PROBLEM}")):
        ds = CocoDetection(ann_file, img_dir, train=False, with_masks=False, check_masks=True,
                           on_bad_annotation="skip")
    _, target = ds[0]
    assert "masks" not in target and len(target["boxes"]) == 1
    assert sorted(ds.coco.anns) == [1] and ds.coco.getAnnIds(imgIds=[1]) == [1]  # what COCOeval reads


def _coco128_with_bad_val_rle(tmp_path, coco128):
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    ann = next(a for a in data["annotations"] if isinstance(a["segmentation"], list))
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["segmentation"] = {"size": [image["height"], image["width"]], "counts": "@@@!!"}
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    return path, ann


@pytest.mark.parametrize(("overrides", "checked"), [
    (["model.arch=mask_rcnn"], True),
    (["model.arch=mask_rcnn", "eval.iou_types=[bbox]"], False),
    (["model.arch=faster_rcnn"], False),
])
def test_build_datasets_checks_val_masks_when_segm_is_scored(tmp_path, coco128, overrides, checked):
    val, ann = _coco128_with_bad_val_rle(tmp_path, coco128)
    cfg = load_config(None, [*overrides, "train.device=cpu"])
    run = Run(cfg, tmp_path / "run", log=lambda line: None)
    paths = {"val_ann": val, "val_img": coco128 / "images"}
    if not checked:
        _, val_set = build_datasets(run, paths, train=False)
        assert ann["id"] in val_set.coco.anns
        return
    message = f"{val}: annotation {ann['id']} (image {ann['image_id']}) has a compressed RLE string that does not decode"
    with pytest.raises(DatasetError, match=re.escape(message)):
        build_datasets(run, paths, train=False)
    skip = Run(load_config(None, [*overrides, "train.device=cpu", "data.on_bad_annotation=skip"]), tmp_path / "run",
               log=lambda line: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, val_set = build_datasets(skip, paths, train=False)
    assert ann["id"] not in val_set.coco.anns
    assert any(f"ids {ann['id']}; first: annotation {ann['id']} has a compressed RLE" in str(w.message) for w in caught)
