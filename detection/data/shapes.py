"""Synthetic "shapes" instance-segmentation dataset in COCO format, generated on demand and cached.

Each image holds 1-6 (configurable) filled circles, squares and triangles on a cluttered background:

- classes: ``circle`` (id 1), ``square`` (2), ``triangle`` (3). Consumers must go through the category
  mapping and never assume contiguous ids;
- object size (diameter / side) drawn uniformly in ``size_range`` times the image's short side; squares and
  triangles are rotated by a random angle; circles are 32-gons;
- object colours are drawn independently of the class (and kept away from the local background colour so
  every object is visible), so colour carries no class information;
- the background is a random two-colour gradient with random lines and irregular blobs in random colours
  and Gaussian noise over the whole image, so edges are not unique to objects;
- objects are painted in order and may overlap. A placement that would leave an earlier object less than
  ``min_visible`` (default 30 %) visible is redrawn elsewhere (up to a few tries, else the new object is
  not drawn), so every object in the image is annotated and every annotation is at least 30 % visible.
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

    paths = ensure_shapes_dataset("~/.cache/shapes", num_train=500, num_val=100, image_size=224, seed=0)
    train = CocoDetection(paths["train_ann"], paths["train_img_dir"], train=True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

__all__ = ["SHAPE_CATEGORIES", "ensure_shapes_dataset", "make_shapes_dataset", "make_shapes_splits"]

SHAPE_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
# Bump when the drawing changes, so cached datasets made by older code are not reused.
_GENERATOR_VERSION = 1
_PLACEMENT_TRIES = 10
_CIRCLE_VERTICES = 32
# Minimum mean absolute RGB difference between an object's colour and the background under it.
_MIN_CONTRAST = 48.0
# Polygons traced from a visible mask must reproduce it at least this well, else RLE is written.
_MIN_POLYGON_IOU = 0.98


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        height = width = image_size
    elif isinstance(image_size, Sequence) and len(image_size) == 2:
        height, width = (int(v) for v in image_size)
    else:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(height, width) < 16:
        raise ValueError(f"image_size must be at least 16 px per side, got {image_size!r}")
    return height, width


def _check_options(
    num_images: int, min_objects: int, max_objects: int, size_range: Sequence[float], min_visible: float
) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not (0 <= min_objects <= max_objects and max_objects >= 1):
        raise ValueError(
            f"need 0 <= min_objects <= max_objects and max_objects >= 1, got {min_objects} and {max_objects}"
        )
    if len(size_range) != 2 or not 0 < size_range[0] <= size_range[1] <= 1:
        raise ValueError(f"size_range must be (low, high) with 0 < low <= high <= 1, got {tuple(size_range)}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def _rasterise(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The pixels pycocotools assigns to a polygon: the dataset decodes the same mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))


def _background(rng: np.random.Generator, height: int, width: int, distractors: Sequence[int] = (1, 3)) -> np.ndarray:
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
    rng: np.random.Generator,
    height: int,
    width: int,
    min_objects: int,
    max_objects: int,
    size_range: Sequence[float],
    min_visible: float,
    distractors: Sequence[int] = (1, 3),
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image and its objects ``{"category_id", "segmentation", "mask", "full_area"}``.

    ``mask`` is what a reader decodes from ``segmentation``; ``full_area`` the pixel count before occlusion.
    """
    image = _background(rng, height, width, distractors)
    short = min(height, width)
    objects: list[dict[str, Any]] = []  # category_id, polygon, full mask, visible mask
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        category = SHAPE_CATEGORIES[int(rng.integers(len(SHAPE_CATEGORIES)))]
        size = rng.uniform(size_range[0], size_range[1]) * short
        for _try in range(_PLACEMENT_TRIES):
            polygon = _shape_polygon(rng, category["name"], size, height, width)
            mask = _rasterise(polygon, height, width).astype(bool)
            if not mask.any():
                continue
            if all(np.count_nonzero(o["visible"] & ~mask) >= min_visible * o["full_area"] for o in objects):
                break
        else:
            continue  # could not place it without hiding an earlier object: leave it out
        under = image[mask].astype(np.float32).mean(axis=0)
        colour = rng.uniform(0, 255, 3)
        for _retry in range(20):
            if np.abs(colour - under).mean() >= _MIN_CONTRAST:
                break
            colour = rng.uniform(0, 255, 3)
        image[mask] = np.round(colour).astype(np.uint8)
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

    annotations = []
    for o in objects:
        if int(o["visible"].sum()) == o["full_area"]:
            segmentation, decoded = [o["polygon"]], o["visible"]
        else:
            segmentation, decoded = _visible_segmentation(o["visible"].astype(np.uint8))
        annotations.append(
            {
                "category_id": o["category_id"],
                "segmentation": segmentation,
                "mask": decoded,
                "full_area": o["full_area"],
            }
        )
    return image, annotations


