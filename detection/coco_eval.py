"""COCO evaluation: torchvision detector outputs → COCO results → COCOeval metrics.

The pieces, from the bottom up:

- :func:`predictions_to_coco_results` turns one image's torchvision output (``boxes`` xyxy, ``scores``,
  contiguous ``labels`` 1..K, optional ``masks`` and ``keypoints``) into COCO result dicts with the
  original category ids, ``bbox`` in xywh and masks as compressed RLE.
- :func:`evaluate_coco_results` scores a list of COCO result dicts (or a results JSON file written by any
  detector) against a COCO annotation file with ``COCOeval`` for ``"bbox"``, ``"segm"`` and
  ``"keypoints"``. It prints pycocotools' 12-line summary and a per-category AP table and returns a flat
  dict of metrics in percent, as detectron2 reports them (``bbox/AP``, ``bbox/AP50``, ...,
  ``bbox/AP-person``).
- :class:`CocoEvaluator` collects outputs during an evaluation loop, gathers them across ranks and calls
  :func:`evaluate_coco_results`.
- :func:`write_metrics` / :func:`write_results` write JSON atomically.

pycocotools (and the optional ``faster-coco-eval``) are imported inside the functions that need them, so
importing this module costs nothing on a machine without them.

Example::

    evaluator = CocoEvaluator("annotations/instances_val2017.json", label_to_cat_id, ("bbox", "segm"))
    for images, targets in loader:
        outputs = model(images)
        evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
    evaluator.synchronize()
    metrics = evaluator.evaluate()  # {"bbox/AP": 37.9, ..., "segm/AP-person": 46.1}
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only; pycocotools is imported lazily at run time
    from pycocotools.coco import COCO

__all__ = [
    "BACKENDS",
    "CocoEvaluator",
    "IOU_TYPES",
    "evaluate_coco_results",
    "load_coco_gt",
    "predictions_to_coco_results",
    "run_cocoeval",
    "write_metrics",
    "write_results",
]

Backend = Literal["pycocotools", "faster_coco_eval"]
IouType = Literal["bbox", "segm", "keypoints"]

IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")
BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")

# Names of the AP entries of COCOeval.stats, in order (the AR entries are not part of the flat dict).
_STAT_NAMES: dict[str, tuple[str, ...]] = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl"),
}
# The result field each iou type reads.
_RESULT_FIELD: dict[str, str] = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}
# pycocotools' OKS sigmas cover the 17 COCO person keypoints only.
_NUM_COCO_KEYPOINTS = 17
_MAX_IDS_SHOWN = 5


# ----------------------------------------------------------------------------------------------------------
# Backends and ground truth
# ----------------------------------------------------------------------------------------------------------


def _backend_api(backend: str) -> tuple[type, type]:
    """(COCO class, COCOeval class) of ``backend``, imported lazily."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as exc:
            raise ImportError(
                "backend='faster_coco_eval' needs the optional package faster-coco-eval, which is not "
                "installed. Install it with `pip install faster-coco-eval`, or use the default "
                "backend='pycocotools'."
            ) from exc
        return COCO, COCOeval_faster
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_iou_types(iou_types: Sequence[str] | str) -> tuple[str, ...]:
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


