"""Evaluate a detector with COCO mAP (pycocotools), or score any COCO results file.

Examples::

    # a checkpoint of ours, or a torchvision detector state dict, on the config's validation set
    python tools/eval_det.py --config configs/quickstart.yaml --weights output/quickstart/model_final.pth
    # the same through the fast inference path (BN folded, channels-last; --precision bf16 on CPUs with bf16)
    python tools/eval_det.py --config configs/quickstart.yaml --weights output/quickstart/model_final.pth --optimize
    # any detector's COCO results file against an annotation file, no model needed
    python tools/eval_det.py --results preds.json --ann instances_val2017.json --iou-types bbox segm

Writes ``metrics.json`` (flat keys ``bbox/AP``, ``bbox/AP50``, ... in percent, plus per-category AP) and
``results.json`` into ``--output-dir``. Exit status 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detection.archs import IOU_TYPES
from detection.cli import add_config_arguments, config_from_args, run_main
from detection.coco_eval import BACKENDS
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
    import json

    from detection.coco_eval import evaluate_coco_results, write_metrics

    for flag, path in (("--results", args.results), ("--ann", args.ann)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: file not found: {path}")
    iou_types = args.iou_types
    if iou_types is None:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
        iou_types = ["bbox"] + (["segm"] if any("segmentation" in r for r in results[:100]) else [])
    metrics = evaluate_coco_results(args.ann, args.results, iou_types, backend=args.backend or "pycocotools")
    out = Path(args.output_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    print(f"wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
