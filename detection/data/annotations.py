"""COCO annotation files: loading and validation, the pycocotools ``COCO`` object, boxes and masks.

- :func:`load_annotation_file` reads an ``instances_*.json`` and checks its top-level structure;
  :func:`check_entries` checks required keys, unique ids and references.
- :func:`make_coco` builds a ``COCO`` object (pycocotools', or another implementation of its API) from an
  annotation dict or file without pycocotools' progress prints; the dataset and the evaluation use it.
- :func:`build_records` turns the file into per-image records: boxes converted to clipped xyxy, degenerate
  ones dropped, labels from a :class:`~detection.data.categories.CategoryMapping`.
- :func:`decode_segmentation` decodes COCO segmentations (polygons, RLE) into binary masks.

pycocotools is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torchvision.ops import box_convert

from .categories import CategoryMapping
from .errors import DatasetError
from .segments import segmentation_problem

__all__ = [
    "ImageRecord",
    "build_records",
    "check_entries",
    "decode_segmentation",
    "load_annotation_file",
    "make_coco",
    "segmentation_rle",
]

_REQUIRED_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
_REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
# How many offending ids an error message shows before "...".
_SHOW_FIRST = 5
# How many ids a report of dropped annotations lists before the count.
_LIST_FIRST = 10
# Boxes narrower or shorter than this (pixels, after clipping to the image) are dropped.
_MIN_BOX_SIZE = 1.0


# ---------------------------------------------------------------------------------------------------------
# The COCO object
# ---------------------------------------------------------------------------------------------------------


def make_coco(source: Mapping[str, Any] | str | os.PathLike[str], coco_cls: type | None = None) -> Any:
    """A ``COCO`` object indexed from an annotation dict (used as is, not copied) or an annotation file.

    Args:
        source: the annotation dict, or the path of a COCO JSON file.
        coco_cls: the ``COCO`` class to build (default ``pycocotools.coco.COCO``; e.g.
            ``faster_coco_eval.COCO`` for that backend).

    pycocotools prints progress lines while loading and indexing; they are kept off the console.
    """
    if coco_cls is None:
        from pycocotools.coco import COCO as coco_cls
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(source, (str, os.PathLike)):
            return coco_cls(os.fspath(source))
        coco = coco_cls()
        coco.dataset = source
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------------------------------------
# JSON loading and validation
# ---------------------------------------------------------------------------------------------------------


def read_json(path: Path, what: str, error: type[Exception] = DatasetError) -> Any:
    """The parsed JSON of ``path``; a missing file, bad JSON or non-UTF-8 text is one ``error`` line naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a UTF-8 text file ({e.reason})") from None


def load_annotation_file(path: Path) -> dict[str, Any]:
    """Read a COCO instances JSON; ``DatasetError`` naming the file for bad JSON or missing top-level lists."""
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object with keys {list(_REQUIRED_TOP_LEVEL_KEYS)}, "
            f"got a {type(data).__name__}"
        )
    for key in _REQUIRED_TOP_LEVEL_KEYS:
        if key not in data:
            raise DatasetError(
                f"{path}: missing top-level key '{key}' (a COCO instances file needs "
                f"{', '.join(repr(k) for k in _REQUIRED_TOP_LEVEL_KEYS)}; present: {sorted(data)})"
            )
        if not isinstance(data[key], list):
            raise DatasetError(
                f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}"
            )
    return data


def check_entries(path: Path, data: dict[str, Any], with_masks: bool) -> None:
    """Required keys, unique ids and references; each problem raises with the first few offenders."""
    for key, required in (("images", _REQUIRED_IMAGE_KEYS), ("annotations", _REQUIRED_ANNOTATION_KEYS)):
        if with_masks and key == "annotations":
            required = (*required, "segmentation")
        for i, entry in enumerate(data[key]):
            missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
            if missing:
                ident = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
                raise DatasetError(
                    f"{path}: {key} entry {ident} is missing key(s) {missing}; each entry of '{key}' needs "
                    f"{list(required)}"
                )
    for img in data["images"]:
        bad = [k for k in ("height", "width") if isinstance(img[k], bool) or not isinstance(img[k], int) or img[k] < 1]
        if bad:
            raise DatasetError(
                f"{path}: image {img['id']} has {bad[0]} {img[bad[0]]!r}; expected a positive integer (pixels)"
            )
    for key in ("images", "annotations"):
        ids = [entry["id"] for entry in data[key]]
        if len(set(ids)) != len(ids):
            dups = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise DatasetError(
                f"{path}: {len(dups)} duplicated id(s) in '{key}', first: {dups[:_SHOW_FIRST]}; ids must be unique"
            )

    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat.get("id") for cat in data["categories"] if isinstance(cat, dict)}
    for field, known, what in (("image_id", image_ids, "images"), ("category_id", cat_ids, "categories")):
        bad = [(a["id"], a[field]) for a in data["annotations"] if a[field] not in known]
        if bad:
            shown = ", ".join(f"annotation {aid} -> {field} {ref}" for aid, ref in bad[:_SHOW_FIRST])
            more = f" (first {_SHOW_FIRST} shown)" if len(bad) > _SHOW_FIRST else ""
            raise DatasetError(
                f"{path}: {len(bad)} annotation(s) reference a {field} that is not in '{what}': {shown}{more}"
            )


