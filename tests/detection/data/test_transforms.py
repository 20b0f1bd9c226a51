"""build_transforms: config errors, and boxes/masks/labels/area consistency under every named transform."""

from __future__ import annotations

import pickle
import re

import cv2
import numpy as np
import pytest

from detection.data import DetectionTransform, build_transforms, transform_names

# label -> (colour, box xyxy); the rectangles do not overlap
_OBJECTS = {
    1: ((255, 0, 0), (5, 5, 25, 20)),
    2: ((0, 255, 0), (50, 35, 75, 55)),
    3: ((0, 0, 255), (30, 10, 45, 40)),
}
_H, _W = 60, 80


def _sample() -> tuple[np.ndarray, dict]:
    image = np.full((_H, _W, 3), 128, dtype=np.uint8)
    masks, boxes, labels = [], [], []
    for label, (colour, (x1, y1, x2, y2)) in _OBJECTS.items():
        image[y1:y2, x1:x2] = colour
        mask = np.zeros((_H, _W), dtype=np.uint8)
        mask[y1:y2, x1:x2] = 1
        masks.append(mask)
        boxes.append((x1, y1, x2, y2))
        labels.append(label)
    target = {
        "boxes": np.asarray(boxes, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "masks": np.stack(masks),
        "area": np.asarray([m.sum() for m in masks], dtype=np.float32),
        "iscrowd": np.asarray([0, 1, 0], dtype=np.int64),
        "image_id": 7,
        "orig_size": (_H, _W),
    }
    return image, target


def _check_consistent(image: np.ndarray, target: dict, *, colours: bool = True) -> None:
    """Every per-object field has the same length; each mask lies in its box, its area is its pixel count and
    (for geometric transforms) its pixels carry the colour of its label's rectangle."""
    n = len(target["boxes"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert target["boxes"].dtype == np.float32 and target["boxes"].shape == (n, 4)
    assert len(target["labels"]) == len(target["iscrowd"]) == len(target["area"]) == len(target["masks"]) == n
    assert target["masks"].shape[1:] == image.shape[:2]
    assert target["image_id"] == 7 and target["orig_size"] == (_H, _W)
    for k in range(n):
        mask = target["masks"][k].astype(bool)
        assert mask.any()
        assert float(target["area"][k]) == float(mask.sum())
        ys, xs = np.nonzero(mask)
        x1, y1, x2, y2 = target["boxes"][k]
        assert x2 - x1 >= 1 and y2 - y1 >= 1
        assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() + 1 <= y2 + 1
        label = int(target["labels"][k])
        crowd_expected = {1: 0, 2: 1, 3: 0}[label]
        assert int(target["iscrowd"][k]) == crowd_expected
        core = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if colours and core.any():  # 2 px inside the mask, away from interpolated edges
            median = np.median(image[core], axis=0)
            assert np.abs(median - np.asarray(_OBJECTS[label][0])).max() <= 30, (label, median)


# ---------------------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------------------


def test_eval_and_empty_lists_give_no_transform():
    assert build_transforms([{"name": "horizontal_flip"}], train=False) is None
    assert build_transforms([], train=True) is None


def test_unknown_name_suggests_and_lists_known_names():
    known = ", ".join(transform_names())
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"transform #1: unknown transform name 'horizontal_flp' (did you mean 'horizontal_flip'?). Known names: {known}"
        ),
    ):
        build_transforms([{"name": "vertical_flip"}, {"name": "horizontal_flp"}], train=True)
    assert {
        "horizontal_flip",
        "vertical_flip",
        "scale_jitter",
        "large_scale_jitter",
        "random_resized_crop",
        "bbox_safe_crop",
        "color_jitter",
    } <= set(transform_names())


def test_unknown_missing_and_invalid_params():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "transform #0 'color_jitter': unknown parameter(s) ['brightnes'] (did you mean 'brightness'?). "
            "Accepted parameters: brightness, contrast, saturation, hue, p"
        ),
    ):
        build_transforms([{"name": "color_jitter", "brightnes": 0.2}], train=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "transform #0 'scale_jitter': missing required parameter(s) ['size']. "
            "Accepted parameters: size, min_scale, max_scale, p"
        ),
    ):
        build_transforms([{"name": "scale_jitter"}], train=True)
    with pytest.raises(ValueError, match=re.escape("transform #0 'scale_jitter': invalid parameters")):
        build_transforms(
            [{"name": "scale_jitter", "size": 64, "min_scale": 2.0, "max_scale": 1.0}], train=True
        )
    with pytest.raises(
        ValueError, match=re.escape("transform #0 'horizontal_flip': invalid parameters {'p': 2}")
    ):
        build_transforms([{"name": "horizontal_flip", "p": 2}], train=True)
    with pytest.raises(ValueError, match=re.escape("transform #0 must be a mapping with a 'name' key")):
        build_transforms([{"p": 0.5}], train=True)


