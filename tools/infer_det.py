"""Run a detector on an image or a folder of images; write annotated PNGs and COCO-format results.

Examples::

    python tools/infer_det.py --weights output/quickstart --input path/to/images --output-dir output/infer
    python tools/infer_det.py --config configs/mask_rcnn_r50_fpn_1x_coco.yaml \\
        --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --input photo.jpg --score-threshold 0.7
    # results named by the annotation file's image ids, then scored
    python tools/infer_det.py --weights output/run --input val/images --ann val/annotations.json --output-dir out
    python tools/eval_det.py --results out/results.json --ann val/annotations.json --output-dir out

``--weights`` is a run folder or a checkpoint (see :func:`detection.load_run`); ``--config`` is needed
only for a checkpoint that stores none (torchvision's files). Writes ``<output-dir>/<image stem>.png``
with masks, boxes, class names and scores drawn, plus ``results.json`` (COCO results: one entry per
detection) and ``images.json`` (each image's id, file and size, and the class names). Image ids are the
annotation file's ids with ``--ann`` (files matched by name), else the file stem where it is all digits
(COCO's file names), with the next free integers for other names. Unreadable images are skipped with one warning line each
(``--on-bad-image error`` stops instead, after writing the results so far). Exit status 0 on success,
2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args, get_type_hints

from detection.cli import add_config_arguments, config_from_args, run_main
from detection.config import DataConfig
from detection.io import make_output_dir
from detection.precision import PRECISIONS, short_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_BAD_IMAGE_CHOICES = get_args(get_type_hints(DataConfig)["on_bad_image"])  # ("error", "skip")
_PRECISION_FLAGS = list(dict.fromkeys(short_name(dtype) for dtype in PRECISIONS.values()))  # fp32, fp16, bf16


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer_det.py", description="Detect objects in images and draw them.")
    add_config_arguments(parser, required=False)
    parser.add_argument("--weights", metavar="PATH", required=True,
                        help="a run folder (config.yaml + model_final.pth) or a checkpoint (ours or torchvision's)")
    parser.add_argument("--input", metavar="PATH", required=True, help="an image file or a folder of images")
    parser.add_argument("--ann", metavar="JSON",
                        help="COCO annotation file: name results by its image ids (files matched by file name)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw and save detections scoring at least this (default: %(default)s)")
    parser.add_argument("--on-bad-image", choices=_BAD_IMAGE_CHOICES, default="skip",
                        help="an unreadable image: skip it with a warning, or stop (default: %(default)s)")
    parser.add_argument("--optimize", action="store_true",
                        help="use the fast inference path (detection.optimize_for_inference)")
    parser.add_argument("--precision", choices=_PRECISION_FLAGS, default="fp32",
                        help="backbone/FPN precision with --optimize (heads and boxes stay float32)")
    return parser


def _input_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {source}")
        return files
    if source.is_file():
        return [source]
    raise FileNotFoundError(f"--input: no such file or folder: {source}")


def stem_ids(files: list[Path]) -> list[int]:
    """Image ids without an annotation file: the stem as an integer where it is all digits (COCO's file
    names), else (and for a repeated number) the next ids after the largest such number, in file order.

    COCO results need integer ids; ``images.json`` records which file has which.
    """
    ids: list[int | None] = []
    taken: set[int] = set()
    for path in files:
        number = int(path.stem) if path.stem.isdigit() else None
        ids.append(number if number is not None and number not in taken else None)
        taken.update({number} if number is not None else set())
    fresh = iter(range(max(taken, default=0) + 1, max(taken, default=0) + len(files) + 1))
    return [i if i is not None else next(fresh) for i in ids]


def annotation_ids(ann_file: str) -> dict[str, int]:
    """File name (base name) -> image id of a COCO annotation file."""
    from detection.data import DatasetError
    from detection.data.annotations import load_annotation_file

    ids: dict[str, int] = {}
    for image in load_annotation_file(Path(ann_file))["images"]:
        name = Path(str(image.get("file_name", ""))).name
        if name in ids:
            raise DatasetError(f"--ann {ann_file}: two images share the file name {name!r}; cannot match files by name")
        ids[name] = image["id"]
    return ids


def _image_ids(files: list[Path], ann: str | None) -> list[tuple[Path, Any]]:
    """``(file, image id)`` per file; with ``--ann`` files it does not list are skipped with a warning."""
    if ann is None:
        return list(zip(files, stem_ids(files)))
    ids = annotation_ids(ann)
    known = []
    for p in files:
        if p.name in ids:
            known.append((p, ids[p.name]))
        else:
            print(f"warning: {p}: not listed in --ann {ann}; skipped", file=sys.stderr)
    return known


def _load(args: argparse.Namespace) -> Any:
    from detection import load_run

    cfg = config_from_args(args) if args.config is not None else None
    run = load_run(args.weights, config=cfg, overrides=() if cfg is not None else args.overrides)
    return run.optimize_for_inference(args.precision) if args.optimize else run


def _infer(args: argparse.Namespace) -> int:
    from detection.data import DatasetError

    run = _load(args)  # first: a config mistake is reported before any image is looked at
    files = _image_ids(_input_files(Path(args.input)), args.ann)
    out_dir = Path(args.output_dir or Path(run.config.output_dir) / "infer")
    make_output_dir(out_dir)
    results: list[dict] = []
    images: list[dict] = []
    try:
        for path, image_id in files:
            try:
                results += _one_image(run, path, image_id, images, out_dir, args.score_threshold)
            except (DatasetError, OSError) as exc:
                if args.on_bad_image == "error":
                    raise
                print(f"warning: {exc}; skipped", file=sys.stderr)
    finally:
        _write(out_dir, results, images, run.class_names)
    skipped = len(files) - len(images)
    print(f"wrote {out_dir / 'results.json'} ({len(results)} detections on {len(images)} image(s)"
          + (f"; {skipped} skipped)" if skipped else ")"))
    return 0


def _one_image(run: Any, path: Path, image_id: Any, images: list[dict], out_dir: Path, threshold: float) -> list[dict]:
    """Detect on one file, draw it, record it in ``images``; returns its COCO results."""
    from detection.coco_eval import predictions_to_coco_results
    from detection.run import as_image_tensor
    from detection.visualize import draw_predictions, save_image

    image = as_image_tensor(path)
    out = run.predict(image, score_threshold=threshold)[0]
    drawn = draw_predictions(image, out, run.class_names, score_threshold=threshold)
    save_image(drawn, out_dir / f"{path.stem}.png")
    images.append({"id": image_id, "file_name": str(path), "height": image.shape[1], "width": image.shape[2]})
    print(f"{path}: {len(out['scores'])} detection(s) -> {out_dir / (path.stem + '.png')}")
    return predictions_to_coco_results(image_id, out, run.label_to_cat_id)


def _write(out_dir: Path, results: list[dict], images: list[dict], names: list[str]) -> None:
    from detection.coco_eval import write_results
    from detection.io import atomic_write_json

    write_results(out_dir / "results.json", results)
    atomic_write_json(out_dir / "images.json", {"images": images, "class_names": names}, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _infer(args))


if __name__ == "__main__":
    raise SystemExit(main())
