"""Data-loading throughput: our COCO train pipeline beside a plain torchvision pipeline, same images.

Usage::

    python tools/bench_data.py                          # coco128 next to the repository, workers 0 and 2
    python tools/bench_data.py --data-root DIR --workers 0 2 4 --json bench.json

Pipelines (both decode JPEG/PNG, convert to float32 CHW in [0, 1] and decode instance masks, so the
comparison is like for like):

- ``ours``: ``detection.data.CocoDetection(train=True)`` with ``horizontal_flip`` + ``scale_jitter``
  (albumentations), our aspect-ratio batch sampler and collate.
- ``torchvision``: ``torchvision.datasets.CocoDetection`` wrapped with ``wrap_dataset_for_transforms_v2``
  (boxes xyxy, masks decoded) + ``v2.RandomHorizontalFlip`` + ``v2.ToImage`` + ``v2.ToDtype(float32)``,
  a plain ``DataLoader``. No scale jitter: ours does more work per image.

The first ``--warmup`` batches (worker start-up, first file reads) are not timed. The main process runs
with ``--torch-threads`` (default 1) torch threads, as data-loader workers do. Prints a Markdown table
with images/s per pipeline and worker count and the ratio ours / torchvision.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from detection.data import CocoDetection, build_dataloader, build_transforms
from detection.io import atomic_write_json

_DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128-instances"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument(
        "--data-root",
        type=Path,
        default=_DEFAULT_ROOT,
        help=f"folder with annotations/instances.json and images/ (default {_DEFAULT_ROOT})",
    )
    parser.add_argument("--ann-file", type=Path, default=None, help="annotation file (overrides --data-root)")
    parser.add_argument("--img-dir", type=Path, default=None, help="image folder (overrides --data-root)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts (default 0 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument(
        "--epochs", type=int, default=2, help="passes over the images per measurement (default 2)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches at the start (default 2)")
    parser.add_argument("--jitter-size", type=int, default=640, help="scale_jitter target size (default 640)")
    parser.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=(0.5, 1.5),
        metavar=("MIN", "MAX"),
        help="scale_jitter factor range (default 0.5 1.5)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads in this process while timing (default 1, as in data-loader workers; "
        "with more, small tensor ops of the workers=0 runs contend with other processes and numbers swing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")


def _tuple_collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch))


def _time_loader(
    loader: Iterable[Any], *, epochs: int, warmup: int, set_epoch: Any = None
) -> tuple[int, float]:
    """Images loaded and seconds spent, excluding the first ``warmup`` batches."""
    seen_batches, images, start = 0, 0, None
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        for batch in loader:
            seen_batches += 1
            if seen_batches == warmup:
                start = time.perf_counter()
                continue
            if seen_batches > warmup:
                images += len(batch[0])
    if start is None or images == 0:
        raise ValueError(
            f"not enough batches to time: {seen_batches} batch(es) in {epochs} epoch(s) with --warmup {warmup}; "
            "lower --warmup or --batch-size, or raise --epochs"
        )
    return images, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; returns ``{"config": ..., "rows": [...]}``."""
    from torchvision.datasets import CocoDetection as TVCocoDetection
    from torchvision.datasets import wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    ann_file = args.ann_file or args.data_root / "annotations" / "instances.json"
    img_dir = args.img_dir or args.data_root / "images"
    if not Path(ann_file).is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file} (set --data-root or --ann-file)")
    if not Path(img_dir).is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir} (set --data-root or --img-dir)")

    augment = build_transforms(
        [
            {"name": "horizontal_flip", "p": 0.5},
            {
                "name": "scale_jitter",
                "size": args.jitter_size,
                "min_scale": args.scale_range[0],
                "max_scale": args.scale_range[1],
            },
        ],
        train=True,
    )
    ours = CocoDetection(ann_file, img_dir, train=True, transforms=augment, with_masks=True)
    tv_transforms = v2.Compose(
        [v2.RandomHorizontalFlip(0.5), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        theirs = wrap_dataset_for_transforms_v2(
            TVCocoDetection(str(img_dir), str(ann_file), transforms=tv_transforms),
            target_keys={"boxes", "labels", "masks", "image_id"},
        )

    rows = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        _measure(args, ours, theirs, rows)
    finally:
        torch.set_num_threads(previous_threads)

    config = {
        "ann_file": str(ann_file),
        "img_dir": str(img_dir),
        "images_ours": len(ours),
        "images_torchvision": len(theirs),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "warmup_batches": args.warmup,
        "ours": f"horizontal_flip p=0.5 + scale_jitter size={args.jitter_size} scale={list(args.scale_range)}, masks",
        "torchvision": "v2.RandomHorizontalFlip p=0.5 + ToImage + ToDtype(float32), masks",
        "torch_threads": args.torch_threads,
    }
    return {"config": config, "rows": rows}


def _measure(args: argparse.Namespace, ours: Any, theirs: Any, rows: list[dict[str, Any]]) -> None:
    for workers in args.workers:
        loader = build_dataloader(
            ours, batch_size=args.batch_size, train=True, num_workers=workers, seed=args.seed
        )
        n, secs = _time_loader(
            loader, epochs=args.epochs, warmup=args.warmup, set_epoch=loader.batch_sampler.set_epoch
        )
        rows.append(
            {"pipeline": "ours", "workers": workers, "images": n, "seconds": secs, "img_per_s": n / secs}
        )
        del loader  # stop persistent workers before the next measurement

        generator = torch.Generator().manual_seed(args.seed)
        tv_loader = torch.utils.data.DataLoader(
            theirs,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=_tuple_collate,
            persistent_workers=workers > 0,
            generator=generator,
        )
        n, secs = _time_loader(tv_loader, epochs=args.epochs, warmup=args.warmup)
        rows.append(
            {
                "pipeline": "torchvision",
                "workers": workers,
                "images": n,
                "seconds": secs,
                "img_per_s": n / secs,
            }
        )
        del tv_loader


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of ``run``'s result, with the ours / torchvision ratio per worker count."""
    by_key = {(r["pipeline"], r["workers"]): r for r in result["rows"]}
    lines = [
        "| workers | ours img/s | torchvision img/s | ours / torchvision |",
        "|---:|---:|---:|---:|",
    ]
    for workers in sorted({r["workers"] for r in result["rows"]}):
        ours, theirs = by_key[("ours", workers)], by_key[("torchvision", workers)]
        ratio = ours["img_per_s"] / theirs["img_per_s"]
        lines.append(f"| {workers} | {ours['img_per_s']:.1f} | {theirs['img_per_s']:.1f} | {ratio:.2f} |")
    cfg = result["config"]
    lines.append("")
    lines.append(f"ours: {cfg['ours']} ({cfg['images_ours']} images after filtering empty ones)")
    lines.append(f"torchvision: {cfg['torchvision']} ({cfg['images_torchvision']} images)")
    lines.append(
        f"batch size {cfg['batch_size']}, {cfg['epochs']} epoch(s), first {cfg['warmup_batches']} batches untimed, "
        f"{cfg['torch_threads']} torch thread(s) in the main process"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and usage errors: return the status instead of exiting the caller
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json is not None:
        atomic_write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
