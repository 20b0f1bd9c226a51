"""``load_weights``: put a torchvision detector checkpoint (or one of ours) into a detector built here."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from backbone import WeightsError, is_state_dict, load_state_dict_checked, safe_load

__all__ = ["load_weights", "num_classes_in_state_dict", "read_detector_checkpoint"]

#: Where checkpoints that carry more than weights keep their state dict (ours: "model").
_WRAPPER_KEYS = ("model", "state_dict")


def read_detector_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, object]]:
    """The state dict of a detector file and the file's other top-level entries.

    A torchvision detector file is a plain state dict (no extras); a training checkpoint of ours
    holds it under ``"model"``, next to ``config``, ``categories``, ``iteration``... (other trainers
    use ``"state_dict"``). The file is read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: the file does not exist.
        backbone.WeightsError: unreadable or unsafe file, or no state dict in it.
    """
    obj = safe_load(path)
    return _unwrap(obj, source=os.fspath(path))


def _unwrap(obj: object, *, source: str) -> tuple[dict[str, Tensor], dict[str, object]]:
    """``(state dict, other entries)`` of a plain state dict or of a dict holding one under "model" / "state_dict"."""
    if is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return dict(obj[key]), {k: v for k, v in obj.items() if k != key}
        raise WeightsError(
            f"{source}: expected a state dict (parameter name -> tensor) or a dict holding one under 'model' or "
            f"'state_dict'; found a dict with keys {list(obj)[:5]}"
        )
    raise WeightsError(f"{source}: expected a state dict (parameter name -> tensor), found a {type(obj).__name__}")


def load_weights(model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Tensor]) -> nn.Module:
    """Load detector weights strictly, reporting mismatches by key and shape.

    Args:
        model: a detector from :func:`detection.build_detector` (or any module).
        path_or_state_dict: a state dict, or a file holding one: torchvision's published detector
            checkpoints (for example ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, including their
            pre-0.13 FPN key layout), ``model.state_dict()`` of a torchvision detector, or a
            training checkpoint of ours (the state dict under ``"model"``, or ``"state_dict"``). Files are read with
            ``torch.load(weights_only=True)``. A ``module.`` prefix (saved from a
            ``DistributedDataParallel`` wrapper) is removed.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: the file does not exist.
        backbone.WeightsError: unreadable or unsafe file, or keys / shapes that do not fit, naming the
            file and the first mismatched keys with both shapes.

    Example:
        >>> model = build_detector("faster_rcnn", "resnet50", num_classes=91)  # doctest: +SKIP
        >>> load_weights(model, "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")  # doctest: +SKIP
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "the given state dict"
        state_dict, _ = _unwrap(path_or_state_dict, source=source)
    else:
        source = os.fspath(path_or_state_dict)
        state_dict, _ = read_detector_checkpoint(path_or_state_dict)
    consume_prefix_in_state_dict_if_present(state_dict, "module.")
    load_state_dict_checked(model, state_dict, source=source)
    return model


def num_classes_in_state_dict(state_dict: Mapping[str, Tensor]) -> int | None:
    """Classes (background included) of a detector state dict, read from its classifier's shape.

    R-CNNs: rows of ``box_predictor.cls_score.weight``. RetinaNet / FCOS: rows of the classification
    head's last conv divided by the anchors per location (from the regression head). ``None`` when the
    state dict has no known classifier.
    """
    for key, value in state_dict.items():
        if key.endswith("box_predictor.cls_score.weight"):
            return int(value.shape[0])
    cls = next((v for k, v in state_dict.items() if k.endswith("classification_head.cls_logits.weight")), None)
    reg = next((v for k, v in state_dict.items() if k.endswith("regression_head.bbox_reg.weight")), None)
    if cls is not None:
        anchors = 1 if reg is None else max(1, reg.shape[0] // 4)
        return int(cls.shape[0]) // anchors
    return None
