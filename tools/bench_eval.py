"""Benchmark COCO evaluation speed: pycocotools vs faster-coco-eval on a synthetic COCO-sized set.

Builds, in memory, a synthetic COCO instances set (default 5,000 images of 640×480 with about 7 objects
each, polygon masks plus a few crowd RLE regions, 80 categories with COCO's non-contiguous ids: the size of
val2017) and detector-like results (perturbed ground-truth boxes and masks, duplicates, false positives,
random scores). It then times, per backend and iou type, exactly what ``detection.coco_eval.run_cocoeval``
does: ``loadRes`` + ``evaluate`` + ``accumulate`` + ``summarize``. Building the data, loading the ground
truth and converting tensors to COCO results are *not* timed.

    python tools/bench_eval.py                                  # full size, all installed backends
    python tools/bench_eval.py --num-images 50 --json bench.json

Prints a Markdown table (backend, iou type, seconds, AP), the time ratio and the largest difference over
COCOeval's 12 summary stats between backends. Exits with 1 when that difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from detection.coco_eval import BACKENDS, load_coco_gt, run_cocoeval
from detection.io import atomic_write_json

# COCO's 80 category ids are 1..90 without these.
_COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
_CROWD_ID_BASE = 900_100_000_000  # crowd annotation ids in COCO exceed 2**31 too
_STAT_LABELS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _random_polygon(rng: np.random.Generator, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """A star-shaped polygon inscribed in the w×h box centred at (cx, cy): [K, 2] float."""
    k = int(rng.integers(8, 21))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, size=k))
    radius = rng.uniform(0.6, 1.0, size=k)
    return np.stack([cx + 0.5 * w * radius * np.cos(angles), cy + 0.5 * h * radius * np.sin(angles)], axis=1)


def _clip_polygon(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([poly[:, 0].clip(0, width), poly[:, 1].clip(0, height)], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _bbox_of(poly: np.ndarray) -> list[float]:
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _random_object(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # sqrt(area) log-uniform in [6, 400] px gives roughly COCO's 41/34/24 % small/medium/large split.
    side = math.exp(rng.uniform(math.log(6.0), math.log(400.0)))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    w, h = min(side * math.sqrt(aspect), width), min(side / math.sqrt(aspect), height)
    cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
    return _clip_polygon(_random_polygon(rng, cx, cy, w, h), width, height)


def _uncompressed_rle(poly: np.ndarray, width: int, height: int) -> dict:
    """COCO-style crowd segmentation: uncompressed RLE with a list of run lengths."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([poly.ravel().tolist()], height, width)[0]
    flat = mask_utils.decode(rle).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # RLE counts start with a run of zeros
        counts = [0, *counts]
    return {"size": [height, width], "counts": counts}


