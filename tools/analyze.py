"""Parameters and FLOPs per module group of the detector a config builds (``detection.analysis``).

Examples::

    python tools/analyze.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml --size 800
    python tools/analyze.py --config configs/quickstart.yaml                # at the config's test size
    python tools/analyze.py --config configs/retinanet_r50_fpn_1x_coco.yaml --size 800 1333 --json flops.json
    # torchvision's published convention (weights meta "_ops"): multiply-adds, no boxes into the mask head
    python tools/analyze.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml --size 800 --detections none

``--size S`` or ``--size H W`` is the size the network runs at (the model's resize is set to it);
without it, a square image of the config's test ``min_size``. No weights are loaded. The table
gives params, trainable params, GFLOPs (2 per multiply-add) and the share of each group; the last
line gives the total in GMACs, torchvision's ``_ops`` unit. Exit status (the table of
``detection.cli``): 0 on success, 2 on a bad config or size (one ``error: ...`` line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from detection.analysis import DETECTION_MODES
from detection.cli import add_debug_argument, config_from_args, run_main
from detection.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analyze.py", description="Parameters and FLOPs per module group of the detector a config builds."
    )
    parser.add_argument("--config", metavar="FILE", required=True, help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override dotted config keys, values read as YAML (e.g. model.backbone.name=resnet18)",
    )
    parser.add_argument("--size", nargs="+", metavar="PX",
                        help="network input size: S (square) or H W (default: the config's test min_size)")
    parser.add_argument("--detections", choices=DETECTION_MODES, default="max",
                        help="boxes into the mask/keypoint heads: max (box_detections_per_img per image, the "
                        "default) or none (torchvision's published figures)")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    add_debug_argument(parser)
    return parser


def parse_size(values: list[str] | None) -> tuple[int, int] | None:
    """``--size`` as (height, width); a bad value is a one-line :class:`ConfigError`."""
    if values is None:
        return None
    try:
        size = [int(v) for v in values]
    except ValueError:
        size = []
    if len(size) not in (1, 2) or len(size) != len(values) or min(size) < 32:
        raise ConfigError(f"--size: expected S or H W in whole pixels >= 32, got {' '.join(values)!r}; "
                          "e.g. --size 800 or --size 800 1333")
    return (size[0], size[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad config, size or arguments)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: report the status instead of exiting the caller
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    def body() -> int:
        from detection.analysis import analysis_model, analysis_num_classes, analyze_model, format_analysis

        size = parse_size(args.size)
        cfg = config_from_args(args)
        model, image_size = analysis_model(cfg, size)
        analysis = analyze_model(model, image_size, detections=args.detections)
        classes = f"num_classes {analysis_num_classes(cfg)}"
        if cfg.model.num_classes is None:
            classes += " (model.num_classes unset: the arch's default)"
        title = [f"{args.config}: {cfg.model.arch}, {cfg.model.backbone.name}, {classes}"]
        sys.stdout.write(format_analysis(analysis, title))
        if args.json:
            from detection.io import atomic_write_json

            record = {"config": args.config, "arch": cfg.model.arch, "detections_mode": args.detections,
                      **analysis.to_dict()}
            atomic_write_json(args.json, record, indent=2)
            print(f"wrote {args.json}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
