"""CocoDetection: output format, masks, crowd/degenerate/empty handling, image modes, EXIF, validation errors."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from detection.data import (
    CategoryMapping,
    CocoDetection,
    DatasetError,
    SkippedImage,
    build_dataloader,
)


def _one_image(image_id: int = 1, width: int = 40, height: int = 30, **extra):
    return [{"id": image_id, "width": width, "height": height, **extra}]


# ---------------------------------------------------------------------------------------------------------
# Format on the shapes dataset
# ---------------------------------------------------------------------------------------------------------


def test_item_format_and_masks_match_pycocotools(shapes_paths):
    ds = CocoDetection(shapes_paths["val_ann"], shapes_paths["val_img_dir"], train=False)
    assert len(ds) == 4 and ds.ids == [1, 2, 3, 4]
    assert ds.image_sizes() == [(64, 96)] * 4
    assert ds.coco.imgs[ds.ids[0]] == {"id": 1, "file_name": "000001.png", "height": 64, "width": 96}
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 96)
        assert image.is_contiguous()
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == (64, 96)
        assert target["area"].dtype == torch.float32
        assert target["iscrowd"].dtype == torch.int64
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert target["orig_size"].tolist() == [64, 96]
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[ds.ids[i]]))
        assert len(anns) == len(target["labels"]) >= 1
        for k, ann in enumerate(anns):
            assert np.array_equal(target["masks"][k].numpy(), ds.coco.annToMask(ann))
            x, y, w, h = ann["bbox"]
            assert target["boxes"][k].tolist() == pytest.approx([x, y, x + w, y + h])
            assert ds.categories.to_cat_id(int(target["labels"][k])) == ann["category_id"]
            assert float(target["area"][k]) == pytest.approx(ann["area"])
        # image pixels round-trip: the decoded PNG, scaled to [0, 1]
        raw = np.array(Image.open(ds.img_dir / ds.coco.imgs[ds.ids[i]]["file_name"]))
        assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(raw))


def test_imports_stay_lazy():
    """pycocotools, albumentations and OpenCV are imported inside functions only (a GPU box may lack them)."""
    import ast

    import detection.data as package

    optional = {"pycocotools", "albumentations", "cv2"}
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        # nodes reachable without entering a function body
        in_functions = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in top_level:
            if id(node) in in_functions:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not {n.split(".")[0] for n in names} & optional, (
                f"{path.name}:{node.lineno} imports {names}"
            )


# ---------------------------------------------------------------------------------------------------------
# Category mapping
# ---------------------------------------------------------------------------------------------------------


def test_category_mapping_with_gaps_round_trips():
    m = CategoryMapping([{"id": 9, "name": "c"}, {"id": 1, "name": "a"}, {"id": 5, "name": "b"}])
    assert m.cat_ids == (1, 5, 9)
    assert m.names == ["__background__", "a", "b", "c"]
    assert m.num_classes == 4
    assert [m.to_label(i) for i in (1, 5, 9)] == [1, 2, 3]
    assert [m.to_cat_id(k) for k in (1, 2, 3)] == [1, 5, 9]
    state = json.loads(json.dumps(m.state_dict()))
    assert state == {"categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]}
    assert CategoryMapping.from_state_dict(state) == m
    assert m != CategoryMapping([{"id": 1, "name": "a"}])
    with pytest.raises(KeyError, match=re.escape("unknown category id 2; known ids: [1, 5, 9]")):
        m.to_label(2)
    with pytest.raises(KeyError, match=re.escape("label 0 is outside 1..3 (0 is background)")):
        m.to_cat_id(0)


def test_category_mapping_rejects_bad_entries():
    with pytest.raises(DatasetError, match=re.escape("category ids must be unique; duplicated ids: [2]")):
        CategoryMapping([{"id": 2, "name": "x"}, {"id": 2, "name": "y"}])
    with pytest.raises(
        DatasetError, match=re.escape("category entry #0 has a non-integer id '1' (name 'x')")
    ):
        CategoryMapping([{"id": "1", "name": "x"}])
    with pytest.raises(
        DatasetError, match=re.escape("a CategoryMapping state must be a mapping with a 'categories'")
    ):
        CategoryMapping.from_state_dict({"cats": []})


def test_dataset_uses_contiguous_labels_for_gapped_ids(write_coco, make_ann):
    anns = [
        make_ann(1, 1, 9, [1, 1, 10, 10]),
        make_ann(2, 1, 1, [5, 5, 10, 10]),
        make_ann(3, 1, 5, [2, 2, 5, 5]),
    ]
    ann_file, img_dir = write_coco(_one_image(), anns)
    ds = CocoDetection(ann_file, img_dir, train=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [3, 1, 2]
    assert ds.categories.num_classes == 4


def test_category_mismatch_lists_the_difference(write_coco, make_ann):
    ann_file, img_dir = write_coco(
        _one_image(),
        [make_ann(1, 1, 1, [1, 1, 5, 5])],
        categories=[{"id": 1, "name": "a"}, {"id": 7, "name": "z"}],
    )
    train_mapping = CategoryMapping([{"id": 1, "name": "a"}, {"id": 5, "name": "b"}])
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann_file, img_dir, train=False, category_mapping=train_mapping)
    message = str(info.value)
    assert "categories differ from the given category_mapping" in message
    assert "only in the given category_mapping: 5 'b'" in message
    assert f"only in {ann_file}: 7 'z'" in message


def test_forced_mapping_is_kept_when_identical(write_coco, make_ann):
    ann_file, img_dir = write_coco(_one_image(), [make_ann(1, 1, 5, [1, 1, 5, 5])])
    mapping = CategoryMapping([{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}])
    ds = CocoDetection(ann_file, img_dir, train=False, category_mapping=mapping)
    assert ds.categories is mapping
    assert ds[0][1]["labels"].tolist() == [2]


# ---------------------------------------------------------------------------------------------------------
# Crowd, RLE, degenerate and empty
# ---------------------------------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros, as COCO writes crowd masks."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_crowd_dropped_in_train_kept_in_eval_with_rle_masks(write_coco, make_ann):
    crowd_mask = np.zeros((30, 40), dtype=np.uint8)
    crowd_mask[10:25, 20:38] = 1
    crowd_mask[12:14, 22:30] = 0
    compressed = mask_utils.encode(np.asfortranarray(crowd_mask))
    anns = [
        make_ann(1, 1, 1, [1, 1, 10, 8]),
        make_ann(2**40, 1, 5, [20, 10, 18, 15], iscrowd=1, segmentation=_uncompressed_rle(crowd_mask)),
        make_ann(
            3,
            1,
            9,
            [20, 10, 18, 15],
            segmentation={"size": [30, 40], "counts": compressed["counts"].decode()},
        ),
        make_ann(4, 1, 9, [0, 0, 40, 30], segmentation=[[0, 0, 5, 0, 5, 5, 0, 5], [30, 20, 39, 20, 39, 29]]),
    ]
    ann_file, img_dir = write_coco(_one_image(), anns)

    train = CocoDetection(ann_file, img_dir, train=True)
    _, t = train[0]
    assert t["iscrowd"].tolist() == [0, 0, 0]
    assert t["labels"].tolist() == [1, 3, 3]

    ev = CocoDetection(ann_file, img_dir, train=False)
    _, t = ev[0]
    assert t["iscrowd"].tolist() == [0, 1, 0, 0]
    for k, ann in enumerate(ev.coco.loadAnns(ev.coco.getAnnIds(imgIds=[1]))):
        assert np.array_equal(t["masks"][k].numpy(), ev.coco.annToMask(ann)), ann["id"]
    assert np.array_equal(t["masks"][1].numpy(), crowd_mask)
    assert np.array_equal(t["masks"][2].numpy(), crowd_mask)
    assert int(t["masks"][3].sum()) > 25  # both polygons of the multi-polygon are drawn
    assert t["masks"][3][22, 37] == 1 and t["masks"][3][2, 2] == 1


def test_degenerate_boxes_dropped_and_reported_once(write_coco, make_ann):
    images = _one_image(1) + _one_image(2) + _one_image(3)
    anns = [
        make_ann(1, 1, 1, [1, 1, 0.5, 10]),  # too narrow
        make_ann(2, 1, 1, [5, 5, 10, 10]),
        make_ann(3, 2, 5, [45, 5, 10, 10]),  # entirely right of the 40 px wide image
        make_ann(4, 2, 5, [35, -5, 10, 10]),  # partly outside: clipped to [35, 0, 40, 5]
        make_ann(5, 3, 9, [3, 3, 4, 4]),
    ]
    ann_file, img_dir = write_coco(images, anns)
    with pytest.warns(
        UserWarning, match=re.escape("dropped 2 annotation(s) whose box is narrower or shorter than 1 px after clipping to the image: ids 1, 3")
    ):
        ds = CocoDetection(ann_file, img_dir, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # items do not warn again
        targets = [ds[i][1] for i in range(len(ds))]
    assert [len(t["boxes"]) for t in targets] == [1, 1, 1]
    assert targets[1]["boxes"].tolist() == [[35.0, 0.0, 40.0, 5.0]]
    assert targets[1]["masks"].shape == (1, 30, 40)


def test_empty_images_filtered_or_kept(write_coco, make_ann):
    images = _one_image(1) + _one_image(2) + _one_image(3)
    anns = [make_ann(1, 1, 1, [1, 1, 10, 10]), make_ann(2, 3, 1, [1, 1, 10, 10], iscrowd=1)]
    ann_file, img_dir = write_coco(images, anns)

    assert CocoDetection(ann_file, img_dir, train=True).ids == [1]  # 2 has nothing, 3 only a crowd region
    keep = CocoDetection(ann_file, img_dir, train=True, filter_empty=False)
    assert keep.ids == [1, 2, 3]
    _, t = keep[1]
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["masks"].shape == (0, 30, 40)
    assert t["area"].shape == (0,) and t["iscrowd"].shape == (0,)
    # evaluation keeps every image whatever filter_empty says
    assert CocoDetection(ann_file, img_dir, train=False, filter_empty=True).ids == [1, 2, 3]


def test_ids_beyond_int32_are_preserved(write_coco, make_ann):
    big = 2**33 + 5
    ann_file, img_dir = write_coco(_one_image(big), [make_ann(2**40 + 1, big, 1, [1, 1, 5, 5])])
    ds = CocoDetection(ann_file, img_dir, train=False)
    assert ds.ids == [big]
    _, t = ds[0]
    assert t["image_id"].dtype == torch.int64 and int(t["image_id"]) == big


def test_without_masks(write_coco, make_ann):
    anns = [make_ann(1, 1, 1, [1, 1, 5, 5])]
    del anns[0]["segmentation"]
    ann_file, img_dir = write_coco(_one_image(), anns)
    _, t = CocoDetection(ann_file, img_dir, train=True, with_masks=False)[0]
    assert "masks" not in t and t["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0]]
    with pytest.raises(
        DatasetError, match=re.escape("annotations entry 1 is missing key(s) ['segmentation']")
    ):
        CocoDetection(ann_file, img_dir, train=True, with_masks=True)


# ---------------------------------------------------------------------------------------------------------
# Image modes and EXIF
# ---------------------------------------------------------------------------------------------------------


def _grey_ramp(h: int = 30, w: int = 40) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_become_rgb(write_coco, make_ann, mode):
    grey = _grey_ramp()
    if mode == "L":
        pil, expected = Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)
    elif mode == "LA":
        pil = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(255 - grey)])
        expected = np.repeat(grey[..., None], 3, 2)
    elif mode == "RGBA":
        rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
        pil = Image.fromarray(np.dstack([rgb, np.full_like(grey, 7)]), mode="RGBA")
        expected = rgb
    elif mode == "P":
        rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
        pil = Image.fromarray(rgb).quantize(colors=16)
        expected = np.asarray(pil.convert("RGB"))
    elif mode == "CMYK":
        pil, expected = Image.fromarray(np.stack([grey, 255 - grey, grey // 2], axis=2)).convert("CMYK"), None
    else:
        wide = grey.astype(np.uint16) * 257  # 0..65535
        pil, expected = Image.fromarray(wide), np.repeat(grey[..., None], 3, 2)
    file_name = "1.jpg" if mode == "CMYK" else "1.png"
    ann_file, img_dir = write_coco(
        _one_image(pil=pil, file_name=file_name), [make_ann(1, 1, 1, [1, 1, 5, 5])]
    )
    with Image.open(img_dir / file_name) as stored:
        assert stored.mode == mode
        if mode == "CMYK":  # lossy: compare with PIL's own conversion of the decoded file
            expected = np.asarray(stored.convert("RGB"))
    image, _ = CocoDetection(ann_file, img_dir, train=False)[0]
    assert image.shape == (3, 30, 40)
    got = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def _exif_rotated_jpeg(path: Path) -> None:
    """A 40x20 (w x h) stored JPEG whose EXIF orientation 6 says "rotate 90 degrees clockwise to view"."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)  # red left band in stored orientation
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("json_wh", "expect_hw", "transposed"),
    [((20, 40), (40, 20), True), ((40, 20), (20, 40), False)],
    ids=["json-after-exif", "json-matches-stored"],
)
def test_exif_orientation(write_coco, make_ann, tmp_path, json_wh, expect_hw, transposed):
    jpg = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(jpg)
    ann_file, img_dir = write_coco(
        [{"id": 1, "width": json_wh[0], "height": json_wh[1], "file_name": "rot.jpg", "pil": False}],
        [make_ann(1, 1, 1, [1, 1, 5, 5])],
    )
    (img_dir / "rot.jpg").write_bytes(jpg.read_bytes())
    image, _ = CocoDetection(ann_file, img_dir, train=False)[0]
    assert tuple(image.shape[1:]) == expect_hw
    with Image.open(jpg) as raw:
        reference = ImageOps.exif_transpose(raw) if transposed else raw.copy()
    assert np.array_equal(
        (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), np.asarray(reference)
    )
    if transposed:  # the stored left band is now the top band
        assert float(image[0, :5].mean()) > 0.9 and float(image[0, -5:].mean()) < 0.1


