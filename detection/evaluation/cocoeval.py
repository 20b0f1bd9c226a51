"""COCOeval on COCO results: backends, ground truth, per-category AP and the flat metric dict."""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..archs import EVAL_BACKENDS, IOU_TYPES
from ..data.annotations import load_annotation_file, make_coco
from .checks import (
    check_gt_keypoints,
    check_iou_types,
    check_result_entries,
    check_result_fields,
    check_result_ids,
    first_ids,
    load_results,
    naming_results_file,
    to_index,
)
from .tables import STAT_NAMES, format_category_table, format_summary_table

if TYPE_CHECKING:  # pragma: no cover - typing only; pycocotools is imported lazily at run time
    from pycocotools.coco import COCO

__all__ = [
    "BACKENDS",
    "Backend",
    "IouType",
    "backend_api",
    "evaluate_coco_results",
    "load_coco_gt",
    "run_cocoeval",
]

IouType = Literal[IOU_TYPES]  # type: ignore[valid-type]


BACKENDS = EVAL_BACKENDS
Backend = Literal[BACKENDS]  # type: ignore[valid-type]


def backend_api(backend: str) -> tuple[type, type]:
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
        DatasetError: the file is not JSON (naming line and column) or lacks the COCO top-level lists.
        TypeError: ``source`` is none of the accepted kinds.
    """
    coco_cls, _ = backend_api(backend)
    if isinstance(source, coco_cls):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        return make_coco(load_annotation_file(path), coco_cls)
    dataset = getattr(source, "dataset", source)
    if not isinstance(dataset, Mapping):
        raise TypeError(
            "coco_gt must be a pycocotools COCO object, a path to a COCO annotation JSON or the annotation "
            f"dict, got {type(source).__name__}"
        )
    return make_coco(dict(dataset), coco_cls)


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
    _, cocoeval_cls = backend_api(backend)
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
                f"class_names has category ids {first_ids(unknown)} that are not in the ground-truth "
                f"categories {first_ids(names)}; class_names is keyed by COCO category id"
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
        type, its AP values are NaN (as detectron2 reports them) and one warning says so.

    Raises:
        ResultsError: (a ``ValueError``) the results file is not JSON, or the results refer to image or
            category ids not in the ground truth, have a missing, mistyped or non-finite field, or lack
            the field an iou type needs (e.g. ``segmentation`` for ``"segm"``); it names the file and the
            first bad entry.
        ValueError: the arguments are invalid.
        FileNotFoundError: a given path does not exist.
    """
    iou_types = check_iou_types(iou_types)
    gt = load_coco_gt(coco_gt, backend)
    source = os.fspath(results) if isinstance(results, (str, os.PathLike)) else None
    results = load_results(results)
    with naming_results_file(source):
        check_result_entries(results)
        check_result_ids(gt, results)
    names = _category_names(gt, class_names)
    selected = _selected_images(gt, image_ids)
    if selected is not None:
        results = [r for r in results if r["image_id"] in selected]
    if not results:
        where = " for the selected images" if selected is not None else ""
        message = f"No predictions were made: there are no COCO results{where}"
        # detectron2's COCOEvaluator reports NaN when nothing was predicted: 0.0 would read as a score.
        warnings.warn(
            f"{message}; all AP values of {list(iou_types)} are reported as nan", UserWarning, stacklevel=2
        )
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        with naming_results_file(source):
            values, per_cat_ap = _evaluate_iou_type(gt, results, iou_type, backend, selected, log)
        keys = _per_category_keys(list(per_cat_ap), names, iou_type)
        per_cat = {keys[cid]: ap for cid, ap in per_cat_ap.items()}
        metrics.update(values)
        metrics.update(per_cat)
        log(f"Evaluation results for {iou_type} (percent):\n{format_summary_table(values, iou_type)}")
        prefix = f"{iou_type}/AP-"
        table = format_category_table({k[len(prefix) :]: v for k, v in per_cat.items()})
        log(f"Per-category {iou_type} AP:\n{table}")
    return metrics


def _selected_images(gt: Any, image_ids: Sequence[int] | None) -> set[int] | None:
    if image_ids is None:
        return None
    ids = [to_index(i, "image_ids entry") for i in image_ids]
    if not ids:
        raise ValueError("image_ids is empty; pass None to evaluate every ground-truth image")
    unknown = set(ids) - set(gt.getImgIds())
    if unknown:
        raise ValueError(
            f"{len(unknown)} of {len(set(ids))} image_ids are not in the ground truth: first {first_ids(unknown)}"
        )
    return set(ids)


def _evaluate_iou_type(
    gt: Any,
    results: list[dict],
    iou_type: str,
    backend: Backend,
    selected: set[int] | None,
    log: Callable[[str], None],
) -> tuple[dict[str, float], dict[int, float]]:
    """``({t}/AP... values, category id -> AP)`` of one iou type, logging COCOeval's summary."""
    if results:
        check_result_fields(results, iou_type)
    if iou_type == "keypoints":
        check_gt_keypoints(gt)
    cat_ids = sorted(int(c) for c in gt.getCatIds())
    tic = time.perf_counter()
    eval_ids = sorted(selected) if selected is not None else None
    outcome = run_cocoeval(gt, results, iou_type, backend=backend, image_ids=eval_ids)
    seconds = time.perf_counter() - tic
    if outcome is None:  # no results: evaluate_coco_results has warned once
        values = {f"{iou_type}/{n}": float("nan") for n in STAT_NAMES[iou_type]}
        return values, {cid: float("nan") for cid in cat_ids}
    coco_eval, summary = outcome
    log(
        f"Evaluating {iou_type} with {backend}: {len(results)} results on {len(coco_eval.params.imgIds)} images"
    )
    for line in summary:
        log(line)
    values = {f"{iou_type}/{n}": _percent(coco_eval.stats[i]) for i, n in enumerate(STAT_NAMES[iou_type])}
    log(f"{iou_type} evaluation took {seconds:.2f} s (loadRes + evaluate + accumulate + summarize)")
    return values, _per_category_ap(coco_eval, cat_ids)
