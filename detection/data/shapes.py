"""Synthetic "shapes" instance-segmentation dataset in COCO format, generated on demand and cached.

Each image holds ``min_objects`` to ``max_objects`` filled circles, squares and triangles on a cluttered
background (the settings, with their defaults, are the fields of :class:`detection.config.ShapesConfig`):

- classes: ``circle`` (id 1), ``square`` (2), ``triangle`` (3). Consumers must go through the category
  mapping and never assume contiguous ids;
- object size (diameter / side) drawn uniformly in ``size_range`` times the image's short side; squares and
  triangles are rotated by a random angle; circles are 32-gons;
- object colours are drawn independently of the class (and kept away from the local background colour so
  every object is visible), so colour carries no class information;
- the background is a random two-colour gradient with random lines and irregular blobs in random colours
  and Gaussian noise over the whole image, so edges are not unique to objects;
- objects are painted in order and may overlap. A placement that would leave an earlier object less than
  ``min_visible`` of its pixels visible is redrawn elsewhere (up to a few tries, else the new object is
  not drawn), so every object in the image is annotated and every annotation is at least that visible.
  The annotation of an occluded object is its *visible* part: polygons traced from the visible mask (exact
  up to pycocotools' rasterisation), or a compressed RLE when polygons cannot represent it (holes);
- ``bbox`` is the box of the visible mask, ``area`` its pixel count, ``iscrowd`` 0.

Generation is deterministic for a seed (byte-identical JSON and PNG files); each image has its own random
stream, so image ``i`` does not depend on how many images are generated.

``ensure_shapes_dataset`` builds train and val splits once into ``cache_dir/shapes-<hash of parameters>/``
(through a temporary folder renamed at the end, so an interrupted run is never reused) and returns their
paths on every later call.

pycocotools (rasterisation) and OpenCV (contours; shipped with albumentations) are imported lazily.

Example::

    paths = ensure_shapes_dataset(config=ShapesConfig(num_train=500, num_val=100))  # in ShapesConfig.cache_dir
    paths = ensure_shapes_dataset("/tmp/shapes", num_train=8, num_val=2, image_size=(96, 128))
    train = CocoDetection(paths["train_ann"], paths["train_img_dir"], train=True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ShapesConfig

__all__ = [
    "IMAGE_FORMATS",
    "SHAPE_CATEGORIES",
    "ensure_shapes_dataset",
    "make_shapes_dataset",
    "make_shapes_splits",
]

SHAPE_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
#: Image file formats the generator writes; the first is the default.
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")
# Bump when the drawing changes, so cached datasets made by older code are not reused.
_GENERATOR_VERSION = 1
_PLACEMENT_TRIES = 10
_CIRCLE_VERTICES = 32
# Minimum mean absolute RGB difference between an object's colour and the background under it.
_MIN_CONTRAST = 48.0
# Polygons traced from a visible mask must reproduce it at least this well, else RLE is written.
_MIN_POLYGON_IOU = 0.98
_FIELDS = tuple(f.name for f in dataclasses.fields(ShapesConfig))


def _resolve(
    config: ShapesConfig | None, image_size: int | Sequence[int] | None, overrides: dict[str, Any]
) -> tuple[ShapesConfig, tuple[int, int]]:
    """The settings (``config``, default ``ShapesConfig()``, with ``overrides``) and the ``(height, width)``.

    ``ShapesConfig`` holds every default and range check; a ``(height, width)`` size, which it does not
    model, is checked through its short side.
    """
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown shapes option(s) {unknown}; the options are the ShapesConfig fields {list(_FIELDS)}"
        )
    settings = config if config is not None else ShapesConfig()
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        overrides = {**overrides, "image_size": image_size}
        image_size = None
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    if image_size is None:
        return settings, (settings.image_size, settings.image_size)
    if not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    height, width = (int(v) for v in image_size)
    dataclasses.replace(settings, image_size=min(height, width))
    return settings, (height, width)


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def _rasterise(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The pixels pycocotools assigns to a polygon: the dataset decodes the same mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))


def _background(rng: np.random.Generator, height: int, width: int, distractors: Sequence[int]) -> np.ndarray:
    import cv2

    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * math.cos(angle)
    ys = np.arange(height, dtype=np.float32)[:, None] * math.sin(angle)
    t = xs + ys
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
    image = (c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t).astype(np.uint8)
    short = min(height, width)
    # Irregular blobs: many jittered vertices, so they never look like a circle, square or triangle.
    for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
        n_vertices = int(rng.integers(7, 13))
        radius = rng.uniform(0.05, 0.2) * short
        angles = np.sort(rng.uniform(0, 2 * math.pi, n_vertices))
        radii = radius * rng.uniform(0.4, 1.0, n_vertices)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], color=rng.uniform(0, 255, 3).tolist())
    for _ in range(int(rng.integers(2, 7))):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p0, p1, color=rng.uniform(0, 255, 3).tolist(), thickness=int(rng.integers(1, 4)))
    return image


def _shape_polygon(rng: np.random.Generator, name: str, size: float, height: int, width: int) -> list[float]:
    """Vertices ``[x0, y0, x1, y1, ...]`` (rounded to 0.01 px) of one shape fully inside the image."""
    if name == "circle":
        n, radius, start = _CIRCLE_VERTICES, size / 2, 0.0
    elif name == "square":
        n, radius, start = 4, size / math.sqrt(2), rng.uniform(0, math.pi / 2)
    else:  # equilateral triangle with side `size`
        n, radius, start = 3, size / math.sqrt(3), rng.uniform(0, 2 * math.pi / 3)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    angles = start + 2 * math.pi * np.arange(n) / n
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in points.ravel()]


def _visible_segmentation(visible: np.ndarray) -> tuple[Any, np.ndarray]:
    """Segmentation for a visible mask: traced polygons if they reproduce it, else compressed RLE.

    Returns the segmentation and the mask a reader decodes from it.
    """
    from pycocotools import mask as mask_utils

    height, width = visible.shape
    try:
        import cv2
    except ImportError:  # opencv comes with albumentations; without it, RLE is exact anyway
        cv2 = None
    if cv2 is not None:
        # Contours of the 2x upsampled mask, mapped back with (p + 0.5) / 2, run along pixel edges, which is
        # where pycocotools' polygon rasteriser puts the boundary; approxPolyDP keeps the JSON small.
        up = cv2.resize(visible, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = []
        for contour in contours:
            contour = cv2.approxPolyDP(contour, 0.5, True).reshape(-1, 2)
            if len(contour) >= 3:
                polygons.append([round(float(v), 2) for v in ((contour + 0.5) / 2).ravel()])
        if polygons:
            decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
            inter = np.logical_and(decoded, visible).sum()
            union = np.logical_or(decoded, visible).sum()
            if union and inter / union >= _MIN_POLYGON_IOU:
                return polygons, decoded
    rle = mask_utils.encode(np.asfortranarray(visible))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}, visible


def _draw_image(
    rng: np.random.Generator, height: int, width: int, settings: ShapesConfig
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image and its objects ``{"category_id", "segmentation", "mask", "full_area"}``.

    ``mask`` is what a reader decodes from ``segmentation``; ``full_area`` the pixel count before occlusion.
    """
    image = _background(rng, height, width, settings.distractors)
    short = min(height, width)
    objects: list[dict[str, Any]] = []  # category_id, polygon, full mask, visible mask
    for _ in range(int(rng.integers(settings.min_objects, settings.max_objects + 1))):
        category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
        size = rng.uniform(settings.size_range[0], settings.size_range[1]) * short
        placed = _place(rng, category["name"], size, objects, height, width, settings.min_visible)
        if placed is None:
            continue  # could not place it without hiding an earlier object: leave it out
        polygon, mask = placed
        image[mask] = _contrasting_colour(rng, image[mask])
        for o in objects:
            o["visible"] &= ~mask
        objects.append(
            {
                "category_id": category["id"],
                "polygon": polygon,
                "visible": mask.copy(),
                "full_area": int(mask.sum()),
            }
        )

    noise = rng.standard_normal(size=image.shape, dtype=np.float32)
    noise *= rng.uniform(3.0, 10.0)
    noise += image
    image = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
    return image, [_annotation(o) for o in objects]