def load_coco_gt(source: Any, backend: Backend = "pycocotools") -> Any:
    """Load COCO ground truth as the ``COCO`` object of ``backend``.

    Args:
        source: a path to a COCO annotation JSON, the annotation dict itself, or an already loaded ``COCO``
            object (of either backend; one of the other backend is re-indexed from its ``dataset``).
        backend: ``"pycocotools"`` (default) or ``"faster_coco_eval"``.

    Returns:
        The backend's ``COCO`` object. pycocotools' loading chatter is suppressed. A dict is indexed, not
        copied, and segm evaluation converts its polygons to RLE in place (as pycocotools always does).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        TypeError: ``source`` is none of the accepted kinds.
    """
    coco_cls, _ = _backend_api(backend)
    if isinstance(source, coco_cls):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_cls(str(path))
    dataset = getattr(source, "dataset", source)
    if not isinstance(dataset, Mapping):
        raise TypeError(
            "coco_gt must be a pycocotools COCO object, a path to a COCO annotation JSON or the annotation "
            f"dict, got {type(source).__name__}"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_cls()
        coco.dataset = dict(dataset)
        coco.createIndex()
    return coco


def _load_results(results: list[dict] | str | os.PathLike) -> list[dict]:
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"COCO results file not found: {path}")
        with open(path) as f:
            loaded = json.load(f)
        if not isinstance(loaded, list):
            raise ValueError(
                f"{path}: a COCO results file holds a JSON list of result dicts, got a "
                f"{type(loaded).__name__}"
            )
        return loaded
    if not isinstance(results, list):
        raise TypeError(
            f"results must be a list of COCO result dicts or a path, got {type(results).__name__}"
        )
    return results


def _first(ids: Iterable[Any]) -> str:
    ids = sorted(ids, key=repr)
    shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_SHOWN])
    return f"[{shown}{', ...' if len(ids) > _MAX_IDS_SHOWN else ''}]"


def _check_result_ids(coco_gt: Any, results: list[dict]) -> None:
    """Raise with counts and the first ids when results refer to images or categories not in the GT."""
    gt_images = set(coco_gt.getImgIds())
    gt_cats = set(coco_gt.getCatIds())
    for r in results:
        if not isinstance(r, Mapping) or "image_id" not in r or "category_id" not in r or "score" not in r:
            raise ValueError(
                "every COCO result needs 'image_id', 'category_id' and 'score'; got "
                f"{sorted(r) if isinstance(r, Mapping) else type(r).__name__}"
            )
    bad_images = [r["image_id"] for r in results if r["image_id"] not in gt_images]
    if bad_images:
        raise ValueError(
            f"{len(bad_images)} of {len(results)} results have an image_id that is not in the ground truth "
            f"({len(set(bad_images))} distinct ids, first {_first(set(bad_images))}; the ground truth has "
            f"{len(gt_images)} images). Evaluate against the annotation file the predictions were made on."
        )
    bad_cats = [r["category_id"] for r in results if r["category_id"] not in gt_cats]
    if bad_cats:
        raise ValueError(
            f"{len(bad_cats)} of {len(results)} results have a category_id that is not in the ground truth "
            f"categories ({len(set(bad_cats))} distinct ids, first {_first(set(bad_cats))}; "
            f"ground truth ids: {_first(gt_cats)}). Results must carry the original COCO category ids, "
            "not contiguous labels: map them with the dataset's label → category-id table."
        )


def _check_result_fields(results: list[dict], iou_type: str) -> None:
    field = _RESULT_FIELD[iou_type]
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
        raise ValueError(
            f"iou_types contains {iou_type!r} but {len(missing)} of {len(results)} results have no "
            f"{field!r} (first: result {i}, image_id {results[i]['image_id']!r}). {hint}"
        )
    if iou_type == "segm":
        bad = [i for i, r in enumerate(results) if not _is_compressed_rle(r["segmentation"])]
        if bad:
            raise ValueError(
                f"{len(bad)} of {len(results)} results have a 'segmentation' that is not a compressed RLE "
                f"dict {{'size': [h, w], 'counts': str}} (first: result {bad[0]}); COCOeval only reads "
                "compressed RLE for results. Encode masks with pycocotools.mask.encode."
            )
    if iou_type == "keypoints":
        expected = 3 * _NUM_COCO_KEYPOINTS
        bad = [i for i, r in enumerate(results) if len(r["keypoints"]) != expected]
        if bad:
            raise ValueError(
                f"{len(bad)} of {len(results)} results have 'keypoints' of length != {expected} (first: "
                f"result {bad[0]} with {len(results[bad[0]]['keypoints'])}); COCOeval's OKS sigmas are "
                f"defined for the {_NUM_COCO_KEYPOINTS} COCO person keypoints, as a flat [x1, y1, v1, ...]."
            )