def build_synthetic_coco(
    num_images: int = 5000,
    objects_per_image: float = 7.0,
    *,
    width: int = 640,
    height: int = 480,
    crowd_fraction: float = 0.01,
    seed: int = 0,
) -> dict:
    """A synthetic COCO instances dataset (a JSON-style dict) with polygon masks and crowd RLE regions.

    Args:
        num_images: number of images (ids 1..num_images).
        objects_per_image: Poisson mean of objects per image (some images get none, as in COCO).
        width, height: image size in pixels.
        crowd_fraction: share of objects marked ``iscrowd=1`` with an uncompressed RLE mask.
        seed: RNG seed; the same arguments give the same dataset.
    """
    rng = np.random.default_rng(seed)
    cat_ids = [i for i in range(1, 91) if i not in _COCO_MISSING_IDS]
    images, annotations = [], []
    ann_id = 0
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        for _ in range(int(rng.poisson(objects_per_image))):
            poly = _random_object(rng, width, height)
            ann_id += 1
            ann = {
                "image_id": image_id,
                "category_id": int(rng.choice(cat_ids)),
                "bbox": _bbox_of(poly),
                "area": _polygon_area(poly),
                "iscrowd": 0,
                "id": ann_id,
            }
            if rng.random() < crowd_fraction:
                rle = _uncompressed_rle(poly, width, height)
                ann.update(iscrowd=1, id=_CROWD_ID_BASE + ann_id, segmentation=rle)
            else:
                ann["segmentation"] = [poly.ravel().tolist()]
            annotations.append(ann)
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def build_synthetic_results(dataset: dict, dets_per_image: int = 20, *, seed: int = 0) -> list[dict]:
    """Detector-like COCO results for :func:`build_synthetic_coco`'s dataset.

    Each non-crowd object is found with probability 0.85 (box and polygon shifted, rescaled and jittered;
    10 % with a wrong category), some found objects get a lower-scored duplicate, and false positives fill
    each image up to ``dets_per_image``. Masks are compressed RLE with ``counts`` as str, as
    ``predictions_to_coco_results`` writes them.
    """
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed + 1)
    cat_ids = [c["id"] for c in dataset["categories"]]
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in dataset["images"]}
    for ann in dataset["annotations"]:
        if not ann["iscrowd"]:
            by_image[ann["image_id"]].append(ann)
    sizes = {img["id"]: (img["width"], img["height"]) for img in dataset["images"]}

    results: list[dict] = []
    for image_id, anns in by_image.items():
        width, height = sizes[image_id]
        dets: list[tuple[np.ndarray, int, float]] = []
        for ann in anns:
            if rng.random() >= 0.85:
                continue
            poly = np.asarray(ann["segmentation"][0], dtype=np.float64).reshape(-1, 2)
            x, y, w, h = ann["bbox"]
            scale = np.exp(rng.normal(0.0, 0.08, size=2))
            shift = rng.normal(0.0, 0.06, size=2) * [w, h]
            centre = np.array([x + w / 2, y + h / 2])
            noise = rng.normal(0.0, 0.02 * max(w, h), size=poly.shape)
            moved = (poly - centre) * scale + centre + shift + noise
            category = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
            dets.append((_clip_polygon(moved, width, height), category, float(rng.beta(5, 2))))
            if rng.random() < 0.15:  # a duplicate, as NMS leaves them across classes and overlaps
                dup = moved + rng.normal(0.0, 0.1 * max(w, h), size=2)
                dets.append((_clip_polygon(dup, width, height), category, float(rng.beta(2, 4))))
        while len(dets) < dets_per_image:
            dets.append(
                (_random_object(rng, width, height), int(rng.choice(cat_ids)), float(rng.beta(1.5, 5)))
            )
        dets.sort(key=lambda d: -d[2])
        for poly, category, score in dets[:dets_per_image]:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly.ravel().tolist()], height, width))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": _bbox_of(poly),
                    "score": score,
                    "segmentation": rle,
                }
            )
    return results


def _available_backends() -> list[str]:
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--num-images", type=int, default=5000, help="synthetic images (default: 5000)")
    parser.add_argument("--objects-per-image", type=float, default=7.0, help="mean GT objects per image")
    parser.add_argument("--dets-per-image", type=int, default=20, help="detections per image (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help="backends to time (default: every installed one of " + ", ".join(BACKENDS) + ")",
    )
    parser.add_argument("--iou-types", nargs="+", choices=("bbox", "segm"), default=["bbox", "segm"])
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |difference| between backends over the 12 COCOeval stats (0..1 scale)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")


def run(args: argparse.Namespace) -> dict:
    """Build the synthetic set, time every backend and iou type, print the table; return the results.

    Returns:
        ``{"config", "data", "rows": [{backend, iou_type, seconds, AP, stats}], "time_ratio",
        "max_abs_diff", "agreement_ok", ...}``; ``stats`` are COCOeval's 12 values (0..1), ``AP`` in percent.
    """
    backends = _check_args(args)
    tic = time.perf_counter()
    dataset = build_synthetic_coco(args.num_images, args.objects_per_image, seed=args.seed)
    results = build_synthetic_results(dataset, args.dets_per_image, seed=args.seed)
    build_seconds = time.perf_counter() - tic
    num_gt = len(dataset["annotations"])
    num_crowd = sum(a["iscrowd"] for a in dataset["annotations"])
    num_results = len(results)
    print(
        f"synthetic set: {args.num_images} images, {num_gt} GT objects ({num_crowd} crowd), "
        f"{num_results} results; built in {build_seconds:.1f} s (not timed below)"
    )
    # COCOeval writes into annotations (pycocotools turns GT polygons into RLE in place), so every run
    # gets fresh copies, decoded from JSON text; the copies and the GT index are made before the clock starts.
    dataset_json, results_json = json.dumps(dataset), json.dumps(results)
    del dataset, results
    rows = _time_backends(dataset_json, results_json, backends, args.iou_types)
    print("\n| backend | iou type | seconds | AP |\n|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['backend']} | {row['iou_type']} | {row['seconds']:.2f} | {row['AP']:.3f} |")
    time_ratio, max_abs_diff, agreement_ok = _compare(rows, backends, args.iou_types, args.tolerance)
    payload = {
        "config": {
            "num_images": args.num_images,
            "objects_per_image": args.objects_per_image,
            "dets_per_image": args.dets_per_image,
            "seed": args.seed,
            "backends": backends,
            "iou_types": list(args.iou_types),
            "tolerance": args.tolerance,
        },
        "timed": "loadRes + evaluate + accumulate + summarize (results conversion and GT loading excluded)",
        "data": {"images": args.num_images, "gt_objects": num_gt, "crowd": num_crowd, "results": num_results},
        "build_seconds": build_seconds,
        "rows": rows,
        "time_ratio": time_ratio,
        "max_abs_diff": max_abs_diff,
        "agreement_ok": agreement_ok,
        "versions": _versions(backends),
    }
    if args.json is not None:
        atomic_write_json(args.json, payload, indent=2)
        print(f"wrote {args.json}")
    return payload