def test_exif_size_mismatch_names_file_and_sizes(write_coco, make_ann, tmp_path):
    jpg = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(jpg)
    ann_file, img_dir = write_coco(
        [{"id": 1, "width": 30, "height": 30, "file_name": "rot.jpg", "pil": False}],
        [make_ann(1, 1, 1, [1, 1, 5, 5])],
    )
    (img_dir / "rot.jpg").write_bytes(jpg.read_bytes())
    ds = CocoDetection(ann_file, img_dir, train=False, on_bad_image="skip")  # size errors are never skipped
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"image {img_dir / 'rot.jpg'} (in {ann_file}) is 40x20 (w x h) as stored and 20x40 after its EXIF "
            "orientation 6, but the JSON says 30x30"
        ),
    ):
        ds[0]


def test_size_mismatch_without_exif(write_coco, make_ann):
    ann_file, img_dir = write_coco(
        _one_image(pil=Image.new("RGB", (41, 30))), [make_ann(1, 1, 1, [1, 1, 5, 5])]
    )
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"image {img_dir / '1.png'} (in {ann_file}) is 41x30 (w x h) but the JSON says 40x30"
        ),
    ):
        CocoDetection(ann_file, img_dir, train=False)[0]


# ---------------------------------------------------------------------------------------------------------
# Annotation-file validation
# ---------------------------------------------------------------------------------------------------------


