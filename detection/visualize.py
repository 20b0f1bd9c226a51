"""Pictures of a run: a grid of predictions (``predictions.png``) and training curves (``curves.png``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

__all__ = ["draw_banner", "draw_captions", "draw_predictions", "save_curves", "save_image", "save_prediction_grid"]

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


def _colour(label: int) -> tuple[int, int, int]:
    return _PALETTE[label % len(_PALETTE)]


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 150 else (255, 255, 255)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place(size: tuple[float, float], box: Sequence[float], image_size: tuple[int, int],
           taken: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """A caption rectangle near ``box``'s top-left corner (above it, else inside), moved down past the
    captions already placed so that none overlap."""
    (tw, th), w = size, image_size[0]
    x = min(max(box[0], 0), max(w - tw, 0))
    y = box[1] - th if box[1] - th >= 0 else max(box[1], 0)
    rect = (x, y, x + tw, y + th)
    for _ in range(50):
        hit = [t for t in taken if _overlaps(rect, t)]
        if not hit:
            break
        y = max(t[3] for t in hit)
        rect = (x, y, x + tw, y + th)
    return rect


def draw_captions(image: torch.Tensor, boxes: torch.Tensor, captions: Sequence[str],
                  colours: Sequence[tuple[int, int, int]], *, font_size: int | None = None) -> torch.Tensor:
    """Captions on a filled background in the box colour, sized to the image, never overlapping each other.

    ``font_size`` defaults to 1/20 of the image's shorter side (at least 10 px).
    """
    from PIL import Image, ImageDraw

    h, w = image.shape[-2:]
    font = _font(font_size or max(10, min(h, w) // 20))
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    taken: list[tuple[float, float, float, float]] = []
    pad = 2
    for box, caption, colour in zip(boxes.tolist(), captions, colours):
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        rect = _place((right - left + 2 * pad, bottom - top + 2 * pad), box, (w, h), taken)
        taken.append(rect)
        draw.rectangle(rect, fill=colour)
        draw.text((rect[0] + pad - left, rect[1] + pad - top), caption, fill=_text_colour(colour), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def draw_banner(image: torch.Tensor, text: str, *, font_size: int | None = None) -> torch.Tensor:
    """``text`` in white on a dark strip across the bottom of ``image``."""
    from PIL import Image, ImageDraw

    h, w = image.shape[-2:]
    font = _font(font_size or max(10, min(h, w) // 20))
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = h - (bottom - top) - 6
    draw.rectangle((0, y, w, h), fill=(40, 40, 40))
    draw.text((4 - left, y + 3 - top), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def draw_predictions(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """Draw masks, boxes and captions (class name and score) on one image.

    Args:
        image: float ``[3, H, W]`` in [0, 1] (or uint8).
        prediction: a detector output for this image (``boxes``, ``labels``, ``scores``, optional
            ``masks`` ``[N, 1, H, W]`` probabilities, optional ``keypoints`` ``[N, K, 3]``).
        class_names: label -> name (index 0 is the background).
        score_threshold: detections below this score are not drawn; when none is left the image
            says "no detections above <threshold>".

    Returns:
        uint8 ``[3, H, W]``.
    """
    img = image.detach().cpu()
    if img.is_floating_point():
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    scores_all = prediction["scores"].detach().cpu().float()
    order = torch.argsort(scores_all, descending=True)
    keep = order[scores_all[order] >= score_threshold]
    boxes = prediction["boxes"].detach().cpu().float()[keep]
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = scores_all[keep].tolist()
    if not labels:
        return draw_banner(img, f"no detections above {score_threshold:g}")
    colours = [_colour(lab) for lab in labels]
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu().float()[keep]
        if masks.dim() == 4:
            masks = masks[:, 0]
        img = draw_segmentation_masks(img, masks > mask_threshold, alpha=0.45, colors=colours)
    img = draw_bounding_boxes(img, boxes, colors=colours, width=max(1, min(img.shape[-2:]) // 128))
    if "keypoints" in prediction:
        from torchvision.utils import draw_keypoints

        kps = prediction["keypoints"].detach().cpu().float()[keep]
        img = draw_keypoints(img, kps[..., :2], colors="white", radius=2)
    names = [class_names[lab] if 0 <= lab < len(class_names) else str(lab) for lab in labels]
    return draw_captions(img, boxes, [f"{n} {s:.2f}" for n, s in zip(names, scores)], colours)


def _resized(image: torch.Tensor, prediction: Mapping[str, torch.Tensor], cell_size: int) -> tuple[torch.Tensor, dict]:
    """``image`` and its prediction scaled so that the longer side is ``cell_size`` (text is drawn at that size)."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    scale = cell_size / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = image.detach().cpu()
    img = img.float() / 255 if not img.is_floating_point() else img.float()
    out = {k: v.detach().cpu() for k, v in prediction.items()}
    img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    out["boxes"] = out["boxes"].float() * scale
    if "masks" in out and len(out["masks"]):
        masks = out["masks"].float()
        out["masks"] = F.interpolate(masks if masks.dim() == 4 else masks[:, None], size=size, mode="bilinear",
                                     align_corners=False)
    elif "masks" in out:
        out["masks"] = torch.zeros((0, 1, *size))
    if "keypoints" in out:
        out["keypoints"] = out["keypoints"].float() * torch.tensor([scale, scale, 1.0])
    return img, out