# ---------------------------------------------------------------------------------------------------------
# Per-image records
# ---------------------------------------------------------------------------------------------------------


class ImageRecord(NamedTuple):
    """One image of an annotation file, with its kept annotations as arrays."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, clipped
    labels: np.ndarray  # int64 [N]
    areas: np.ndarray  # float32 [N]
    iscrowd: np.ndarray  # int64 [N]
    ann_ids: tuple[int, ...]
    segmentations: tuple[Any, ...]


def _clipped_xyxy(path: Path, anns: Sequence[dict[str, Any]], sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """COCO xywh boxes -> float64 xyxy clipped to their image (``sizes``: its (height, width) per box).

    ``DatasetError`` names the first annotation whose bbox is not 4 finite numbers.
    """
    values = []
    for ann in anns:
        bbox = ann["bbox"]
        try:
            box = [float(v) for v in bbox] if isinstance(bbox, (list, tuple)) else []
        except (TypeError, ValueError):
            box = []
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise DatasetError(
                f"{path}: annotation {ann['id']} has a malformed bbox {bbox!r}; expected "
                "[x, y, width, height] with 4 finite numbers"
            )
        values.append(box)
    boxes = box_convert(torch.tensor(values, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy").numpy()
    # Clipped here, for the whole file at once: torchvision's clip_boxes_to_image takes one image size.
    wh = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[:, ::-1]
    return np.minimum(np.maximum(boxes, 0.0), np.concatenate([wh, wh], axis=1))


def _image_record(
    path: Path,
    img: dict[str, Any],
    anns: list[dict[str, Any]],
    boxes: np.ndarray,
    box_areas: list[float],
    categories: CategoryMapping,
) -> ImageRecord:
    """The record of one image from its kept annotations, their clipped xyxy ``boxes`` and box areas."""
    height, width = int(img["height"]), int(img["width"])
    return ImageRecord(
        image_id=int(img["id"]),
        file_name=str(img["file_name"]),
        height=height,
        width=width,
        boxes=boxes,
        labels=np.asarray([categories.to_label(a["category_id"]) for a in anns], dtype=np.int64),
        areas=np.asarray([float(a.get("area", s)) for a, s in zip(anns, box_areas)], dtype=np.float32),
        iscrowd=np.asarray([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=np.int64),
        ann_ids=tuple(int(a["id"]) for a in anns),
        segmentations=tuple(a.get("segmentation") for a in anns),
    )


def build_records(
    path: Path,
    data: dict[str, Any],
    categories: CategoryMapping,
    *,
    train: bool,
    filter_empty: bool,
    with_masks: bool,
    on_bad_annotation: Literal["error", "skip"] = "error",
) -> tuple[list[ImageRecord], list[str], set[int]]:
    """Records of every image sorted by id, one-line reports of the dropped annotations (by id), and the
    ids of the annotations dropped for an invalid segmentation.

    ``train`` drops crowd annotations and, with ``filter_empty``, images left without annotations. Boxes
    narrower or shorter than 1 px after clipping are dropped with their annotation. With ``with_masks``
    every kept segmentation is checked (:func:`~detection.data.segments.segmentation_problem`): an invalid
    one raises ``DatasetError`` naming the file, annotation and image, or under
    ``on_bad_annotation="skip"`` is dropped with its annotation and reported.
    """
    anns_by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if not (train and ann.get("iscrowd", 0)):
            anns_by_image[ann["image_id"]].append(ann)
    images = sorted(data["images"], key=lambda im: im["id"])
    flat = [ann for img in images for ann in anns_by_image[img["id"]]]
    sizes = [(int(img["height"]), int(img["width"])) for img in images for _ in anns_by_image[img["id"]]]
    boxes = _clipped_xyxy(path, flat, sizes)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (widths >= _MIN_BOX_SIZE) & (heights >= _MIN_BOX_SIZE)
    small = [ann["id"] for ann, k in zip(flat, keep) if not k]
    bad_masks = _bad_segmentations(path, flat, sizes, keep, on_bad_annotation) if with_masks else {}
    for i, ann in enumerate(flat):
        keep[i] &= ann["id"] not in bad_masks
    areas, boxes = widths * heights, boxes.astype(np.float32)
    records = []
    start = 0
    for img in images:
        anns = anns_by_image[img["id"]]
        kept = np.flatnonzero(keep[start : start + len(anns)])
        rows = start + kept
        kept_anns = [anns[i] for i in kept]
        record = _image_record(path, img, kept_anns, boxes[rows], areas[rows].tolist(), categories)
        start += len(anns)
        if not (train and filter_empty and len(record.boxes) == 0):
            records.append(record)
    reports = []
    if small:
        reports.append(
            f"{path}: dropped {len(small)} annotation(s) whose box is narrower or shorter than "
            f"{_MIN_BOX_SIZE:g} px after clipping to the image: ids {listed(small)}"
        )
    if bad_masks:
        reports.append(
            f"{path}: skipped {len(bad_masks)} annotation(s) with an invalid segmentation "
            f"(data.on_bad_annotation: skip): ids {listed(list(bad_masks))}; first: annotation "
            f"{next(iter(bad_masks))} {next(iter(bad_masks.values()))}"
        )
    return records, reports, set(bad_masks)


def listed(ids: Sequence[Any], first: int = _LIST_FIRST) -> str:
    """``"1, 2, 3"``, or the first ``first`` ids and ``"... (N in all)"``."""
    shown = ", ".join(str(i) for i in ids[:first])
    return shown if len(ids) <= first else f"{shown}, ... ({len(ids)} in all)"


def _bad_segmentations(
    path: Path,
    anns: Sequence[dict[str, Any]],
    sizes: Sequence[tuple[int, int]],
    keep: np.ndarray,
    on_bad_annotation: str,
) -> dict[int, str]:
    """Annotation id -> problem for the kept annotations whose segmentation is invalid; raises under "error"."""
    bad: dict[int, str] = {}
    for ann, (height, width), kept in zip(anns, sizes, keep):
        if not kept:
            continue
        problem = segmentation_problem(ann["segmentation"], height, width)
        if problem is None:
            continue
        if on_bad_annotation == "error":
            raise DatasetError(
                f"{path}: annotation {ann['id']} (image {ann['image_id']}) {problem}; fix it, or set "
                "data.on_bad_annotation: skip to drop such annotations"
            )
        bad[ann["id"]] = problem
    return bad


# ---------------------------------------------------------------------------------------------------------
# Segmentation decoding
# ---------------------------------------------------------------------------------------------------------


def segmentation_rle(segmentation: Any, height: int, width: int) -> Any | None:
    """A COCO segmentation as one RLE, as ``COCO.annToRLE`` builds it; None when there is nothing to draw.

    Polygons go through ``pycocotools.mask.frPyObjects`` and are merged, an uncompressed RLE through
    ``frPyObjects``, a compressed RLE is used as is.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        # pycocotools reads a 4-number polygon as a box and rejects shorter ones: such polygons (fewer than
        # 3 points) have no area, so they are left out instead.
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation
    return None