def test_missing_annotation_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"annotation file not found: {tmp_path / 'nope.json'}")
    ):
        CocoDetection(tmp_path / "nope.json", tmp_path, train=True)


def test_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n  "annotations": [,]}', encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: invalid JSON at line 2, column 19")):
        CocoDetection(bad, tmp_path, train=True)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = {"images": [], "annotations": [], "categories": []}
    del data[key]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: missing top-level key '{key}'")):
        CocoDetection(path, tmp_path, train=True)


def test_missing_image_dir(write_coco, make_ann, tmp_path):
    ann_file, _ = write_coco(_one_image(), [make_ann(1, 1, 1, [1, 1, 5, 5])])
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder not found: {tmp_path / 'nowhere'}")):
        CocoDetection(ann_file, tmp_path / "nowhere", train=True)


def test_unknown_image_and_category_references(write_coco, make_ann):
    anns = [make_ann(i, 100 + i, 1, [1, 1, 5, 5]) for i in range(1, 8)] + [make_ann(50, 1, 1, [1, 1, 5, 5])]
    ann_file, img_dir = write_coco(_one_image(), anns)
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{ann_file}: 7 annotation(s) reference a image_id that is not in 'images': annotation 1 -> image_id 101, "
            "annotation 2 -> image_id 102, annotation 3 -> image_id 103, annotation 4 -> image_id 104, "
            "annotation 5 -> image_id 105 (first 5 shown)"
        ),
    ):
        CocoDetection(ann_file, img_dir, train=True)

    ann_file, img_dir = write_coco(
        _one_image(), [make_ann(1, 1, 4, [1, 1, 5, 5]), make_ann(2, 1, 1, [1, 1, 5, 5])]
    )
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "1 annotation(s) reference a category_id that is not in 'categories': annotation 1 -> category_id 4"
        ),
    ):
        CocoDetection(ann_file, img_dir, train=True)


