"""Train a detector from a YAML config.

Examples::

    python tools/train_det.py --config configs/quickstart.yaml
    python tools/train_det.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml --set train.batch_size=4
    python tools/train_det.py --config configs/quickstart.yaml --resume            # continue the last run
    python tools/train_det.py --config configs/quickstart.yaml --eval-only --weights output/quickstart/model_final.pth
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml

Exit status: 0 on success, 2 on bad input (config, paths, weights), 1 when training diverged
(non-finite losses, gradients or weights; the message names the first bad iteration, its loss
terms and image ids), 130 on Ctrl-C (a checkpoint is saved first; continue with --resume).
"""

from __future__ import annotations

import argparse

from detection.cli import add_config_arguments, config_from_args, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_det.py", description="Train a detector from a YAML config.")
    add_config_arguments(parser)
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="PATH",
        help="continue exactly from a checkpoint: the output folder's newest one, or PATH",
    )
    parser.add_argument("--weights", metavar="PATH", help="initial weights (a detector state dict: ours or torchvision's)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --weights (or the newest checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from detection.trainer import evaluate_only, train

        cfg = config_from_args(args)
        if args.eval_only:
            weights = args.weights
            if weights is None:
                from pathlib import Path

                from detection.checkpoint import Checkpointer

                found = Checkpointer(Path(args.output_dir or cfg.output_dir)).last()
                if found is None:
                    raise FileNotFoundError("--eval-only needs --weights PATH (no checkpoint found in the output folder)")
                weights = str(found)
            evaluate_only(cfg, weights, output_dir=args.output_dir)
            return 0
        train(cfg, output_dir=args.output_dir, resume=args.resume, weights=args.weights)
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