def _is_compressed_rle(seg: Any) -> bool:
    return isinstance(seg, Mapping) and "size" in seg and isinstance(seg.get("counts"), (str, bytes))


def _check_gt_keypoints(coco_gt: Any) -> None:
    anns = coco_gt.dataset.get("annotations", [])
    missing = sum(1 for a in anns if "num_keypoints" not in a or "keypoints" not in a)
    if missing:
        raise ValueError(
            f"iou_types contains 'keypoints' but {missing} of {len(anns)} ground-truth annotations have no "
            "'keypoints'/'num_keypoints' (is this a person_keypoints annotation file?)"
        )


# ----------------------------------------------------------------------------------------------------------
# Predictions → COCO results
# ----------------------------------------------------------------------------------------------------------


def _to_index(value: Any, what: str) -> int:
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


def _cat_ids_for(
    labels: list[int], label_to_cat_id: Callable[[int], int] | Mapping[int, int], image_id: int
) -> dict[int, int]:
    table: dict[int, int] = {}
    for label in set(labels):
        if isinstance(label_to_cat_id, Mapping):
            if label not in label_to_cat_id:
                known = sorted(label_to_cat_id)
                span = f"{known[0]}..{known[-1]}" if known else "none"
                raise ValueError(
                    f"label {label} (image_id {image_id}) has no entry in label_to_cat_id, which maps "
                    f"{len(known)} labels ({span}). torchvision labels are contiguous 1..K with 0 for "
                    "background; build the table from the dataset's category ids sorted ascending."
                )
            cat_id = label_to_cat_id[label]
        else:
            cat_id = label_to_cat_id(label)
        table[label] = _to_index(cat_id, f"category id of label {label}")
    return table


def _float_cpu(t: Tensor) -> Tensor:
    # Outputs under autocast may be bf16/fp16 (4 px spacing at 512..1024 in bf16): report them in fp32.
    return t.detach().to(device="cpu", dtype=torch.float32)