def _mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def make_shapes_dataset(
    out_dir: str | Path,
    *,
    num_images: int,
    image_size: int | tuple[int, int],
    seed: int,
    min_objects: int = 1,
    max_objects: int = 6,
    size_range: tuple[float, float] = (0.10, 0.45),
    min_visible: float = 0.3,
    distractors: tuple[int, int] = (1, 3),
    image_format: Literal["png", "jpg"] = "png",
) -> Path:
    """Write one split: ``out_dir/images/<id>.<ext>`` and ``out_dir/annotations/instances.json``.

    Args:
        out_dir: destination folder (created; existing files with the same names are overwritten).
        num_images: number of images; image ids are ``1..num_images``.
        image_size: ``S`` for ``S x S`` images, or ``(height, width)``.
        seed: random seed; the same seed and arguments give byte-identical files.
        min_objects: fewest objects drawn per image (0 allows images without objects, i.e. negatives).
        max_objects: most objects drawn per image. An object that cannot be placed without hiding an
            earlier one is left out, so an image can hold fewer than ``min_objects`` (but the first object
            always fits, so never zero when ``min_objects >= 1``).
        size_range: object size (circle diameter, square / triangle side) as a fraction of the short side.
        min_visible: every annotated object keeps at least this fraction of its pixels visible.
        distractors: ``(fewest, most)`` irregular unannotated blobs painted into each background.
        image_format: ``"png"`` (lossless, default) or ``"jpg"`` (quality 90).

    Returns:
        Path of the written ``instances.json``.
    """
    height, width = _size_hw(image_size)
    _check_options(num_images, min_objects, max_objects, size_range, min_visible)
    if len(distractors) != 2 or not 0 <= distractors[0] <= distractors[1]:
        raise ValueError(f"distractors must be (fewest, most) with 0 <= fewest <= most, got {tuple(distractors)}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    ann_id = 1
    for index in range(num_images):
        image_id = index + 1
        rng = np.random.default_rng([int(seed), index])
        pixels, objects = _draw_image(
            rng, height, width, min_objects, max_objects, size_range, min_visible, tuple(distractors)
        )
        file_name = f"{image_id:06d}.{image_format}"
        pil = Image.fromarray(pixels)
        if image_format == "png":
            pil.save(out_dir / "images" / file_name, format="PNG", compress_level=1)
        else:
            pil.save(out_dir / "images" / file_name, format="JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "segmentation": obj["segmentation"],
                    "area": float(np.count_nonzero(obj["mask"])),
                    "bbox": _mask_bbox_xywh(obj["mask"]),
                    "iscrowd": 0,
                }
            )
            ann_id += 1

    data = {
        "info": {
            "description": "synthetic shapes (circle, square, triangle)",
            "generator_version": _GENERATOR_VERSION,
            "seed": int(seed),
            "image_size": [height, width],
            "objects_per_image": [min_objects, max_objects],
            "size_range": list(size_range),
            "min_visible": min_visible,
            "distractors": list(distractors),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SHAPE_CATEGORIES],
    }
    ann_file = out_dir / "annotations" / "instances.json"
    ann_file.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return ann_file


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([int(seed), {"train": 0, "val": 1}[split]]).generate_state(1)[0])


