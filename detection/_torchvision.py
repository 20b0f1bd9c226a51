"""The private torchvision helpers this package uses, imported in one place.

torchvision does not promise to keep these names: when an upgrade moves one, the import below
fails with a message naming the helper and its old module, and this file is the only one to fix.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "batched_nms_vanilla",
    "convert_to_roi_format",
    "expand_boxes",
    "expand_masks",
    "filter_input",
    "multiscale_roi_align",
    "resize_boxes",
    "resize_keypoints",
    "setup_scales",
]

#: public alias -> (torchvision module, private name)
HELPERS: dict[str, tuple[str, str]] = {
    "batched_nms_vanilla": ("torchvision.ops.boxes", "_batched_nms_vanilla"),
    "convert_to_roi_format": ("torchvision.ops.poolers", "_convert_to_roi_format"),
    "filter_input": ("torchvision.ops.poolers", "_filter_input"),
    "setup_scales": ("torchvision.ops.poolers", "_setup_scales"),
    "multiscale_roi_align": ("torchvision.ops.poolers", "_multiscale_roi_align"),
    "expand_boxes": ("torchvision.models.detection.roi_heads", "expand_boxes"),
    "expand_masks": ("torchvision.models.detection.roi_heads", "expand_masks"),
    "resize_boxes": ("torchvision.models.detection.transform", "resize_boxes"),
    "resize_keypoints": ("torchvision.models.detection.transform", "resize_keypoints"),
}


def _load(alias: str) -> Any:
    module_name, name = HELPERS[alias]
    import torchvision

    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"torchvision {torchvision.__version__} has no {module_name}.{name}, which detection/_torchvision.py "
            f"imports as {alias!r}; find where this torchvision version defines it and update HELPERS there"
        ) from exc


batched_nms_vanilla = _load("batched_nms_vanilla")
convert_to_roi_format = _load("convert_to_roi_format")
filter_input = _load("filter_input")
setup_scales = _load("setup_scales")
multiscale_roi_align = _load("multiscale_roi_align")
expand_boxes = _load("expand_boxes")
expand_masks = _load("expand_masks")
resize_boxes = _load("resize_boxes")
resize_keypoints = _load("resize_keypoints")