def predictions_to_coco_results(
    image_id: int,
    prediction: Mapping[str, Tensor],
    label_to_cat_id: Callable[[int], int] | Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert one image's torchvision detector output into COCO result dicts.

    Args:
        image_id: the COCO image id (may exceed 2**31; kept as a Python int).
        prediction: torchvision ``GeneralizedRCNN`` output for one image, in original-image pixels:
            ``boxes`` float [N, 4] (x1, y1, x2, y2), ``scores`` float [N], ``labels`` int64 [N] in 1..K,
            optional ``masks`` float [N, 1, H, W] (or [N, H, W]) probabilities in [0, 1], optional
            ``keypoints`` float [N, 17, 3]. Any device and any float dtype (bf16/fp16 from autocast are
            cast to float32 first).
        label_to_cat_id: contiguous label → original COCO category id, as a mapping or a callable.
        mask_threshold: a mask pixel is foreground when its probability is > this value.

    Returns:
        N dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
        ``"segmentation"`` (compressed RLE, ``counts`` as str, JSON-serialisable) when masks are present and
        ``"keypoints"`` (flat [x1, y1, v1, ...]) when keypoints are present. All values are Python types.

    Raises:
        KeyError: a required key is missing from ``prediction``.
        ValueError: shapes disagree, or a label has no category id.

    Example::

        >>> out = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]), "scores": torch.tensor([0.9]),
        ...        "labels": torch.tensor([1])}
        >>> predictions_to_coco_results(42, out, {1: 1})[0]["bbox"]
        [10.0, 20.0, 40.0, 60.0]
    """
    image_id = _to_index(image_id, "image_id")
    for key in ("boxes", "scores", "labels"):
        if key not in prediction:
            raise KeyError(
                f"prediction for image_id {image_id} has no {key!r}; expected torchvision detector output "
                f"with 'boxes', 'scores', 'labels' (got keys {sorted(prediction)})"
            )
    boxes = _float_cpu(prediction["boxes"])
    scores = _float_cpu(prediction["scores"])
    labels = prediction["labels"].detach().cpu()
    n = boxes.shape[0]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"prediction['boxes'] for image_id {image_id} must be [N, 4], got {tuple(boxes.shape)}"
        )
    if tuple(scores.shape) != (n,) or tuple(labels.shape) != (n,):
        raise ValueError(
            f"prediction for image_id {image_id}: 'scores' {tuple(scores.shape)} and 'labels' "
            f"{tuple(labels.shape)} must both be [N] with N = {n} boxes"
        )
    if n == 0:
        return []

    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    label_list = [int(v) for v in labels.tolist()]
    cat_ids = _cat_ids_for(label_list, label_to_cat_id, image_id)
    results = [
        {"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score}
        for label, box, score in zip(label_list, xywh.tolist(), scores.tolist(), strict=True)
    ]

    masks = prediction.get("masks")
    if masks is not None:
        from pycocotools import mask as mask_utils

        masks = _float_cpu(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(
                f"prediction['masks'] for image_id {image_id} must be [N, 1, H, W] with N = {n}, "
                f"got {tuple(prediction['masks'].shape)}"
            )
        # pycocotools wants uint8 [H, W, N] in Fortran order: the memory layout of a C-contiguous
        # [N, W, H], so one transpose copy of the boolean masks is all that is needed.
        binary = (masks > mask_threshold).transpose(1, 2).contiguous().numpy().view(np.uint8)
        rles = mask_utils.encode(binary.transpose(2, 1, 0))
        for result, rle in zip(results, rles, strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            result["segmentation"] = rle

    keypoints = prediction.get("keypoints")
    if keypoints is not None:
        keypoints = _float_cpu(keypoints)
        if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
            raise ValueError(
                f"prediction['keypoints'] for image_id {image_id} must be [N, K, 3] with N = {n}, "
                f"got {tuple(keypoints.shape)}"
            )
        for result, kps in zip(results, keypoints.reshape(n, -1).tolist(), strict=True):
            result["keypoints"] = kps
    return results


# ----------------------------------------------------------------------------------------------------------
# COCOeval
# ----------------------------------------------------------------------------------------------------------


def run_cocoeval(
    coco_gt: Any,
    results: list[dict],
    iou_type: IouType,
    *,
    backend: Backend = "pycocotools",
    image_ids: Sequence[int] | None = None,
) -> tuple[Any, list[str]] | None:
    """Run loadRes + evaluate + accumulate + summarize for one iou type.

    The building block of :func:`evaluate_coco_results` (which validates ids and fields first); exposed for
    benchmarks that need the full ``COCOeval`` object (``stats``, ``eval["precision"]``).

    Args:
        coco_gt: ground truth, the ``COCO`` object of ``backend`` (see :func:`load_coco_gt`).
        results: COCO result dicts; they are shallow-copied, never modified (``loadRes`` writes into them).
        iou_type: ``"bbox"``, ``"segm"`` or ``"keypoints"``.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
        image_ids: evaluate only these images (default: all ground-truth images).

    Returns:
        ``(coco_eval, summary_lines)`` with the 12 (keypoints: 10) summary lines COCOeval printed, or None
        when ``results`` is empty (pycocotools' ``loadRes`` cannot take an empty list).
    """
    _, cocoeval_cls = _backend_api(backend)
    if not results:
        return None
    if iou_type == "segm":
        # With a 'bbox' present, loadRes takes the box area as the instance area, which moves detections
        # between the small/medium/large ranges; without it the mask area is used (as detectron2 does).
        dts = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        dts = [dict(r) for r in results]

    captured = io.StringIO()
    lines: list[str] = []
    with contextlib.redirect_stdout(captured):
        coco_dt = coco_gt.loadRes(dts)
        if backend == "faster_coco_eval":
            coco_eval = cocoeval_cls(coco_gt, coco_dt, iou_type, print_function=lines.append)
        else:
            coco_eval = cocoeval_cls(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    lines.extend(captured.getvalue().splitlines())
    summary = [line for line in lines if line.lstrip().startswith("Average")]
    return coco_eval, summary


def _percent(value: float) -> float:
    # COCOeval reports -1 when a cell has no ground truth (e.g. no small objects): that is "undefined".
    return float("nan") if value < 0 else float(value) * 100.0


def _category_names(coco_gt: Any, class_names: Mapping[int, str] | None) -> dict[int, str]:
    names = {int(cid): str(cat.get("name", cid)) for cid, cat in coco_gt.cats.items()}
    if class_names:
        unknown = [cid for cid in class_names if cid not in names]
        if unknown:
            raise ValueError(
                f"class_names has category ids {_first(unknown)} that are not in the ground-truth "
                f"categories {_first(names)}; class_names is keyed by COCO category id"
            )
        names.update({int(cid): str(n) for cid, n in class_names.items()})
    return names


def _per_category_keys(cat_ids: Sequence[int], names: Mapping[int, str], iou_type: str) -> dict[int, str]:
    seen: dict[str, int] = {}
    keys: dict[int, str] = {}
    for cid in cat_ids:
        name = names[cid]
        if name in seen:
            # Two categories sharing a name would overwrite each other's metric.
            warnings.warn(
                f"categories {seen[name]} and {cid} are both named {name!r}; reporting the second as "
                f"'{name}#{cid}'",
                stacklevel=3,
            )
            name = f"{name}#{cid}"
        seen[name] = cid
        keys[cid] = f"{iou_type}/AP-{name}"
    return keys


def _per_category_ap(coco_eval: Any, cat_ids: Sequence[int]) -> dict[int, float]:
    """AP in percent for each of ``cat_ids``; NaN where COCOeval has no ground truth (or no entry)."""
    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M max-dets]; area "all" is
    # index 0 and maxDets=100 is the last index (detectron2's _derive_coco_results does the same).
    precision = coco_eval.eval["precision"]
    index = {int(cid): k for k, cid in enumerate(coco_eval.params.catIds)}
    out: dict[int, float] = {}
    for cid in cat_ids:
        # faster-coco-eval's keypoint evaluation only lists categories that have annotations.
        p = precision[:, :, index[cid], 0, -1] if cid in index else np.empty(0)
        p = p[p > -1]
        out[cid] = float(np.mean(p)) * 100.0 if p.size else float("nan")
    return out


def _categories_with_gt(coco_gt: Any, iou_type: str, image_ids: set[int] | None) -> set[int]:
    cats = set()
    for ann in coco_gt.dataset.get("annotations", []):
        if ann.get("iscrowd", 0) or (image_ids is not None and ann["image_id"] not in image_ids):
            continue
        if iou_type == "keypoints" and not ann.get("num_keypoints", 0):
            continue
        cats.add(ann["category_id"])
    return cats


def _format_value(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"


def _format_summary_table(metrics: Mapping[str, float], iou_type: str) -> str:
    names = _STAT_NAMES[iou_type]
    header = "| " + " | ".join(f"{n:>7}" for n in names) + " |"
    rule = "|" + "|".join(":" + "-" * 7 + ":" for _ in names) + "|"
    row = "| " + " | ".join(f"{_format_value(metrics[f'{iou_type}/{n}']):>7}" for n in names) + " |"
    return "\n".join((header, rule, row))


def _format_category_table(per_cat: Mapping[str, float], columns: int = 3) -> str:
    items = list(per_cat.items())
    width = max([len("category")] + [len(n) for n, _ in items])
    rows = []
    for start in range(0, len(items), columns):
        chunk = items[start : start + columns]
        chunk += [("", None)] * (columns - len(chunk))
        cells = [f"{n:<{width}} | {(_format_value(v) if v is not None else ''):>7}" for n, v in chunk]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| " + " | ".join(f"{'category':<{width}} | {'AP':>7}" for _ in range(columns)) + " |"
    rule = "|" + "|".join(":" + "-" * (width + 1) + "|" + "-" * 8 + ":" for _ in range(columns)) + "|"
    return "\n".join([header, rule, *rows])


def evaluate_coco_results(
    coco_gt: COCO | str | Path,
    results: list[dict] | str | Path,
    iou_types: Sequence[str],
    *,
    backend: Backend = "pycocotools",
    image_ids: Sequence[int] | None = None,
    class_names: Mapping[int, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Score COCO results with COCOeval and return detectron2-style metrics in percent.

    For each iou type, logs pycocotools' standard 12-line summary (10 for keypoints), a one-row table of
    the AP values and a per-category AP table.

    Args:
        coco_gt: ground truth: a ``pycocotools.coco.COCO``, or the path to a COCO annotation JSON (the
            annotation dict is accepted too). Crowd regions in it are handled by COCOeval as usual.
        results: COCO result dicts (``image_id``, ``category_id``, ``score`` and ``bbox`` [x, y, w, h] /
            ``segmentation`` compressed RLE / ``keypoints``), or the path to a results JSON file, as written
            by :func:`write_results` or any other detector.
        iou_types: any of ``"bbox"``, ``"segm"``, ``"keypoints"``.
        backend: ``"pycocotools"`` (default, the reference) or ``"faster_coco_eval"`` (optional package
            ``faster-coco-eval``; same AP, faster).
        image_ids: evaluate only these images (e.g. the ones a partial run processed); results on other
            images are ignored. Default: every ground-truth image.
        class_names: category id → name overrides for the per-category keys; default: GT category names.
        log: where the tables go (default ``print``; pass ``logger.info`` to log them).

    Returns:
        A flat dict: ``{t}/AP``, ``{t}/AP50``, ``{t}/AP75``, ``{t}/APs``, ``{t}/APm``, ``{t}/APl`` for ``t``
        in ``bbox``/``segm`` (keypoints: no ``APs``), then ``{t}/AP-{category name}`` per GT category, all
        in percent (0..100). Cells without ground truth (COCOeval's -1) are NaN. With no results for an iou
        type, its AP values are 0.0 (NaN for categories without ground truth) and a warning says so.

    Raises:
        ValueError: results refer to image or category ids not in the ground truth, lack the field an
            iou type needs (e.g. ``segmentation`` for ``"segm"``), or the arguments are invalid.
        FileNotFoundError: a given path does not exist.

    Example::

        >>> metrics = evaluate_coco_results("instances_val2017.json", "preds.json", ("bbox",))
        >>> metrics["bbox/AP"]  # doctest: +SKIP
        37.9
    """
    iou_types = _check_iou_types(iou_types)
    gt = load_coco_gt(coco_gt, backend)
    results = _load_results(results)
    _check_result_ids(gt, results)
    names = _category_names(gt, class_names)

    selected: set[int] | None = None
    if image_ids is not None:
        ids = [_to_index(i, "image_ids entry") for i in image_ids]
        if not ids:
            raise ValueError("image_ids is empty; pass None to evaluate every ground-truth image")
        unknown = set(ids) - set(gt.getImgIds())
        if unknown:
            raise ValueError(
                f"{len(unknown)} of {len(set(ids))} image_ids are not in the ground truth: "
                f"first {_first(unknown)}"
            )
        selected = set(ids)
        results = [r for r in results if r["image_id"] in selected]

    if not results:
        warnings.warn(
            "No predictions were made: there are no COCO results"
            + (" for the selected images" if selected is not None else "")
            + f"; all AP values of {list(iou_types)} are reported as 0.0",
            UserWarning,
            stacklevel=2,
        )

    cat_ids = sorted(int(c) for c in gt.getCatIds())
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if results:
            _check_result_fields(results, iou_type)
        if iou_type == "keypoints":
            _check_gt_keypoints(gt)
        tic = time.perf_counter()
        eval_ids = sorted(selected) if selected is not None else None
        outcome = run_cocoeval(gt, results, iou_type, backend=backend, image_ids=eval_ids)
        seconds = time.perf_counter() - tic

        if outcome is None:
            log(f"No predictions for {iou_type}: reporting AP 0.0")
            values = {f"{iou_type}/{n}": 0.0 for n in _STAT_NAMES[iou_type]}
            with_gt = _categories_with_gt(gt, iou_type, selected)
            per_cat_ap = {cid: 0.0 if cid in with_gt else float("nan") for cid in cat_ids}
        else:
            coco_eval, summary = outcome
            num_images = len(coco_eval.params.imgIds)
            log(f"Evaluating {iou_type} with {backend}: {len(results)} results on {num_images} images")
            for line in summary:
                log(line)
            stats = coco_eval.stats
            values = {f"{iou_type}/{n}": _percent(stats[i]) for i, n in enumerate(_STAT_NAMES[iou_type])}
            per_cat_ap = _per_category_ap(coco_eval, cat_ids)
            log(f"{iou_type} evaluation took {seconds:.2f} s (loadRes + evaluate + accumulate + summarize)")

        keys = _per_category_keys(list(per_cat_ap), names, iou_type)
        per_cat = {keys[cid]: ap for cid, ap in per_cat_ap.items()}
        metrics.update(values)
        metrics.update(per_cat)
        log(f"Evaluation results for {iou_type} (percent):\n{_format_summary_table(values, iou_type)}")
        prefix = f"{iou_type}/AP-"
        table = _format_category_table({k[len(prefix) :]: v for k, v in per_cat.items()})
        log(f"Per-category {iou_type} AP:\n{table}")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Accumulating outputs during an evaluation loop
# ----------------------------------------------------------------------------------------------------------


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CocoEvaluator:
    """Collects torchvision detector outputs and scores them with COCOeval.

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``, or the path to the annotation JSON; loaded on the
            first :meth:`evaluate`).
        label_to_cat_id: contiguous label (1..K) → COCO category id, as a mapping or a callable.
        iou_types: any of ``"bbox"``, ``"segm"`` (needs ``masks`` in the outputs), ``"keypoints"``.
        backend: ``"pycocotools"`` (default) or ``"faster_coco_eval"`` (optional package).
        class_names: COCO category id → name overrides for the per-category metric keys.
        mask_threshold: mask probability threshold for the RLE masks.
        log: where the evaluation tables go (default ``print``).

    Usage: call :meth:`update` with each batch's outputs, :meth:`synchronize` on every rank once the loop
    is done, then :meth:`evaluate` (the metrics are computed on rank 0; other ranks get ``{}``).
    Only the images passed to :meth:`update` are evaluated, so a partial pass over a dataset is scored on
    the images it saw.
    """

    def __init__(
        self,
        coco_gt: COCO | str | Path,
        label_to_cat_id: Callable[[int], int] | Mapping[int, int],
        iou_types: Sequence[str] = ("bbox",),
        *,
        backend: Backend = "pycocotools",
        class_names: Mapping[int, str] | None = None,
        mask_threshold: float = 0.5,
        log: Callable[[str], None] = print,
    ) -> None:
        self.iou_types = _check_iou_types(iou_types)
        _backend_api(backend)  # fail now, not after a whole evaluation pass, if the backend is missing
        self.backend = backend
        self.label_to_cat_id = label_to_cat_id
        self.class_names = class_names
        self.mask_threshold = mask_threshold
        self.log = log
        self._coco_gt_source = coco_gt
        self._coco_gt: Any = None
        self._results_by_image: dict[int, list[dict]] = {}
        self._synchronized = True

    def update(self, predictions: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add one batch of outputs.

        Args:
            predictions: image id → torchvision output for that image (see
                :func:`predictions_to_coco_results`). An image id seen before is skipped: distributed
                samplers pad shards by repeating images.

        Raises:
            ValueError: an output lacks ``masks`` (for ``"segm"``) or ``keypoints`` (for ``"keypoints"``).
        """
        needed = {"segm": "masks", "keypoints": "keypoints"}
        for raw_id, prediction in predictions.items():
            image_id = _to_index(raw_id, "image id")
            if image_id in self._results_by_image:
                continue
            for iou_type, key in needed.items():
                if (
                    iou_type in self.iou_types
                    and key not in prediction
                    and len(prediction.get("boxes", ())) > 0
                ):
                    raise ValueError(
                        f"iou_types contains {iou_type!r} but the output for image_id {image_id} has no "
                        f"{key!r} (keys: {sorted(prediction)}); use a model that predicts them or drop "
                        f"{iou_type!r} from iou_types"
                    )
            self._results_by_image[image_id] = predictions_to_coco_results(
                image_id, prediction, self.label_to_cat_id, mask_threshold=self.mask_threshold
            )
        self._synchronized = False

    def synchronize(self) -> None:
        """Gather every rank's results (``all_gather_object``); a no-op outside ``torch.distributed``.

        Must be called on every rank. Images seen by several ranks are kept once.
        """
        _, world_size = _dist_info()
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, self._results_by_image)
            merged: dict[int, list[dict]] = {}
            for per_rank in gathered:
                for image_id, results in per_rank.items():
                    merged.setdefault(image_id, results)
            self._results_by_image = merged
        self._synchronized = True

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images seen so far (after :meth:`synchronize`: on all ranks)."""
        return sorted(self._results_by_image)

    @property
    def results(self) -> list[dict]:
        """The COCO result dicts, ordered by image id (for :func:`write_results`)."""
        return [r for image_id in self.image_ids for r in self._results_by_image[image_id]]

    def evaluate(self) -> dict[str, float]:
        """Run COCOeval on the collected results (see :func:`evaluate_coco_results` for the keys).

        Returns:
            The flat metric dict on rank 0 and ``{}`` on the other ranks.

        Raises:
            RuntimeError: running distributed and :meth:`synchronize` was not called after the last update.
        """
        rank, world_size = _dist_info()
        if world_size > 1 and not self._synchronized:
            raise RuntimeError(
                "CocoEvaluator.evaluate() in a distributed run needs the results of every rank: call "
                "synchronize() on all ranks after the last update()"
            )
        if rank != 0:
            return {}
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self._coco_gt_source, self.backend)
        return evaluate_coco_results(
            self._coco_gt,
            self.results,
            self.iou_types,
            backend=self.backend,
            image_ids=self.image_ids or None,
            class_names=self.class_names,
            log=self.log,
        )


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, Tensor)):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    # A crash (or a reader) mid-write must never see a truncated file: write a sibling temp file, then
    # os.replace it over the target, which is atomic on POSIX and Windows.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, default=_json_default, allow_nan=False, **dump_kwargs)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, float]) -> None:
    """Write metrics as JSON: sorted keys, NaN/inf as ``null``, atomically (temp file + ``os.replace``).

    Args:
        path: target file; its parent directory is created if needed.
        metrics: flat name → value dict, e.g. from :func:`evaluate_coco_results`.
    """
    clean: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {type(key).__name__} {key!r}")
        value = float(value)
        clean[key] = value if math.isfinite(value) else None
    _atomic_write_json(path, clean, sort_keys=True, indent=2)


def write_results(path: str | os.PathLike, results: list[dict]) -> None:
    """Write COCO result dicts as a JSON list, atomically (temp file + ``os.replace``).

    The file is what :func:`evaluate_coco_results` (and ``tools/eval_det.py --results``) reads back.
    """
    _atomic_write_json(path, list(results))