def make_shapes_splits(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int],
    seed: int,
    **options: Any,
) -> dict[str, Path]:
    """Write ``out_dir/train`` and ``out_dir/val`` with :func:`make_shapes_dataset` (seeds derived per split).

    Args:
        out_dir: destination folder.
        num_train: training images.
        num_val: validation images (0: no ``val`` split).
        image_size: ``S`` or ``(height, width)``.
        seed: base seed; train and val use different seeds derived from it.
        **options: ``min_objects``, ``max_objects``, ``size_range``, ``min_visible``, ``distractors``,
            ``image_format``.

    Returns:
        ``{"train_ann", "train_img_dir", "val_ann", "val_img_dir"}`` (no ``val_*`` keys when ``num_val`` is 0).
    """
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        if split == "val" and count == 0:
            continue
        ann = make_shapes_dataset(
            out_dir / split, num_images=count, image_size=image_size, seed=_split_seed(seed, split), **options
        )
        paths[f"{split}_ann"] = ann
        paths[f"{split}_img_dir"] = out_dir / split / "images"
    return paths


def ensure_shapes_dataset(
    cache_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int],
    seed: int,
    min_objects: int = 1,
    max_objects: int = 6,
    size_range: tuple[float, float] = (0.10, 0.45),
    min_visible: float = 0.3,
    distractors: tuple[int, int] = (1, 3),
    image_format: Literal["png", "jpg"] = "png",
) -> dict[str, Path]:
    """Return the train/val shapes splits for these parameters, generating them on first use.

    The splits live in ``cache_dir/shapes-<12 hex digits>/`` where the digits hash every parameter (and the
    generator version). They are written to a temporary sibling folder that is renamed into place when
    complete, so an interrupted generation is never mistaken for a finished one, and two processes racing
    to create the same dataset both end up with one complete copy.

    Args:
        cache_dir: folder holding cached datasets (created if needed; ``~`` is expanded).
        num_train: training images.
        num_val: validation images (0: train split only).
        image_size: ``S`` or ``(height, width)``.
        seed: base seed (train and val use different seeds derived from it).
        min_objects: fewest objects drawn per image.
        max_objects: most objects drawn per image.
        size_range: object size as a fraction of the image's short side.
        min_visible: fraction of its pixels every annotated object keeps visible.
        distractors: ``(fewest, most)`` irregular unannotated blobs per background.
        image_format: ``"png"`` or ``"jpg"``.

    Returns:
        ``{"train_ann", "train_img_dir", "val_ann", "val_img_dir"}``: annotation files and image folders
        (without the ``val_*`` keys when ``num_val`` is 0).
    """
    size_hw = _size_hw(image_size)
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if num_val < 0:
        raise ValueError(f"num_val must be >= 0 (0: no validation split), got {num_val}")
    params = {
        "version": _GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": list(size_hw),
        "seed": int(seed),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "size_range": [float(v) for v in size_range],
        "min_visible": float(min_visible),
        "distractors": [int(v) for v in distractors],
        "image_format": image_format,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"shapes-{digest}"
    options = {
        "min_objects": min_objects,
        "max_objects": max_objects,
        "size_range": tuple(size_range),
        "min_visible": min_visible,
        "distractors": tuple(distractors),
        "image_format": image_format,
    }

    def paths(root: Path) -> dict[str, Path]:
        out = {
            "train_ann": root / "train" / "annotations" / "instances.json",
            "train_img_dir": root / "train" / "images",
        }
        if num_val > 0:
            out["val_ann"] = root / "val" / "annotations" / "instances.json"
            out["val_img_dir"] = root / "val" / "images"
        return out

    if final.is_dir():
        return paths(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-partial-", dir=cache_dir))
    try:
        make_shapes_splits(
            tmp, num_train=num_train, num_val=num_val, image_size=size_hw, seed=seed, **options
        )
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
    return paths(final)