def _place(
    rng: np.random.Generator,
    name: str,
    size: float,
    objects: list[dict[str, Any]],
    height: int,
    width: int,
    min_visible: float,
) -> tuple[list[float], np.ndarray] | None:
    """A polygon and its mask that leave every earlier object ``min_visible`` visible, or None."""
    for _try in range(_PLACEMENT_TRIES):
        polygon = _shape_polygon(rng, name, size, height, width)
        mask = _rasterise(polygon, height, width).astype(bool)
        if not mask.any():
            continue
        if all(np.count_nonzero(o["visible"] & ~mask) >= min_visible * o["full_area"] for o in objects):
            return polygon, mask
    return None


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean of the pixels ``under`` it (a few redraws at most)."""
    mean = under.astype(np.float32).mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    for _retry in range(20):
        if np.abs(colour - mean).mean() >= _MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    return np.round(colour).astype(np.uint8)


def _annotation(obj: dict[str, Any]) -> dict[str, Any]:
    if int(obj["visible"].sum()) == obj["full_area"]:
        segmentation, decoded = [obj["polygon"]], obj["visible"]
    else:
        segmentation, decoded = _visible_segmentation(obj["visible"].astype(np.uint8))
    return {
        "category_id": obj["category_id"],
        "segmentation": segmentation,
        "mask": decoded,
        "full_area": obj["full_area"],
    }


def _mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def make_shapes_dataset(
    out_dir: str | Path,
    config: ShapesConfig | None = None,
    *,
    num_images: int,
    seed: int,
    image_size: int | tuple[int, int] | None = None,
    image_format: str = IMAGE_FORMATS[0],
    **options: Any,
) -> Path:
    """Write one split: ``out_dir/images/<id>.<ext>`` and ``out_dir/annotations/instances.json``.

    Args:
        out_dir: destination folder (created; existing files with the same names are overwritten).
        config: drawing settings (``min_objects``, ``max_objects``, ``size_range``, ``min_visible``,
            ``distractors``, ``image_size``); default ``ShapesConfig()``, which documents them. Its counts
            and seed are not used here.
        num_images: number of images; image ids are ``1..num_images``.
        seed: random seed of this split; the same seed and settings give byte-identical files.
        image_size: ``S`` for ``S x S`` images, or ``(height, width)``; default ``config.image_size``.
        image_format: one of :data:`IMAGE_FORMATS`: ``"png"`` (lossless) or ``"jpg"`` (quality 90).
        **options: ``ShapesConfig`` fields overriding ``config``'s.

    Returns:
        Path of the written ``instances.json``.

    An object that cannot be placed without hiding an earlier one is left out, so an image can hold fewer
    than ``min_objects`` (the first object always fits, so never zero when ``min_objects >= 1``).
    """
    settings, (height, width) = _resolve(config, image_size, options)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        pixels, objects = _draw_image(np.random.default_rng([int(seed), index]), height, width, settings)
        file_name = f"{image_id:06d}.{image_format}"
        _save_image(pixels, out_dir / "images" / file_name, image_format)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += [
            _coco_annotation(len(annotations) + k + 1, image_id, o) for k, o in enumerate(objects)
        ]
    data = {
        "info": _info(settings, seed, height, width),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SHAPE_CATEGORIES],
    }
    ann_file = out_dir / "annotations" / "instances.json"
    ann_file.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return ann_file


def _coco_annotation(ann_id: int, image_id: int, obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category_id"],
        "segmentation": obj["segmentation"],
        "area": float(np.count_nonzero(obj["mask"])),
        "bbox": _mask_bbox_xywh(obj["mask"]),
        "iscrowd": 0,
    }


def _save_image(pixels: np.ndarray, path: Path, image_format: str) -> None:
    if image_format == "png":
        Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _info(settings: ShapesConfig, seed: int, height: int, width: int) -> dict[str, Any]:
    return {
        "description": "synthetic shapes (circle, square, triangle)",
        "generator_version": _GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": [height, width],
        "objects_per_image": [settings.min_objects, settings.max_objects],
        "size_range": list(settings.size_range),
        "min_visible": settings.min_visible,
        "distractors": list(settings.distractors),
    }


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([int(seed), {"train": 0, "val": 1}[split]]).generate_state(1)[0])


def _split_paths(root: Path, with_val: bool) -> dict[str, Path]:
    splits = ("train", "val") if with_val else ("train",)
    out: dict[str, Path] = {}
    for split in splits:
        out[f"{split}_ann"] = root / split / "annotations" / "instances.json"
        out[f"{split}_img_dir"] = root / split / "images"
    return out


def make_shapes_splits(
    out_dir: str | Path,
    config: ShapesConfig | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    image_format: str = IMAGE_FORMATS[0],
    **options: Any,
) -> dict[str, Path]:
    """Write ``out_dir/train`` and ``out_dir/val`` with :func:`make_shapes_dataset` (seeds derived per split).

    Args:
        out_dir: destination folder.
        config: the dataset's settings (default ``ShapesConfig()``): ``num_train`` and ``num_val`` (0: no
            ``val`` split) images, drawn with seeds derived from ``seed``, and the drawing settings.
        image_size: ``S`` or ``(height, width)``; default ``config.image_size``.
        image_format: one of :data:`IMAGE_FORMATS`.
        **options: ``ShapesConfig`` fields overriding ``config``'s.

    Returns:
        ``{"train_ann", "train_img_dir", "val_ann", "val_img_dir"}`` (no ``val_*`` keys when ``num_val`` is 0).
    """
    settings, size_hw = _resolve(config, image_size, options)
    out_dir = Path(out_dir)
    for split, count in (("train", settings.num_train), ("val", settings.num_val)):
        if count > 0:
            make_shapes_dataset(
                out_dir / split,
                settings,
                num_images=count,
                seed=_split_seed(settings.seed, split),
                image_size=size_hw,
                image_format=image_format,
            )
    return _split_paths(out_dir, settings.num_val > 0)


def ensure_shapes_dataset(
    cache_dir: str | Path | None = None,
    config: ShapesConfig | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    image_format: str = IMAGE_FORMATS[0],
    **options: Any,
) -> dict[str, Path]:
    """Return the train/val shapes splits for these settings, generating them on first use.

    The splits live in ``cache_dir/shapes-<12 hex digits>/`` where the digits hash every setting (and the
    generator version). They are written to a temporary sibling folder that is renamed into place when
    complete, so an interrupted generation is never mistaken for a finished one, and two processes racing
    to create the same dataset both end up with one complete copy.

    Args:
        cache_dir: folder holding cached datasets (created if needed; ``~`` is expanded); default
            ``config.cache_dir``.
        config: the dataset's settings, default ``ShapesConfig()`` (see :func:`make_shapes_splits`).
        image_size: ``S`` or ``(height, width)``; default ``config.image_size``.
        image_format: one of :data:`IMAGE_FORMATS`.
        **options: ``ShapesConfig`` fields overriding ``config``'s.

    Returns:
        ``{"train_ann", "train_img_dir", "val_ann", "val_img_dir"}``: annotation files and image folders
        (without the ``val_*`` keys when ``num_val`` is 0).

    Example::

        paths = ensure_shapes_dataset(config=cfg.data.shapes)
        train = CocoDetection(paths["train_ann"], paths["train_img_dir"], train=True)
    """
    settings, size_hw = _resolve(config, image_size, options)
    params = _cache_params(settings, size_hw, image_format)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    cache_dir = Path(cache_dir if cache_dir is not None else settings.cache_dir).expanduser()
    final = cache_dir / f"shapes-{digest}"
    if not final.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-partial-", dir=cache_dir))
        try:
            make_shapes_splits(tmp, config=settings, image_size=size_hw, image_format=image_format)
            (tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; use its copy
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _split_paths(final, settings.num_val > 0)


def _cache_params(settings: ShapesConfig, size_hw: tuple[int, int], image_format: str) -> dict[str, Any]:
    """Everything the generated files depend on: the cache key (and ``params.json``)."""
    return {
        "version": _GENERATOR_VERSION,
        "num_train": int(settings.num_train),
        "num_val": int(settings.num_val),
        "image_size": list(size_hw),
        "seed": int(settings.seed),
        "min_objects": int(settings.min_objects),
        "max_objects": int(settings.max_objects),
        "size_range": [float(v) for v in settings.size_range],
        "min_visible": float(settings.min_visible),
        "distractors": [int(v) for v in settings.distractors],
        "image_format": image_format,
    }
