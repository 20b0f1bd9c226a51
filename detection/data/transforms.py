"""Training augmentation declared in config, run with albumentations on numpy data.

A config lists transforms by name with their parameters, in the order they are applied::

    augment:
      - {name: horizontal_flip, p: 0.5}
      - {name: scale_jitter, size: 512, min_scale: 0.5, max_scale: 2.0}
      - {name: color_jitter, brightness: 0.2}

``build_transforms(specs, train=True)`` turns that list into a :class:`DetectionTransform`, the callable that
``CocoDetection`` applies to ``uint8 [H, W, 3]`` images and numpy targets before converting them to tensors.
Boxes, masks, labels, ``iscrowd`` and ``area`` stay consistent: an object cropped out of the image leaves
with its mask, label, area and crowd flag; ``area`` is recomputed from the mask (or the box without masks).

Evaluation uses no augmentation (``train=False`` returns ``None``). Nothing here resizes to the model's
input size or normalises: torchvision's ``GeneralizedRCNNTransform`` does both inside the model.

albumentations is imported lazily, inside :func:`build_transforms`.

Known names: ``horizontal_flip``, ``vertical_flip``, ``scale_jitter``, ``large_scale_jitter``,
``random_resized_crop``, ``bbox_safe_crop``, ``color_jitter`` (see each ``_build_*`` function for
parameters and defaults).
"""

from __future__ import annotations

import difflib
import inspect
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DetectionTransform", "build_transforms", "transform_names"]

# Objects smaller than this (in pixels, either side) after a geometric transform are dropped, matching the
# dataset's rule for degenerate boxes.
_MIN_BOX_SIDE_PX = 1.0


class DetectionTransform:
    """An albumentations pipeline applied jointly to an image and its detection target.

    Called as ``image, target = transform(image, target)`` with ``image`` ``uint8 [H, W, 3]`` and a target
    holding ``boxes`` (``float32 [N, 4]`` xyxy pixels), ``labels`` (``int64 [N]``), ``area``, ``iscrowd``,
    optional ``masks`` (``uint8 [N, H, W]``), and any other keys (passed through unchanged). Returns the
    same structure for the transformed image; objects that leave the image (or shrink below 1 px) are
    removed from every per-object field.

    Args:
        compose: an ``albumentations.Compose`` with ``BboxParams(format="pascal_voc",
            label_fields=["ann_index"])``.
        names: the config names of the transforms, for ``repr``.
    """

    def __init__(self, compose: Any, names: Sequence[str] = ()) -> None:
        self.compose = compose
        self.names = tuple(names)

    def set_random_seed(self, seed: int) -> None:
        """Reseed the pipeline's random state (numpy ``Generator`` and ``random.Random``).

        One shared stream feeds every transform. (``albumentations.Compose(seed=...)`` gives each transform
        its own generator with the *same* seed, so e.g. two ``p=0.5`` transforms would always fire together.)
        """
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, target: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        boxes = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        has_masks = "masks" in target
        data: dict[str, Any] = {"image": image, "bboxes": boxes, "ann_index": np.arange(n, dtype=np.int64)}
        if has_masks and n > 0:
            # albumentations cannot stack an empty list of masks; negatives go without.
            data["masks"] = np.asarray(target["masks"], dtype=np.uint8)
        out = self.compose(**data)

        new_image = out["image"]
        height, width = new_image.shape[:2]
        keep = np.asarray(out["ann_index"], dtype=np.int64).reshape(-1)
        new_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        result = dict(target)
        if has_masks:
            if n == 0:
                masks = np.zeros((0, height, width), dtype=np.uint8)
            else:
                masks = np.asarray(out["masks"], dtype=np.uint8)
                if len(keep) < n:  # indexing copies N x H x W bytes: only when objects left
                    masks = masks[keep]
            # per-mask count_nonzero is several times faster than a reduction over axes (1, 2)
            area = np.array([np.count_nonzero(m) for m in masks], dtype=np.float32)
            # A box can survive a crop while its (non-convex) mask does not: such an object has nothing
            # left to segment, so it leaves too.
            alive = area > 0
        else:
            area = ((new_boxes[:, 2] - new_boxes[:, 0]) * (new_boxes[:, 3] - new_boxes[:, 1])).astype(
                np.float32
            )
            alive = np.ones(len(keep), dtype=bool)
        alive &= (new_boxes[:, 2] - new_boxes[:, 0] >= _MIN_BOX_SIDE_PX) & (
            new_boxes[:, 3] - new_boxes[:, 1] >= _MIN_BOX_SIDE_PX
        )
        all_alive = bool(alive.all())
        keep = keep[alive]
        result["boxes"] = new_boxes[alive]
        result["labels"] = np.asarray(target["labels"], dtype=np.int64)[keep]
        result["iscrowd"] = np.asarray(target["iscrowd"], dtype=np.int64)[keep]
        result["area"] = area[alive]
        if has_masks:
            result["masks"] = masks if all_alive else masks[alive]
        return new_image, result

    def __repr__(self) -> str:
        return f"DetectionTransform({', '.join(self.names)})"


