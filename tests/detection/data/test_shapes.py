"""Synthetic shapes generator: determinism, annotation correctness, fairness, cache, CLI."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detection.config import ShapesConfig
from detection.data import (
    SHAPE_CATEGORIES,
    CocoDetection,
    ensure_shapes_dataset,
    make_shapes_dataset,
    make_shapes_splits,
)
from detection.data import shapes as shapes_module


def _load(ann_file) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(ann_file.read_text())
    coco.createIndex()
    return coco


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_images=4, image_size=48, seed=11)
    b = make_shapes_dataset(tmp_path / "b", num_images=4, image_size=48, seed=11)
    c = make_shapes_dataset(tmp_path / "c", num_images=4, image_size=48, seed=12)
    assert a.read_bytes() == b.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (
            tmp_path / "b" / "images" / name
        ).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # an image does not depend on how many are generated
    d = make_shapes_dataset(tmp_path / "d", num_images=2, image_size=48, seed=11)
    assert (tmp_path / "d" / "images" / "000002.png").read_bytes() == (
        tmp_path / "a" / "images" / "000002.png"
    ).read_bytes()
    assert json.loads(d.read_text())["images"] == json.loads(a.read_text())["images"][:2]


def test_annotations_describe_the_visible_pixels(shapes_paths):
    coco = _load(shapes_paths["train_ann"])
    assert [c["id"] for c in coco.dataset["categories"]] == [1, 2, 3]
    assert [c["name"] for c in coco.dataset["categories"]] == ["circle", "square", "triangle"]
    kinds = set()
    for img in coco.dataset["images"]:
        assert (img["height"], img["width"]) == (64, 96)
        pixels = np.asarray(Image.open(shapes_paths["train_img_dir"] / img["file_name"])).astype(np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert 1 <= len(anns) <= 6
        union = np.zeros((64, 96), dtype=np.int32)
        for ann in anns:
            assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
            kinds.add(type(ann["segmentation"]).__name__)
            mask = coco.annToMask(ann).astype(bool)
            union += mask
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum()
            # an object is one flat colour under per-pixel noise (sigma <= 10)
            assert pixels[mask].std(axis=0).max() < 16
        assert union.max() == 1  # visible parts never overlap: occluded objects are annotated as seen
    assert "list" in kinds


def test_colour_does_not_give_the_class_away(tmp_path):
    ann = make_shapes_dataset(tmp_path, num_images=40, image_size=48, seed=5)
    coco = _load(ann)
    mean_colour = defaultdict(list)
    for img in coco.dataset["images"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / img["file_name"])).astype(np.float32)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            mean_colour[a["category_id"]].append(pixels[coco.annToMask(a).astype(bool)].mean(axis=0))
    assert all(len(v) >= 25 for v in mean_colour.values())
    per_class = {k: np.mean(v, axis=0) for k, v in mean_colour.items()}
    spread = {k: np.std(v, axis=0).min() for k, v in mean_colour.items()}
    for k in per_class:
        assert spread[k] > 50  # each class takes all sorts of colours
        for j in per_class:
            assert np.abs(per_class[k] - per_class[j]).max() < 40


def test_occluded_objects_keep_enough_of_themselves():
    """Crowded images: placements are redrawn so every drawn object stays >= min_visible visible."""
    occluded = 0
    for i in range(10):
        rng = np.random.default_rng([2, i])
        crowded = ShapesConfig(min_objects=6, max_objects=6, size_range=(0.4, 0.6), min_visible=0.3)
        _, objects = shapes_module._draw_image(rng, 64, 64, crowded)
        assert 1 <= len(objects) <= 6
        for o in objects:
            visible = int(o["mask"].sum())
            assert visible >= 0.3 * o["full_area"] * 0.95  # traced polygons match the pixels to IoU >= 0.98
            occluded += visible < o["full_area"]
    assert occluded >= 5


def test_generator_argument_errors(tmp_path):
    # the range checks are ShapesConfig's
    with pytest.raises(ValueError, match=re.escape("min_objects must be in 0..max_objects (2); got 3")):
        make_shapes_dataset(tmp_path, num_images=1, image_size=32, seed=0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match=re.escape("image_size must be >= 16; got 8")):
        make_shapes_dataset(tmp_path, num_images=1, image_size=8, seed=0)
    with pytest.raises(ValueError, match=re.escape("image_size must be >= 16; got 8")):
        make_shapes_dataset(tmp_path, num_images=1, image_size=(8, 40), seed=0)
    with pytest.raises(
        ValueError,
        match=re.escape("size_range must be [low, high] with 0 < low <= high <= 1; got [0.5, 0.2]"),
    ):
        make_shapes_dataset(tmp_path, num_images=1, image_size=32, seed=0, size_range=(0.5, 0.2))
    with pytest.raises(ValueError, match=re.escape("num_images must be >= 1, got 0")):
        make_shapes_dataset(tmp_path, num_images=0, seed=0)
    with pytest.raises(ValueError, match=re.escape("image_format must be one of ('png', 'jpg'), got 'gif'")):
        make_shapes_dataset(tmp_path, num_images=1, seed=0, image_format="gif")
    with pytest.raises(TypeError, match=re.escape("unknown shapes option(s) ['colour']")):
        make_shapes_dataset(tmp_path, num_images=1, seed=0, colour="red")


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------


def test_cache_is_reused_and_keyed_by_parameters(tmp_path, monkeypatch):
    first = ensure_shapes_dataset(tmp_path, num_train=2, num_val=1, image_size=32, seed=0)
    assert first["train_ann"].is_file() and first["val_img_dir"].is_dir()
    assert first["train_ann"].parent.parent.parent.name.startswith("shapes-")
    assert len(list(first["train_img_dir"].iterdir())) == 2 and len(list(first["val_img_dir"].iterdir())) == 1
    # train and val come from different seeds
    assert first["train_ann"].read_bytes() != first["val_ann"].read_bytes()
    assert CocoDetection(first["val_ann"], first["val_img_dir"], train=False).categories.cat_ids == (1, 2, 3)

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(shapes_module, "make_shapes_splits", fail)
    assert ensure_shapes_dataset(tmp_path, num_train=2, num_val=1, image_size=32, seed=0) == first
    with pytest.raises(AssertionError, match="should have been reused"):
        ensure_shapes_dataset(tmp_path, num_train=2, num_val=1, image_size=32, seed=1)


def test_interrupted_generation_is_never_reused(tmp_path, monkeypatch):
    real = shapes_module.make_shapes_splits

    def interrupted(out_dir, **kwargs):
        real(out_dir, **{**kwargs, "num_val": 1})  # writes files, then dies before finishing
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes_module, "make_shapes_splits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(tmp_path, num_train=2, num_val=2, image_size=32, seed=0)
    assert list(tmp_path.iterdir()) == []  # no final folder, partial folder removed
    monkeypatch.setattr(shapes_module, "make_shapes_splits", real)
    paths = ensure_shapes_dataset(tmp_path, num_train=2, num_val=2, image_size=32, seed=0)
    assert len(json.loads(paths["val_ann"].read_text())["images"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == [paths["train_ann"].parents[2].name]


def test_categories_constant_matches_files(shapes_paths):
    data = json.loads(shapes_paths["val_ann"].read_text())
    assert data["categories"] == [dict(c) for c in SHAPE_CATEGORIES]


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def test_make_shapes_cli(tmp_path, load_tool, capsys):
    tool = load_tool("make_shapes")
    assert tool.main(["--help"]) == 0
    out_dir = tmp_path / "out"
    argv = ["--out", str(out_dir), "--num-train", "3", "--num-val", "2", "--size", "32x40", "--seed", "4"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 train + 2 val images to {out_dir}" in printed
    assert f"train_ann: {out_dir / 'train' / 'annotations' / 'instances.json'}" in printed
    data = json.loads((out_dir / "train" / "annotations" / "instances.json").read_text())
    assert len(data["images"]) == 3 and data["images"][0]["height"] == 32 and data["images"][0]["width"] == 40
    assert len(list((out_dir / "val" / "images").iterdir())) == 2
    # same content as the cache builds from the same parameters
    cached = ensure_shapes_dataset(tmp_path / "cache", num_train=3, num_val=2, image_size=(32, 40), seed=4)
    assert (
        cached["train_ann"].read_bytes()
        == (out_dir / "train" / "annotations" / "instances.json").read_bytes()
    )

    assert tool.main(argv) == 1
    assert "already exist(s); pass --force" in capsys.readouterr().err
    assert tool.main([*argv, "--force", "--num-train", "1"]) == 0
    assert len(json.loads((out_dir / "train" / "annotations" / "instances.json").read_text())["images"]) == 1
    assert tool.main(["--out", str(tmp_path / "x"), "--size", "3x4x5"]) == 2


def test_negatives_and_train_only_splits(tmp_path):
    paths = ensure_shapes_dataset(
        tmp_path, num_train=6, num_val=0, image_size=32, seed=1, min_objects=0, max_objects=1
    )
    assert set(paths) == {"train_ann", "train_img_dir"}
    assert not (paths["train_ann"].parents[2] / "val").exists()
    data = json.loads(paths["train_ann"].read_text())
    per_image = [sum(a["image_id"] == img["id"] for a in data["annotations"]) for img in data["images"]]
    assert set(per_image) == {0, 1}  # negatives appear with min_objects=0
    with pytest.raises(ValueError, match=re.escape("num_val must be >= 0; got -1")):
        ensure_shapes_dataset(tmp_path, num_train=1, num_val=-1, image_size=32, seed=1)


def test_shapes_defaults_are_declared_once_in_shapes_config(tmp_path, load_tool, monkeypatch):
    """The tool's flags and the generator take ShapesConfig's defaults: changed there, both follow."""
    fields = {f.name for f in dataclasses.fields(ShapesConfig)}
    for function in (make_shapes_dataset, make_shapes_splits, ensure_shapes_dataset):
        for name, parameter in inspect.signature(function).parameters.items():
            if name in fields:  # no default of its own: None means "the config's"
                assert parameter.default in (None, inspect.Parameter.empty), (function.__name__, name)

    tool = load_tool("make_shapes")
    flags = ("num_train", "num_val", "size", "seed", "min_objects", "max_objects", "size_range")

    def parsed_defaults():
        args = tool.build_parser().parse_args(["--out", str(tmp_path)])
        return [tuple(v) if isinstance(v, list) else v for v in (getattr(args, f) for f in flags)]

    base = ShapesConfig()
    expected = [base.num_train, base.num_val, base.image_size, base.seed, base.min_objects, base.max_objects]
    assert parsed_defaults() == [*expected, tuple(base.size_range)]

    changed = {
        "num_train": 3,
        "num_val": 1,
        "image_size": 40,
        "seed": 5,
        "min_objects": 2,
        "max_objects": 3,
        "size_range": (0.2, 0.3),
        "distractors": (0, 1),
        "min_visible": 0.5,
        "cache_dir": str(tmp_path / "cache"),
    }
    patched = functools.partial(ShapesConfig, **changed)
    monkeypatch.setattr(tool, "ShapesConfig", patched)
    assert parsed_defaults() == [changed[k] for k in ("num_train", "num_val", "image_size", "seed")] + [
        2,
        3,
        (0.2, 0.3),
    ]
    monkeypatch.setattr(shapes_module, "ShapesConfig", patched)
    paths = ensure_shapes_dataset()  # every setting, the cache folder included, from the (patched) defaults
    assert paths["train_ann"].is_relative_to(tmp_path / "cache")
    params = json.loads((paths["train_ann"].parents[2] / "params.json").read_text())
    assert params == {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in changed.items() if k != "cache_dir"},
        "image_size": [40, 40],
        "image_format": "png",
        "version": params["version"],
    }