# ---------------------------------------------------------------------------------------------------------
# Geometry and consistency
# ---------------------------------------------------------------------------------------------------------


def test_horizontal_and_vertical_flip_move_boxes_and_masks():
    image, target = _sample()
    t = build_transforms(
        [{"name": "horizontal_flip", "p": 1.0}, {"name": "vertical_flip", "p": 1.0}], train=True
    )
    out_image, out = t(image, target)
    _check_consistent(out_image, out)
    b = target["boxes"]
    expected = np.stack([_W - b[:, 2], _H - b[:, 3], _W - b[:, 0], _H - b[:, 1]], axis=1)
    np.testing.assert_allclose(out["boxes"], expected, atol=1e-4)
    assert np.array_equal(out["masks"], target["masks"][:, ::-1, ::-1])
    assert np.array_equal(out_image, image[::-1, ::-1])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "scale_jitter", "size": 80, "min_scale": 0.5, "max_scale": 2.0},
        {"name": "large_scale_jitter", "size": 64, "min_scale": 0.3, "max_scale": 2.0},
        {"name": "random_resized_crop", "size": [48, 64], "scale": [0.2, 1.0]},
        {"name": "bbox_safe_crop"},
        {"name": "bbox_safe_crop", "size": 50},
    ],
    ids=lambda s: s["name"] + ("-sized" if s["name"] == "bbox_safe_crop" and "size" in s else ""),
)
def test_geometric_transforms_keep_objects_consistent(spec):
    t = build_transforms([{"name": "horizontal_flip"}, spec], train=True)
    image, target = _sample()
    counts = set()
    for seed in range(12):
        t.set_random_seed(seed)
        out_image, out = t(image, target)
        _check_consistent(out_image, out)
        counts.add(len(out["boxes"]))
        h, w = out_image.shape[:2]
        if spec["name"] == "scale_jitter":
            assert 40 <= max(h, w) <= 160 and abs(w / h - _W / _H) < 0.05
        elif spec["name"] == "large_scale_jitter":
            assert (h, w) == (64, 64)
        elif spec["name"] == "random_resized_crop":
            assert (h, w) == (48, 64)
        elif spec["name"] == "bbox_safe_crop":
            assert len(out["boxes"]) == 3  # a bbox-safe crop keeps every object
            if "size" in spec:
                assert (h, w) == (50, 50)
    if spec["name"] in ("large_scale_jitter", "random_resized_crop"):
        assert min(counts) < 3  # some draws crop objects out, and the checks above held for them


def test_crop_removes_object_with_its_mask_label_and_area():
    t = build_transforms([{"name": "random_resized_crop", "size": 40, "scale": [0.1, 0.2]}], train=True)
    image, target = _sample()
    removed_any = False
    for seed in range(40):
        t.set_random_seed(seed)
        out_image, out = t(image, target)
        _check_consistent(out_image, out)
        if 0 < len(out["labels"]) < 3:
            removed_any = True
            # each survivor's mask covers its own colour (edges blur when the crop is upsampled), so no mask
            # moved to another label
            for k, label in enumerate(out["labels"].tolist()):
                colour_px = np.all(np.abs(out_image.astype(int) - _OBJECTS[label][0]) <= 60, axis=2)
                core = cv2.erode(out["masks"][k], np.ones((3, 3), np.uint8)).astype(bool)
                assert (core & colour_px).sum() >= 0.9 * core.sum()
                assert not (
                    core & ~colour_px & np.any(np.abs(out_image.astype(int) - 128) > 60, axis=2)
                ).any()
    assert removed_any


