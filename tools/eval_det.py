"""Evaluate a detector with COCO mAP (pycocotools), or score any COCO results file.

Examples::

    # a checkpoint of ours, or a torchvision detector state dict, on the config's validation set
    python tools/eval_det.py --config configs/quickstart.yaml --weights output/quickstart/model_final.pth
    # the same through the fast inference path (BN folded, channels-last; --precision bf16 on CPUs with bf16)
    python tools/eval_det.py --config configs/quickstart.yaml --weights output/quickstart/model_final.pth --optimize
    # any detector's COCO results file against an annotation file, no model needed
    python tools/eval_det.py --results preds.json --ann instances_val2017.json --iou-types bbox segm

Writes ``metrics.json`` (flat keys ``bbox/AP``, ``bbox/AP50``, ... in percent, plus per-category AP) and
``results.json`` into ``--output-dir``. With ``--results`` and no ``--output-dir``, ``metrics.json`` goes to
``<results folder>/<results stem>_eval/`` (the path is printed). Exit status 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detection.archs import IOU_TYPES
from detection.cli import add_config_arguments, config_from_args, run_main
from detection.coco_eval import BACKENDS
from detection.io import make_output_dir
from detection.precision import PRECISIONS, short_name

_PRECISION_FLAGS = list(dict.fromkeys(short_name(dtype) for dtype in PRECISIONS.values()))  # fp32, fp16, bf16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_det.py", description="COCO evaluation of a detector or of a results file.")
    add_config_arguments(parser, required=False)
    parser.add_argument("--weights", metavar="PATH", help="checkpoint to evaluate (ours or torchvision's format)")
    parser.add_argument("--results", metavar="JSON", help="COCO results file to score (with --ann; no model)")
    parser.add_argument("--ann", metavar="JSON", help="COCO annotation file for --results")
    parser.add_argument("--iou-types", nargs="+", default=None, choices=IOU_TYPES,
                        help="evaluation types for --results (default: bbox, plus segm if the results have masks)")
    parser.add_argument("--only-result-images", action="store_true",
                        help="with --results: score only the images the results file names (default: every "
                        "ground-truth image, images without results counting as missed)")
    parser.add_argument("--optimize", action="store_true",
                        help="evaluate through the fast inference path (detection.optimize_for_inference)")
    parser.add_argument("--precision", choices=_PRECISION_FLAGS, default="fp32",
                        help="backbone/FPN precision with --optimize (heads, boxes and masks stay float32)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="COCOeval implementation (default: eval.backend from the config, else pycocotools)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results is not None or args.ann is not None:
        if args.results is None or args.ann is None:
            parser.error("--results and --ann go together")
        if args.config is not None or args.weights is not None:
            parser.error("--results/--ann score a results file; do not combine them with --config/--weights")
    elif args.config is None or args.weights is None:
        parser.error("give --config and --weights (evaluate a model), or --results and --ann (score a results file)")

    def body() -> int:
        if args.results is not None:
            return _score_results(args)
        from detection.trainer import evaluate_only

        cfg = config_from_args(args)
        if args.backend is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, backend=args.backend))
        evaluate_only(cfg, args.weights, output_dir=args.output_dir, optimize=args.precision if args.optimize else None)
        return 0

    return run_main(body)


def _score_results(args: argparse.Namespace) -> int:
    from detection.coco_eval import evaluate_coco_results, load_coco_gt, write_metrics
    from detection.evaluation.checks import (
        check_result_entries,
        check_result_ids,
        load_results,
        naming_results_file,
    )

    for flag, path in (("--results", args.results), ("--ann", args.ann)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: file not found: {path}")
    backend = args.backend or "pycocotools"
    results = load_results(args.results)
    gt = load_coco_gt(args.ann, backend)
    iou_types = args.iou_types
    if iou_types is None:
        iou_types = ["bbox"] + (["segm"] if any(isinstance(r, dict) and "segmentation" in r for r in results[:100]) else [])
    with naming_results_file(args.results):
        check_result_entries(results)
        check_result_ids(gt, results)
        image_ids = _scored_images(args, gt, results)
        metrics = evaluate_coco_results(gt, results, iou_types, backend=backend, image_ids=image_ids)
    out = Path(args.output_dir) if args.output_dir else _default_output_dir(Path(args.results))
    make_output_dir(out)
    write_metrics(out / "metrics.json", metrics)
    where = "" if args.output_dir else " (no --output-dir: a folder next to the results file)"
    print(f"wrote {out / 'metrics.json'}{where}")
    return 0


def _scored_images(args: argparse.Namespace, gt, results: list) -> list[int] | None:
    """The images to score: all of the ground truth, or with --only-result-images those the results name.

    Warns (one line) when the results cover only some ground-truth images and every image is scored.
    """
    import sys

    covered = {r["image_id"] for r in results}
    total = len(gt.getImgIds())
    if args.only_result_images:
        return sorted(covered) if covered else None
    if len(covered & set(gt.getImgIds())) < total:
        print(
            f"warning: {args.results} has results for {len(covered)} of the {total} images in {args.ann}; the "
            "others are scored as images without detections (pass --only-result-images to score just those "
            f"{len(covered)})",
            file=sys.stderr,
        )
    return None


def _default_output_dir(results: Path) -> Path:
    """``<folder of the results file>/<its stem>_eval``: next to it, never over a run's own metrics.json."""
    return results.parent / f"{results.stem}_eval"

if __name__ == "__main__":
    raise SystemExit(main())
