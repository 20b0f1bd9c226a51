"""``load_weights``: put a torchvision detector checkpoint (or one of ours) into a detector built here."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn

from backbone import load_state_dict_checked, read_checkpoint, read_checkpoint_and_extras

__all__ = ["load_weights", "num_classes_in_state_dict", "read_detector_checkpoint"]


def read_detector_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, object]]:
    """The state dict of a detector file and the file's other top-level entries.

    A torchvision detector file is a plain state dict (no extras); a training checkpoint of ours
    holds it under ``"model"``, next to ``config``, ``categories``, ``iteration``...
    """
    return read_checkpoint_and_extras(path)


def load_weights(model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Tensor]) -> nn.Module:
    """Load detector weights strictly, reporting mismatches by key and shape.

    Args:
        model: a detector from :func:`detection.build_detector` (or any module).
        path_or_state_dict: a state dict, or a file holding one: torchvision's published detector
            checkpoints (for example ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, including their
            pre-0.13 FPN key layout), ``model.state_dict()`` of a torchvision detector, or a
            training checkpoint of ours (the state dict under ``"model"``). Files are read with
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
        state_dict = dict(path_or_state_dict)
        inner = state_dict.get("model")
        if isinstance(inner, Mapping):
            state_dict = dict(inner)
    else:
        source = os.fspath(path_or_state_dict)
        state_dict = read_checkpoint(path_or_state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
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