def _check_args(args: argparse.Namespace) -> list[str]:
    """The backends to time; ``ValueError`` / ``ImportError`` for bad sizes or a missing backend."""
    if args.num_images < 1 or args.dets_per_image < 1 or args.objects_per_image < 0:
        raise ValueError(
            "--num-images and --dets-per-image must be >= 1 and --objects-per-image >= 0, got "
            f"{args.num_images}, {args.dets_per_image}, {args.objects_per_image}"
        )
    available = _available_backends()
    backends = list(dict.fromkeys(args.backends)) if args.backends else available
    missing = [b for b in backends if b not in available]
    if missing:
        raise ImportError(
            f"backend(s) {missing} are not installed (installed: {available}); for "
            "faster_coco_eval run `pip install faster-coco-eval`"
        )
    return backends


def _time_backends(
    dataset_json: str, results_json: str, backends: list[str], iou_types: list[str]
) -> list[dict[str, Any]]:
    """One row per (backend, iou type): seconds of ``run_cocoeval``, AP and COCOeval's 12 stats."""
    rows: list[dict[str, Any]] = []
    for backend in backends:
        for iou_type in iou_types:
            gt = load_coco_gt(json.loads(dataset_json), backend)
            dts = json.loads(results_json)
            tic = time.perf_counter()
            outcome = run_cocoeval(gt, dts, iou_type, backend=backend)
            seconds = time.perf_counter() - tic
            assert outcome is not None  # results are never empty here
            coco_eval, _ = outcome
            stats = [float(s) for s in coco_eval.stats[:12]]
            ap = 100.0 * stats[0]
            rows.append(
                {"backend": backend, "iou_type": iou_type, "seconds": seconds, "AP": ap, "stats": stats}
            )
            print(f"  {backend:<17} {iou_type:<5} {seconds:8.2f} s  AP {ap:.3f}", flush=True)
    return rows


def _compare(
    rows: list[dict[str, Any]], backends: list[str], iou_types: list[str], tolerance: float
) -> tuple[dict[str, float], dict[str, float], bool]:
    """Time ratio and largest stat difference of each backend against the first; whether all agree."""
    time_ratio: dict[str, float] = {}
    max_abs_diff: dict[str, float] = {}
    agreement_ok = True
    if len(backends) > 1:
        print()
    ref = backends[0] if backends else None
    for other in backends[1:]:
        for iou_type in iou_types:
            a = next(r for r in rows if r["backend"] == ref and r["iou_type"] == iou_type)
            b = next(r for r in rows if r["backend"] == other and r["iou_type"] == iou_type)
            key = f"{iou_type}:{ref}/{other}"
            time_ratio[key] = a["seconds"] / b["seconds"]
            diffs = [abs(x - y) for x, y in zip(a["stats"], b["stats"], strict=True)]
            max_abs_diff[key] = max(diffs)
            ok = max_abs_diff[key] <= tolerance
            agreement_ok &= ok
            print(
                f"{iou_type}: {ref} takes {time_ratio[key]:.2f}x the time of {other}; "
                f"max |diff| over the 12 stats = {max_abs_diff[key]:.2e} (at {_STAT_LABELS[int(np.argmax(diffs))]}, "
                f"tolerance {tolerance:g}) -> {'agree' if ok else 'DISAGREE'}"
            )
    return time_ratio, max_abs_diff, agreement_ok


def _versions(backends: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("pycocotools", "faster-coco-eval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 1 when the backends disagree beyond ``--tolerance``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        payload = run(args)
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if payload["agreement_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
