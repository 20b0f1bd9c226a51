"""Pictures of a run: a grid of predictions (``predictions.png``) and training curves (``curves.png``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

__all__ = ["draw_predictions", "save_curves", "save_image", "save_prediction_grid"]

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


def _colour(label: int) -> tuple[int, int, int]:
    return _PALETTE[label % len(_PALETTE)]


def draw_predictions(
    image: torch.Tensor,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """Draw masks, boxes, class names and scores on one image.

    Args:
        image: float ``[3, H, W]`` in [0, 1] (or uint8).
        prediction: a detector output for this image (``boxes``, ``labels``, ``scores``, optional
            ``masks`` ``[N, 1, H, W]`` probabilities, optional ``keypoints`` ``[N, K, 3]``).
        class_names: label -> name (index 0 is the background).
        score_threshold: detections below this score are not drawn.

    Returns:
        uint8 ``[3, H, W]``.
    """
    img = image.detach().cpu()
    if img.is_floating_point():
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    boxes = prediction["boxes"].detach().cpu().float()[keep]
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu().float()[keep].tolist()
    if not labels:
        return img
    colours = [_colour(lab) for lab in labels]
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu().float()[keep]
        if masks.dim() == 4:
            masks = masks[:, 0]
        img = draw_segmentation_masks(img, masks > mask_threshold, alpha=0.45, colors=colours)
    names = [class_names[lab] if 0 <= lab < len(class_names) else str(lab) for lab in labels]
    captions = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    img = draw_bounding_boxes(img, boxes, labels=captions, colors=colours, width=2)
    if "keypoints" in prediction:
        from torchvision.utils import draw_keypoints

        kps = prediction["keypoints"].detach().cpu().float()[keep]
        img = draw_keypoints(img, kps[..., :2], colors="white", radius=2)
    return img


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
    """A grid (4 columns) of images with their drawn predictions, each resized into a ``cell_size`` square."""
    import torch.nn.functional as F

    if not images:
        raise ValueError("save_prediction_grid needs at least one image")
    cells = []
    for img, pred in zip(images, predictions):
        drawn = draw_predictions(img, pred, class_names, score_threshold=score_threshold)
        h, w = drawn.shape[-2:]
        scale = cell_size / max(h, w)
        resized = F.interpolate(drawn[None].float(), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", antialias=True, align_corners=False)[0]
        canvas = torch.full((3, cell_size, cell_size), 255.0)
        canvas[:, : resized.shape[1], : resized.shape[2]] = resized
        cells.append(canvas.round().clamp(0, 255).to(torch.uint8))
    grid = make_grid(cells, nrow=min(4, len(cells)), padding=4, pad_value=255)
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
