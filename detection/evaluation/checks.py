"""Argument and result checks of the COCO evaluation, each failing with one clear message."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..archs import IOU_TYPES
from ..data.annotations import read_json
from ..data.errors import DatasetError

__all__ = [
    "RESULT_FIELD",
    "ResultsError",
    "check_gt_keypoints",
    "check_iou_types",
    "check_result_entries",
    "check_result_fields",
    "check_result_ids",
    "first_ids",
    "load_results",
    "naming_results_file",
    "to_index",
]

# The result field each iou type reads.
RESULT_FIELD: dict[str, str] = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}
# pycocotools' OKS sigmas cover the 17 COCO person keypoints only.
_NUM_COCO_KEYPOINTS = 17
_MAX_IDS_SHOWN = 5


class ResultsError(DatasetError):
    """A COCO results file (or list) is not JSON, or holds an entry that COCOeval would misread."""


def check_iou_types(iou_types: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    iou_types = tuple(iou_types)
    if not iou_types:
        raise ValueError(f"iou_types is empty; pass one or more of {IOU_TYPES}")
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown iou type(s) {unknown} in iou_types={list(iou_types)}; valid: {IOU_TYPES}")
    if len(set(iou_types)) != len(iou_types):
        raise ValueError(f"iou_types={list(iou_types)} lists a type more than once")
    return iou_types


def to_index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got a bool ({value})")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(
                f"{what} must be an integer, got a tensor of shape {tuple(value.shape)} "
                f"and dtype {value.dtype}"
            )
        return int(value.item())
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def load_results(results: list[dict] | str | os.PathLike) -> list[dict]:
    """A results list as given, or read from a JSON file; :class:`ResultsError` names the file and the
    line and column of bad JSON, or says what the top level holds instead of a list."""
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        loaded = read_json(path, "COCO results file", ResultsError)
        if not isinstance(loaded, list):
            raise ResultsError(
                f"{path}: a COCO results file holds a JSON list of result dicts "
                "[{image_id, category_id, score, bbox}, ...], got a JSON "
                f"{'object' if isinstance(loaded, dict) else type(loaded).__name__}"
            )
        return loaded
    if not isinstance(results, list):
        raise TypeError(
            f"results must be a list of COCO result dicts or a path, got {type(results).__name__}"
        )
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(r: Any) -> str | None:
    """What is wrong with one result entry (``None`` when nothing is): the first missing or bad field."""
    if not isinstance(r, Mapping):
        return f"is a {type_name(r)}, not a dict {{image_id, category_id, score, ...}}"
    for key in ("image_id", "category_id"):
        if key not in r:
            return f"has no {key!r}"
        if isinstance(r[key], bool) or not isinstance(r[key], numbers.Integral):
            return f"has {key} {r[key]!r} ({type_name(r[key])}); expected an integer id"
    if "score" not in r:
        return "has no 'score'"
    if not _is_number(r["score"]):
        return f"has score {r['score']!r} ({type_name(r['score'])}); expected a finite number"
    bbox = r.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"has bbox {bbox!r}; expected [x, y, width, height] with 4 finite numbers"
    return None


def check_result_entries(results: list[Any]) -> None:
    """Refuse results COCOeval would score wrongly or crash on: :class:`ResultsError` names the first
    entry (its position and image_id) whose ``image_id``/``category_id``/``score``/``bbox`` is missing,
    mistyped or not finite (NaN scores would rank below every other detection)."""
    for i, r in enumerate(results):
        problem = _entry_problem(r)
        if problem is not None:
            image = f" (image_id {r['image_id']!r})" if isinstance(r, Mapping) and "image_id" in r else ""
            raise ResultsError(f"result #{i}{image} {problem}")


@contextlib.contextmanager
def naming_results_file(source: str | os.PathLike | None) -> Iterator[None]:
    """Prefix a :class:`ResultsError` raised inside with the results file it is about (if ``source``)."""
    try:
        yield
    except ResultsError as e:
        if source is None:
            raise
        raise ResultsError(f"{os.fspath(source)}: {e}") from None


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def first_ids(ids: Iterable[Any]) -> str:
    ids = sorted(ids, key=repr)
    shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_SHOWN])
    return f"[{shown}{', ...' if len(ids) > _MAX_IDS_SHOWN else ''}]"


def check_result_ids(coco_gt: Any, results: list[dict]) -> None:
    """Raise with counts and the first ids when results refer to images or categories not in the GT."""
    gt_images = set(coco_gt.getImgIds())
    gt_cats = set(coco_gt.getCatIds())
    bad_images = [r["image_id"] for r in results if r["image_id"] not in gt_images]
    if bad_images:
        raise ResultsError(
            f"{len(bad_images)} of {len(results)} results have an image_id that is not in the ground truth "
            f"({len(set(bad_images))} distinct ids, first {first_ids(set(bad_images))}; the ground truth has "
            f"{len(gt_images)} images). Evaluate against the annotation file the predictions were made on."
        )
    bad_cats = [r["category_id"] for r in results if r["category_id"] not in gt_cats]
    if bad_cats:
        raise ResultsError(
            f"{len(bad_cats)} of {len(results)} results have a category_id that is not in the ground truth "
            f"categories ({len(set(bad_cats))} distinct ids, first {first_ids(set(bad_cats))}; "
            f"ground truth ids: {first_ids(gt_cats)}). Results must carry the original COCO category ids, "
            "not contiguous labels: map them with the dataset's label → category-id table."
        )


def check_result_fields(results: list[dict], iou_type: str) -> None:
    field = RESULT_FIELD[iou_type]
    missing = [i for i, r in enumerate(results) if field not in r]
    if missing:
        hint = {
            "bbox": "Every result needs a 'bbox' [x, y, width, height].",
            "segm": "Segm evaluation needs mask predictions (compressed RLE): evaluate a Mask R-CNN "
            "or drop 'segm' from iou_types.",
            "keypoints": "Keypoint evaluation needs keypoint predictions: evaluate a Keypoint R-CNN "
            "or drop 'keypoints' from iou_types.",
        }[iou_type]
        i = missing[0]
        raise ResultsError(
            f"iou_types contains {iou_type!r} but {len(missing)} of {len(results)} results have no "
            f"{field!r} (first: result {i}, image_id {results[i]['image_id']!r}). {hint}"
        )
    if iou_type == "segm":
        bad = [i for i, r in enumerate(results) if not _is_compressed_rle(r["segmentation"])]
        if bad:
            raise ResultsError(
                f"{len(bad)} of {len(results)} results have a 'segmentation' that is not a compressed RLE "
                f"dict {{'size': [h, w], 'counts': str}} (first: result {bad[0]}); COCOeval only reads "
                "compressed RLE for results. Encode masks with pycocotools.mask.encode."
            )
    if iou_type == "keypoints":
        expected = 3 * _NUM_COCO_KEYPOINTS
        bad = [i for i, r in enumerate(results) if len(r["keypoints"]) != expected]
        if bad:
            raise ResultsError(
                f"{len(bad)} of {len(results)} results have 'keypoints' of length != {expected} (first: "
                f"result {bad[0]} with {len(results[bad[0]]['keypoints'])}); COCOeval's OKS sigmas are "
                f"defined for the {_NUM_COCO_KEYPOINTS} COCO person keypoints, as a flat [x1, y1, v1, ...]."
            )


def _is_compressed_rle(seg: Any) -> bool:
    return isinstance(seg, Mapping) and "size" in seg and isinstance(seg.get("counts"), (str, bytes))


def check_gt_keypoints(coco_gt: Any) -> None:
    anns = coco_gt.dataset.get("annotations", [])
    missing = sum(1 for a in anns if "num_keypoints" not in a or "keypoints" not in a)
    if missing:
        raise ValueError(
            f"iou_types contains 'keypoints' but {missing} of {len(anns)} ground-truth annotations have no "
            "'keypoints'/'num_keypoints' (is this a person_keypoints annotation file?)"
        )
