"""Run a detector on an image or a folder of images; write annotated PNGs and COCO-format results.

Examples::

    python tools/infer_det.py --config configs/quickstart.yaml --weights output/quickstart/model_final.pth \
        --input path/to/images --output-dir output/infer
    python tools/infer_det.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml \
        --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --input photo.jpg --score-threshold 0.7

Writes ``<output-dir>/<image stem>.png`` with masks, boxes, class names and scores drawn, plus
``results.json`` (COCO results: one entry per detection) and ``images.json`` (the ids given to the
input files, with their sizes). Exit status 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detection.cli import add_config_arguments, config_from_args, run_main

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer_det.py", description="Detect objects in images and draw them."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--weights", metavar="PATH", required=True, help="checkpoint (ours or torchvision's format)"
    )
    parser.add_argument("--input", metavar="PATH", required=True, help="an image file or a folder of images")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="draw and save detections above this score"
    )
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="use the fast inference path (detection.optimize_for_inference)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="backbone/FPN precision with --optimize (heads and boxes stay float32)",
    )
    return parser


def _labels(extras: dict, num_classes: int, weights: str) -> tuple[list[str], Callable[[int], int]]:
    """Class names by label, and label -> category id, from the checkpoint's stored category mapping.

    Without one (e.g. a torchvision checkpoint), labels are named ``class i`` and written as category id
    ``i``; one line says so.
    """
    if extras.get("categories"):
        from detection.data import CategoryMapping

        mapping = CategoryMapping.from_state_dict(extras["categories"])
        return list(mapping.names), mapping.to_cat_id
    k = num_classes - 1
    print(
        f"{weights}: no category mapping stored; labels are named 'class 1'..'class {k}' and written as category ids 1..{k}"
    )
    return ["__background__"] + [f"class {i}" for i in range(1, num_classes)], int


def _input_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {source}")
        return files
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"--input: no such file or folder: {source}")


def _load_model(args: argparse.Namespace, cfg: Any) -> tuple[Any, list[str], Callable[[int], int], Any]:
    """``(model on its device, class names, label -> category id, device)`` from ``--weights``."""
    from detection.trainer import build_model, select_device
    from detection.weights import load_weights, num_classes_in_state_dict, read_detector_checkpoint

    state_dict, extras = read_detector_checkpoint(args.weights)
    num_classes = cfg.model.num_classes or num_classes_in_state_dict(state_dict)
    if num_classes is None:
        from detection.config import ConfigError

        raise ConfigError(f"{args.weights}: cannot tell the number of classes; set model.num_classes")
    names, label_to_cat_id = _labels(extras, num_classes, args.weights)
    device = select_device(cfg.train.device)
    model = build_model(cfg, num_classes)
    load_weights(model, state_dict)
    model.eval().to(device)
    if args.optimize:
        from detection.inference import optimize_for_inference

        model = optimize_for_inference(model, precision=args.precision)
    return model, names, label_to_cat_id, device


def _infer(args: argparse.Namespace) -> int:
    import torch

    from detection.coco_eval import predictions_to_coco_results, write_results
    from detection.data import read_rgb_image
    from detection.io import atomic_write_json
    from detection.visualize import draw_predictions, save_image

    cfg = config_from_args(args)
    files = _input_files(Path(args.input))
    model, names, label_to_cat_id, device = _load_model(args, cfg)
    out_dir = Path(args.output_dir or Path(cfg.output_dir) / "infer")
    out_dir.mkdir(parents=True, exist_ok=True)
    results, images = [], []
    for image_id, path in enumerate(files, start=1):
        array = read_rgb_image(path)
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255)
        with torch.inference_mode():
            out = model([image.to(device)])[0]
        keep = out["scores"].cpu() >= args.score_threshold
        out = {k: v.cpu()[keep] for k, v in out.items()}
        drawn = draw_predictions(image, out, names, score_threshold=args.score_threshold)
        save_image(drawn, out_dir / f"{path.stem}.png")
        results += predictions_to_coco_results(image_id, out, label_to_cat_id)
        images.append(
            {"id": image_id, "file_name": str(path), "height": array.shape[0], "width": array.shape[1]}
        )
        print(f"{path}: {int(keep.sum())} detection(s) -> {out_dir / (path.stem + '.png')}")
    write_results(out_dir / "results.json", results)
    atomic_write_json(out_dir / "images.json", {"images": images, "class_names": names}, indent=1)
    print(f"wrote {out_dir / 'results.json'} ({len(results)} detections on {len(files)} image(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _infer(args))


if __name__ == "__main__":
    raise SystemExit(main())