def save_image(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write a uint8 ``[3, H, W]`` tensor as PNG (or any format PIL infers from the suffix)."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def save_prediction_grid(
    images: Sequence[torch.Tensor],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    score_threshold: float = 0.5,
    cell_size: int = 256,
) -> Path:
    """A grid (4 columns) of images with their predictions above ``score_threshold`` drawn, each scaled
    into a ``cell_size`` square, under a title that states the threshold."""
    if not images:
        raise ValueError("save_prediction_grid needs at least one image")
    cells = []
    for img, pred in zip(images, predictions):
        small, scaled = _resized(img, pred, cell_size)
        drawn = draw_predictions(small, scaled, class_names, score_threshold=score_threshold)
        canvas = torch.full((3, cell_size, cell_size), 255, dtype=torch.uint8)
        canvas[:, : drawn.shape[1], : drawn.shape[2]] = drawn
        cells.append(canvas)
    grid = make_grid(cells, nrow=min(4, len(cells)), padding=4, pad_value=255)
    title = torch.full((3, max(24, cell_size // 10), grid.shape[-1]), 255, dtype=torch.uint8)
    title = draw_banner(title, f"detections with score >= {score_threshold:g} (eval.vis_score_threshold)")
    grid = torch.cat([title, grid], dim=1)
    save_image(grid, path)
    return Path(path)


def save_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Plot loss terms, learning rate and AP at each evaluation from ``metrics.jsonl`` records.

    Needs matplotlib (the ``plots`` extra). Without it, warns once and returns ``None``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            f"matplotlib is not installed, so {path} is skipped; install it with: pip install matplotlib "
            "(or the package's [plots] extra)",
            stacklevel=2,
        )
        return None
    train = [r for r in records if r.get("type", "train") == "train" and "iteration" in r]
    evals = [r for r in records if r.get("type") == "eval"]
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss") or k in ("classification", "bbox_regression", "bbox_ctrness")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    its = [r["iteration"] for r in train]
    for key in loss_keys:
        vals = [r.get(key) for r in train]
        pts = [(i, v) for i, v in zip(its, vals) if isinstance(v, (int, float)) and math.isfinite(v)]
        if pts:
            axes[0].plot(*zip(*pts), label=key, linewidth=1.5 if key == "loss" else 1.0)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("iteration")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    axes[1].plot(its, [r.get("lr", float("nan")) for r in train], color="tab:orange")
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("iteration")
    axes[1].grid(alpha=0.3)
    ap_keys = [k for k in ("bbox/AP", "bbox/AP50", "segm/AP", "keypoints/AP") if any(k in r for r in evals)]
    for key in ap_keys:
        pts = [(r["iteration"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=key)
    axes[2].set_title("COCO AP (%) at each evaluation")
    axes[2].set_xlabel("iteration")
    axes[2].grid(alpha=0.3)
    if ap_keys:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
