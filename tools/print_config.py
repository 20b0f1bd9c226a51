"""Print the fully resolved experiment config (after ``base:`` files and ``--set`` overrides).

Examples::

    python tools/print_config.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml
    python tools/print_config.py --config X.yaml --set train.batch_size=4 model.backbone.name=resnet18 \
        --show-origin
    python tools/print_config.py --reference      # every key with its type, default, range and description

Exit status (the table of ``detection.cli``): 0 on success, 2 on an invalid config (one ``error: ...``
line on stderr; ``--debug`` or ``DETECTION_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import sys

from detection.cli import add_debug_argument, run_main
from detection.config import config_reference, format_config, load_config_with_origins


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="print_config.py",
        description="Print the resolved experiment config: defaults, then the YAML file and its bases, "
        "then --set.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file (omit for the defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override a dotted key; the value is read as YAML "
        "(e.g. train.optimizer.lr=0.01 model.min_size=[640,800])",
    )
    parser.add_argument(
        "--show-origin",
        action="store_true",
        help="annotate every value with the file it came from (or --set, or default)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="print every config key with its type, default, range and description, then exit",
    )
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 invalid config or arguments)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: report the status instead of exiting the caller
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    def body() -> int:
        if args.reference:
            sys.stdout.write(config_reference())
            return 0
        cfg, origins = load_config_with_origins(args.config, args.overrides)
        sys.stdout.write(format_config(cfg, origins if args.show_origin else None))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
