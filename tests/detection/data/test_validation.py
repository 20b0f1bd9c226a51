"""Annotations and image files are checked when the dataset is built, each problem named."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detection.data import CocoDetection, DatasetError
from detection.data.files import locate_images

H, W = 30, 40


def _image(image_id: int = 1, **extra):
    return {"id": image_id, "width": W, "height": H, **extra}


def _rle(h: int = H, w: int = W) -> dict:
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[2:9, 3:12] = 1
    rle = mask_utils.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _short_string() -> str:
    """A well-formed compressed RLE string covering 35 pixels: pycocotools decodes it to stale memory."""
    return mask_utils.frPyObjects({"size": [H, W], "counts": [10, 5, 20]}, H, W)["counts"].decode("ascii")


BAD_SEGMENTATIONS = [
    ({"size": [H, W], "counts": [10, 5, 20]}, "has RLE counts summing to 35 pixels, not height x width = 1200"),
    ({"size": [H, W], "counts": _short_string()}, "has RLE counts summing to 35 pixels, not height x width = 1200"),
    ({"size": [H, W], "counts": "abc~~~"}, "has a compressed RLE string that does not decode"),
    ([[1, 1, 5, 1]], "has polygon 0 with 2 point(s); a polygon needs at least 3"),
    ([[1, 1, 5, 1, 5]], "has polygon 0 of odd length 5"),
    ([], "has an empty segmentation list (no polygon)"),
    ([[1, 1, 5, 1, float("nan"), 5]], "has polygon 0 with a coordinate that is not a finite number"),
]


@pytest.mark.parametrize(("segmentation", "problem"), BAD_SEGMENTATIONS)
def test_invalid_masks_are_errors_naming_annotation_image_and_file(write_coco, make_ann, segmentation, problem):
    anns = [make_ann(1, 1, 1, [1, 1, 9, 9]), make_ann(7, 1, 1, [2, 2, 9, 9], segmentation=segmentation)]
    ann_file, img_dir = write_coco([_image()], anns)
    with pytest.raises(DatasetError, match=re.escape(f"{ann_file}: annotation 7 (image 1) {problem}")):
        CocoDetection(ann_file, img_dir, train=True)
    # without masks the segmentation is never read
    assert len(CocoDetection(ann_file, img_dir, train=True, with_masks=False)) == 1


@pytest.mark.parametrize(("segmentation", "problem"), BAD_SEGMENTATIONS[:2])
def test_skip_drops_invalid_masks_with_a_named_warning(write_coco, make_ann, segmentation, problem):
    anns = [make_ann(1, 1, 1, [1, 1, 9, 9]), make_ann(7, 1, 1, [2, 2, 9, 9], segmentation=segmentation)]
    ann_file, img_dir = write_coco([_image()], anns)
    with pytest.warns(UserWarning, match=re.escape("skipped 1 annotation(s) with an invalid segmentation")) as rec:
        ds = CocoDetection(ann_file, img_dir, train=True, on_bad_annotation="skip")
    assert "ids 7; first: annotation 7 " + problem in str(rec[0].message)
    _, target = ds[0]
    assert target["masks"].shape[0] == 1 and set(np.unique(target["masks"].numpy())) <= {0, 1}


def test_valid_rles_decode_to_their_masks(write_coco, make_ann):
    rle = _rle()
    anns = [make_ann(3, 1, 1, [3, 2, 9, 7], segmentation=rle),
            make_ann(4, 1, 1, [3, 2, 9, 7], segmentation={"size": [H, W], "counts": [H * W]})]
    ann_file, img_dir = write_coco([_image()], anns)
    _, target = CocoDetection(ann_file, img_dir, train=True)[0]
    assert int(target["masks"][0].sum()) == 63 and int(target["masks"][1].sum()) == 0


def test_dropped_boxes_are_listed_by_id(write_coco, make_ann):
    anns = [make_ann(100 + i, 1, 1, [1, 1, 0.5, 5]) for i in range(12)] + [make_ann(1, 1, 1, [1, 1, 9, 9])]
    ann_file, img_dir = write_coco([_image()], anns)
    with pytest.warns(UserWarning) as rec:
        CocoDetection(ann_file, img_dir, train=True)
    ids = ", ".join(str(100 + i) for i in range(10))
    assert f"dropped 12 annotation(s) whose box is narrower or shorter than 1 px after clipping to the image: ids {ids}, ... (12 in all)" in str(rec[0].message)


def test_zero_usable_images_is_an_error(write_coco, make_ann):
    images = [_image(1, pil=False), _image(2, pil=False)]
    ann_file, img_dir = write_coco(images, [make_ann(i, i, 1, [1, 1, 9, 9]) for i in (1, 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match=re.escape(f"{ann_file}: no usable images: none of the image files")):
            CocoDetection(ann_file, img_dir, train=True, on_bad_image="skip")
    ann_file, img_dir = write_coco([_image(3)], [make_ann(3, 3, 1, [1, 1, 0.2, 9])], name="empty.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="no usable images: no image has a usable annotation .*filter_empty"):
            CocoDetection(ann_file, img_dir, train=True)


def test_paths_outside_the_image_folder_are_refused(write_coco, make_ann, tmp_path):
    ann_file, img_dir = write_coco([_image(1)], [make_ann(1, 1, 1, [1, 1, 9, 9])])
    (tmp_path / "secret.png").write_bytes((img_dir / "1.png").read_bytes())
    ann_file, img_dir = write_coco([_image(1, file_name="../secret.png", pil=False)],
                                   [make_ann(1, 1, 1, [1, 1, 9, 9])], name="outside.json")
    with pytest.raises(DatasetError, match=re.escape(
        f"{ann_file}: 1 image file_name(s) resolve outside the image folder {img_dir}, first: image 1 "
        "'../secret.png'; fix them, or set data.allow_paths_outside_img_dir: true")):
        CocoDetection(ann_file, img_dir, train=True)
    ds = CocoDetection(ann_file, img_dir, train=True, allow_paths_outside_img_dir=True)
    assert ds[0][0].shape == (3, H, W)


def test_existence_check_is_fast_for_coco_size_lists(tmp_path):
    for i in range(50):
        (tmp_path / f"{i:012d}.jpg").touch()
    names = [f"{i:012d}.jpg" for i in range(120_000)]
    t0 = time.perf_counter()
    found = locate_images(tmp_path, names)
    assert time.perf_counter() - t0 < 1.0
    assert found.missing == list(range(50, 120_000)) and found.outside == []
    assert locate_images(tmp_path, ["/etc/passwd", "a/../../x.jpg", "sub/../1.jpg"]).outside == [0, 1]