def test_color_jitter_keeps_geometry_and_dtype():
    image, target = _sample()
    t = build_transforms([{"name": "color_jitter", "brightness": 0.5, "contrast": 0.5, "p": 1.0}], train=True)
    changed = False
    for seed in range(5):
        t.set_random_seed(seed)
        out_image, out = t(image, target)
        _check_consistent(out_image, out, colours=False)
        np.testing.assert_array_equal(out["boxes"], target["boxes"])
        np.testing.assert_array_equal(out["masks"], target["masks"])
        changed |= not np.array_equal(out_image, image)
    assert changed


def test_negative_sample_without_objects():
    t = build_transforms(
        [{"name": "large_scale_jitter", "size": 32}, {"name": "horizontal_flip"}], train=True
    )
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    target = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, 20, 30), np.uint8),
        "area": np.zeros(0, np.float32),
        "iscrowd": np.zeros(0, np.int64),
        "image_id": 1,
        "orig_size": (20, 30),
    }
    out_image, out = t(image, target)
    assert out_image.shape == (32, 32, 3)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 32, 32) and out["labels"].shape == (0,)


def test_area_from_boxes_without_masks():
    image, target = _sample()
    del target["masks"]
    t = build_transforms(
        [{"name": "scale_jitter", "size": 160, "min_scale": 1.0, "max_scale": 1.0}], train=True
    )
    _, out = t(image, target)
    b = out["boxes"]
    np.testing.assert_allclose(out["area"], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), rtol=1e-5)
    np.testing.assert_allclose(b, target["boxes"] * 2, atol=1e-3)  # long side 80 -> 160


# ---------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------


def _signature(t: DetectionTransform, n: int = 8) -> list[tuple]:
    image, target = _sample()
    results = []
    for _ in range(n):
        out_image, out = t(image, target)
        results.append((out_image.shape, out["boxes"].round(3).tobytes(), int(out_image.sum())))
    return results


def test_seeding_is_reproducible_and_independent_per_transform():
    specs = [
        {"name": "horizontal_flip", "p": 0.5},
        {"name": "vertical_flip", "p": 0.5},
        {"name": "scale_jitter", "size": 64},
    ]
    a, b = build_transforms(specs, train=True), build_transforms(specs, train=True)
    a.set_random_seed(11)
    b.set_random_seed(11)
    assert _signature(a) == _signature(b)
    b.set_random_seed(12)
    a.set_random_seed(11)
    assert _signature(a) != _signature(b)
    # horizontal and vertical flips draw from one shared stream: they do not always fire together
    flips = build_transforms(specs[:2], train=True)
    flips.set_random_seed(0)
    image, target = _sample()
    kinds = set()
    for _ in range(30):
        _, out = flips(image, target)
        kinds.add((bool(out["boxes"][0, 0] != 5), bool(out["boxes"][0, 1] != 5)))
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}


def test_transform_pickles_for_worker_processes():
    t = build_transforms([{"name": "horizontal_flip"}, {"name": "scale_jitter", "size": 64}], train=True)
    clone = pickle.loads(pickle.dumps(t))
    t.set_random_seed(3)
    clone.set_random_seed(3)
    assert _signature(t) == _signature(clone)
    assert repr(clone) == "DetectionTransform(horizontal_flip, scale_jitter)"


def test_min_visibility_drops_partly_cropped_objects():
    # long side 2 x 40 = 80 (the original size), then a 40 x 40 crop: objects are whole, cut, or gone
    spec = [{"name": "large_scale_jitter", "size": 40, "min_scale": 2.0, "max_scale": 2.0}]
    strict = build_transforms(spec, train=True, min_visibility=0.99)
    loose = build_transforms(spec, train=True)
    image, target = _sample()
    full_area = {label: (b[2] - b[0]) * (b[3] - b[1]) for label, (_, b) in _OBJECTS.items()}
    cut_seen = False
    for seed in range(20):
        strict.set_random_seed(seed)
        loose.set_random_seed(seed)
        _, out_strict = strict(image, target)
        _, out_loose = loose(image, target)
        for box, label in zip(out_strict["boxes"], out_strict["labels"].tolist()):
            assert (box[2] - box[0]) * (box[3] - box[1]) == pytest.approx(full_area[label], rel=1e-3)
        cut_seen |= len(out_loose["labels"]) > len(out_strict["labels"])
    assert cut_seen