def test_missing_entry_keys_and_duplicates(write_coco, make_ann):
    ann = make_ann(7, 1, 1, [1, 1, 5, 5])
    del ann["bbox"]
    ann_file, img_dir = write_coco(_one_image(), [ann])
    with pytest.raises(DatasetError, match=re.escape("annotations entry 7 is missing key(s) ['bbox']")):
        CocoDetection(ann_file, img_dir, train=True)
    ann_file, img_dir = write_coco(
        _one_image(), [make_ann(3, 1, 1, [1, 1, 5, 5]), make_ann(3, 1, 1, [2, 2, 5, 5])]
    )
    with pytest.raises(DatasetError, match=re.escape("1 duplicated id(s) in 'annotations', first: [3]")):
        CocoDetection(ann_file, img_dir, train=True)
    ann = make_ann(3, 1, 1, [1, 1, 5, 5])
    ann["bbox"] = [1, 1, "x", 5]
    ann_file, img_dir = write_coco(_one_image(), [ann])
    with pytest.raises(DatasetError, match=re.escape("annotation 3 has a malformed bbox [1, 1, 'x', 5]")):
        CocoDetection(ann_file, img_dir, train=True)


def test_malformed_segmentations(write_coco, make_ann):
    ann_file, img_dir = write_coco(
        _one_image(), [make_ann(4, 1, 1, [1, 1, 5, 5], segmentation={"size": [10, 10], "counts": "abc"})]
    )
    with pytest.raises(
        DatasetError,
        match=re.escape(
            "annotation 4 (image 1) has an RLE of size [10, 10] but its image is [30, 40] (height, width)"
        ),
    ):
        CocoDetection(ann_file, img_dir, train=True)
    ann_file, img_dir = write_coco(
        _one_image(), [make_ann(5, 1, 1, [1, 1, 5, 5], segmentation={"polygon": []})]
    )
    with pytest.raises(
        DatasetError, match=re.escape("annotation 5 (image 1) has a malformed segmentation \"{'polygon': []}\"")
    ):
        CocoDetection(ann_file, img_dir, train=True)
    # the same files load without masks
    assert len(CocoDetection(ann_file, img_dir, train=True, with_masks=False)) == 1