# ---------------------------------------------------------------------------------------------------------
# Named transforms. Each builder takes keyword parameters (the YAML keys) and returns albumentations
# transforms; its signature is the list of accepted parameters shown in error messages.
# ---------------------------------------------------------------------------------------------------------


def _size_pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) for s in size):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{what}: size must be an int or [height, width], got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{what}: size must be positive, got {size!r}")
    return pair


def _scale_range(size: int, min_scale: float, max_scale: float, what: str) -> list[int]:
    if not 0 < min_scale <= max_scale:
        raise ValueError(
            f"{what}: need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what}: size must be a positive int, got {size!r}")
    lo = max(1, round(size * min_scale))
    hi = max(lo, round(size * max_scale))
    # LongestMaxSize draws one entry uniformly: every integer long side in [lo, hi] is one resize, so the
    # image is resampled once (torchvision's ScaleJitter draws a continuous factor; 1 px steps are finer
    # than anything that matters here).
    return list(range(lo, hi + 1))


def _build_horizontal_flip(*, p: float = 0.5) -> list[Any]:
    import albumentations as A

    return [A.HorizontalFlip(p=p)]


def _build_vertical_flip(*, p: float = 0.5) -> list[Any]:
    import albumentations as A

    return [A.VerticalFlip(p=p)]


def _build_scale_jitter(
    *, size: int, min_scale: float = 0.5, max_scale: float = 2.0, p: float = 1.0
) -> list[Any]:
    """Rescale so the longer side is ``size * s``, ``s ~ U(min_scale, max_scale)`` (aspect kept)."""
    import albumentations as A

    return [A.LongestMaxSize(max_size=_scale_range(size, min_scale, max_scale, "scale_jitter"), p=p)]


def _build_large_scale_jitter(
    *, size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0
) -> list[Any]:
    """LSJ (Ghiasi et al. 2021): scale jitter, then pad (bottom/right, zeros) and crop to ``size x size``."""
    import albumentations as A
    import cv2

    sizes = _scale_range(size, min_scale, max_scale, "large_scale_jitter")
    return [
        A.LongestMaxSize(max_size=sizes, p=1.0),
        A.PadIfNeeded(
            min_height=size,
            min_width=size,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
        ),
        A.RandomCrop(height=size, width=size, p=1.0),
    ]


def _build_random_resized_crop(
    *,
    size: int | Sequence[int],
    scale: Sequence[float] = (0.3, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    p: float = 1.0,
) -> list[Any]:
    """Crop a random area fraction ``scale`` and aspect ``ratio``, resize it to ``size`` ([h, w] or int).

    Boxes are clipped to the crop; objects outside it are removed with their masks.
    """
    import albumentations as A

    return [
        A.RandomResizedCrop(
            size=_size_pair(size, "random_resized_crop"), scale=tuple(scale), ratio=tuple(ratio), p=p
        )
    ]


def _build_bbox_safe_crop(
    *, size: int | Sequence[int] | None = None, erosion_rate: float = 0.0, p: float = 1.0
) -> list[Any]:
    """Random crop that keeps every box whole; with ``size`` the crop is then resized to it."""
    import albumentations as A

    if size is None:
        return [A.BBoxSafeRandomCrop(erosion_rate=erosion_rate, p=p)]
    height, width = _size_pair(size, "bbox_safe_crop")
    return [A.RandomSizedBBoxSafeCrop(height=height, width=width, erosion_rate=erosion_rate, p=p)]


def _build_color_jitter(
    *,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.0,
    p: float = 0.8,
) -> list[Any]:
    """Photometric jitter; a factor ``f`` means a multiplier in ``[1 - f, 1 + f]`` (hue: shift in ``[-f, f]``)."""
    import albumentations as A

    return [A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)]


