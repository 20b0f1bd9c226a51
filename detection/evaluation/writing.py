"""Metrics and results files: JSON written atomically through :func:`detection.io.atomic_write_json`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from ..io import atomic_write_json

__all__ = ["write_metrics", "write_results"]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, Tensor)):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, float]) -> None:
    """Write metrics as JSON: sorted keys, NaN/inf as ``null``, atomically.

    Args:
        path: target file; its parent directory is created if needed.
        metrics: flat name → value dict, e.g. from :func:`evaluate_coco_results`.
    """
    clean: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {type(key).__name__} {key!r}")
        value = float(value)
        clean[key] = value if math.isfinite(value) else None
    atomic_write_json(path, clean, sort_keys=True, indent=2)


def write_results(path: str | os.PathLike, results: list[dict]) -> None:
    """Write COCO result dicts as a JSON list, atomically.

    The file is what :func:`evaluate_coco_results` (and ``tools/eval_det.py --results``) reads back.
    """
    atomic_write_json(path, list(results), default=_json_default)