# ---------------------------------------------------------------------------------------------------------
# Bad image files
# ---------------------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.fixture
def bad_image_set(write_coco, make_ann):
    """4 images: 1 and 4 fine, 2 missing, 3 truncated."""
    images = [{"id": i, "width": 40, "height": 30} for i in (1, 2, 3, 4)]
    images[1]["pil"] = False
    anns = [make_ann(i, i, 1, [1, 1, 5, 5]) for i in (1, 2, 3, 4)]
    ann_file, img_dir = write_coco(images, anns)
    (img_dir / "3.png").write_bytes(_truncated_png())
    return ann_file, img_dir


def test_bad_images_raise_with_both_paths(bad_image_set):
    ann_file, img_dir = bad_image_set
    # a missing file is found when the dataset is built, not when its batch comes
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{ann_file}: 1 of 4 image file(s) not found in {img_dir}: 2.png; fix the paths"),
    ):
        CocoDetection(ann_file, img_dir, train=True)
    (img_dir / "2.png").write_bytes((img_dir / "1.png").read_bytes())
    ds = CocoDetection(ann_file, img_dir, train=True)
    with pytest.raises(
        DatasetError, match=re.escape(f"cannot read image {img_dir / '3.png'} (listed in {ann_file}): ")
    ):
        ds[2]