_BUILDERS: dict[str, Callable[..., list[Any]]] = {
    "horizontal_flip": _build_horizontal_flip,
    "vertical_flip": _build_vertical_flip,
    "scale_jitter": _build_scale_jitter,
    "large_scale_jitter": _build_large_scale_jitter,
    "random_resized_crop": _build_random_resized_crop,
    "bbox_safe_crop": _build_bbox_safe_crop,
    "color_jitter": _build_color_jitter,
}


def transform_names() -> list[str]:
    """Names accepted in a transform spec's ``name`` field."""
    return sorted(_BUILDERS)


def _accepted_params(builder: Callable[..., Any]) -> tuple[list[str], list[str]]:
    params = inspect.signature(builder).parameters.values()
    names = [p.name for p in params]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    return names, required


def _checked_spec(i: int, spec: Any) -> tuple[str, Callable[..., list[Any]], dict[str, Any]]:
    """``(name, builder, params)`` of config entry ``i``; ``ValueError`` naming what is wrong with it."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"transform #{i} must be a mapping with a 'name' key, e.g. {{name: horizontal_flip, p: 0.5}}; "
            f"got {spec!r}"
        )
    name = spec["name"]
    params = {k: v for k, v in spec.items() if k != "name"}
    builder = _BUILDERS.get(name) if isinstance(name, str) else None
    if builder is None:
        close = difflib.get_close_matches(str(name), _BUILDERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"transform #{i}: unknown transform name {name!r}{hint}. Known names: {', '.join(transform_names())}"
        )
    accepted, required = _accepted_params(builder)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        suggestions = [m for u in unknown for m in difflib.get_close_matches(u, accepted, n=1)]
        hint = f" (did you mean {', '.join(repr(s) for s in suggestions)}?)" if suggestions else ""
        raise ValueError(
            f"transform #{i} '{name}': unknown parameter(s) {unknown}{hint}. "
            f"Accepted parameters: {', '.join(accepted)}"
        )
    missing = [r for r in required if r not in params]
    if missing:
        raise ValueError(
            f"transform #{i} '{name}': missing required parameter(s) {missing}. "
            f"Accepted parameters: {', '.join(accepted)}"
        )
    return name, builder, params


def build_transforms(
    specs: Sequence[Mapping[str, Any]],
    *,
    train: bool,
    min_visibility: float = 0.0,
) -> DetectionTransform | None:
    """Build the training augmentation from a config list.

    Args:
        specs: ``[{"name": <transform name>, **params}, ...]`` applied in order (see the module docstring
            for the names; each ``_build_<name>`` function documents its parameters).
        train: ``False`` returns ``None``: evaluation runs without augmentation.
        min_visibility: an object whose box keeps less than this fraction of its area after a crop is
            removed (0 keeps every object that stays at least 1 px wide and tall, as detectron2 does).

    Returns:
        A :class:`DetectionTransform`, or ``None`` for ``train=False`` or an empty list.

    Raises:
        ValueError: unknown transform name (with the known names and a suggestion), unknown or missing
            parameter (with the accepted ones), or a value the transform rejects.

    Example::

        t = build_transforms([{"name": "horizontal_flip", "p": 0.5}], train=True)
        image, target = t(image_uint8_hwc, target)
    """
    if not train or not specs:
        return None
    import albumentations as A

    transforms: list[Any] = []
    names: list[str] = []
    for i, spec in enumerate(specs):
        name, builder, params = _checked_spec(i, spec)
        try:
            transforms.extend(builder(**params))
        except (ValueError, TypeError) as e:
            # albumentations validates with pydantic; its errors do not say which config entry was wrong.
            raise ValueError(f"transform #{i} '{name}': invalid parameters {params}: {e}") from e
        names.append(name)

    with warnings.catch_warnings():
        # A purely photometric list (e.g. only color_jitter) makes albumentations warn that no transform
        # uses the boxes; they simply pass through, which is what we want.
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        compose = _compose(A, transforms, min_visibility)
    transform = DetectionTransform(compose, names)
    # A fixed default stream so that even an unseeded pipeline is reproducible; the data loader reseeds it
    # per worker and per sample.
    transform.set_random_seed(0)
    return transform


def _compose(A: Any, transforms: list[Any], min_visibility: float) -> Any:
    return A.Compose(
        transforms,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["ann_index"],
            min_width=_MIN_BOX_SIDE_PX,
            min_height=_MIN_BOX_SIDE_PX,
            min_visibility=min_visibility,
            clip=True,
        ),
    )
