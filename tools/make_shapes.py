"""Generate the synthetic shapes dataset (train and val splits in COCO format).

Usage::

    python tools/make_shapes.py --out data/shapes --num-train 500 --num-val 100 --size 224 --seed 0

writes ``<out>/train/{images,annotations/instances.json}`` and ``<out>/val/...`` and prints their paths.
The flags' defaults are those of ``data.shapes`` (``detection.config.ShapesConfig``). The same parameters
always give the same files (the trainer's cache, ``ensure_shapes_dataset``, uses the same generator).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from detection.config import ShapesConfig
from detection.data.shapes import IMAGE_FORMATS, make_shapes_splits


def _parse_size(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be S or HxW (e.g. 224 or 192x256), got {text!r}"
        ) from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"size must be S or HxW (e.g. 224 or 192x256), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    defaults = ShapesConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets train/ and val/)")
    parser.add_argument(
        "--num-train", type=int, default=defaults.num_train, help="training images (default %(default)s)"
    )
    parser.add_argument(
        "--num-val", type=int, default=defaults.num_val, help="validation images (default %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=_parse_size,
        default=defaults.image_size,
        help="image size: S or HxW (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    parser.add_argument(
        "--min-objects",
        type=int,
        default=defaults.min_objects,
        help="fewest objects per image (default %(default)s)",
    )
    parser.add_argument(
        "--max-objects",
        type=int,
        default=defaults.max_objects,
        help="most objects per image (default %(default)s)",
    )
    low, high = defaults.size_range
    parser.add_argument(
        "--size-range",
        type=float,
        nargs=2,
        default=(low, high),
        metavar=("LOW", "HIGH"),
        help=f"object size as a fraction of the short side (default {low} {high})",
    )
    parser.add_argument(
        "--format", choices=IMAGE_FORMATS, default=IMAGE_FORMATS[0], help="image format (default %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing train/ and val/ folders in --out"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help and usage errors: return the status instead of exiting the caller
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    existing = [args.out / split for split in ("train", "val") if (args.out / split).exists()]
    if existing and not args.force:
        print(
            f"error: {', '.join(str(p) for p in existing)} already exist(s); pass --force to replace, "
            "or choose another --out",
            file=sys.stderr,
        )
        return 1
    for path in existing:
        shutil.rmtree(path)
    start = time.perf_counter()
    try:
        paths = make_shapes_splits(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.size,
            seed=args.seed,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            size_range=tuple(args.size_range),
            image_format=args.format,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num_train} train + {args.num_val} val images to {args.out} in {elapsed:.1f} s")
    for key, path in paths.items():
        print(f"  {key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