def decode_segmentation(
    segmentations: Sequence[Any], height: int, width: int, *, names: Sequence[str] | None = None
) -> np.ndarray:
    """Decode COCO segmentations into binary masks with ``pycocotools.mask.decode``.

    Args:
        segmentations: per-object COCO ``segmentation`` values: a list of polygons ``[[x0, y0, x1, ...], ...]``
            (merged into one mask), an uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` or a
            compressed RLE ``{"size": [h, w], "counts": str | bytes}``.
        height: image height in pixels.
        width: image width in pixels.
        names: what to call each entry in an error message (default ``"segmentation #i"``).

    Returns:
        ``uint8`` array ``[N, height, width]`` with values in ``{0, 1}``. An object without a usable
        segmentation gets an all-zero mask.

    Raises:
        DatasetError: an RLE's size is not the image size, or pycocotools cannot decode it.
    """
    from pycocotools import mask as mask_utils

    try:
        import cv2
    except ImportError:  # optional: only speeds up the copy below
        cv2 = None

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, seg in enumerate(segmentations):
        try:
            rle = segmentation_rle(seg, height, width)
            if rle is None:
                continue
            decoded = mask_utils.decode(rle)  # column-major (Fortran) [height, width]
        except Exception as e:  # pycocotools raises bare Exception / TypeError / ValueError
            name = names[i] if names is not None else f"segmentation #{i}"
            raise DatasetError(f"{name} cannot be decoded: {type(e).__name__}: {e}") from e
        if decoded.shape != (height, width):
            name = names[i] if names is not None else f"segmentation #{i}"
            raise DatasetError(
                f"{name}: RLE size {list(decoded.shape)} differs from the image size [{height}, {width}]"
            )
        if cv2 is not None:
            # OpenCV's transpose of the row-major view is a much faster Fortran -> C copy than numpy's.
            cv2.transpose(decoded.T, dst=masks[i])
        else:
            masks[i] = decoded
    return masks