def test_bad_images_skipped_with_one_warning_per_file(bad_image_set):
    ann_file, img_dir = bad_image_set
    with pytest.warns(UserWarning, match=re.escape(f"skipping 1 of 4 image file(s) not found in {img_dir}: 2.png")):
        ds = CocoDetection(ann_file, img_dir, train=True, on_bad_image="skip")
    assert ds.ids == [1, 3, 4]
    with pytest.warns(UserWarning) as record:
        first = [ds[i] for i in range(3)]
        second = [ds[i] for i in range(3)]
    messages = [str(r.message) for r in record if "skipping unreadable image" in str(r.message)]
    assert len(messages) == 1
    assert messages[0].startswith(f"skipping unreadable image {img_dir / '3.png'} (listed in {ann_file})")
    for items in (first, second):
        assert isinstance(items[1], SkippedImage)
        assert isinstance(items[0], tuple) and not isinstance(items[0], SkippedImage)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_images_reach_the_loop(bad_image_set, num_workers):
    ann_file, img_dir = bad_image_set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(ann_file, img_dir, train=True, on_bad_image="skip")
        loader = build_dataloader(
            ds, batch_size=3, train=True, num_workers=num_workers, aspect_ratio_grouping=False
        )
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            skipped, loaded = [], 0
            for images, targets, batch_skipped in loader:
                assert len(images) == len(targets)
                skipped.extend(batch_skipped)
                loaded += len(images)
            assert sorted(skipped) == [str(img_dir / "3.png")]
            assert loaded == 2


def test_on_bad_image_value_checked(write_coco, make_ann):
    ann_file, img_dir = write_coco(_one_image(), [make_ann(1, 1, 1, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=re.escape("on_bad_image must be 'error' or 'skip', got 'ignore'")):
        CocoDetection(ann_file, img_dir, train=True, on_bad_image="ignore")


def test_dataset_pickles_for_spawned_workers(shapes_paths):
    import pickle

    from detection.data import build_transforms

    augment = build_transforms([{"name": "horizontal_flip"}], train=True)
    ds = CocoDetection(
        shapes_paths["train_ann"], shapes_paths["train_img_dir"], train=True, transforms=augment
    )
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids and clone.categories == ds.categories
    ds.transforms.set_random_seed(4)
    clone.transforms.set_random_seed(4)
    (a_img, a_t), (b_img, b_t) = ds[0], clone[0]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
