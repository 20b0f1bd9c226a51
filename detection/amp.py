"""Mixed precision policy: one place that decides autocast, the grad scaler and float32 box decoding.

Under ``torch.autocast`` torchvision's detectors compute anchors in the feature maps' dtype and
decode boxes from bf16/fp16 regressions, so boxes, scores and masks come out in reduced precision
(bf16 spacing is 4 px for coordinates between 512 and 1024). Here the convolutions still run in
reduced precision, but:

* anchors are always generated in float32 (:class:`Float32AnchorGenerator`);
* the outputs of the prediction heads (RPN head, box / mask / keypoint predictors, RetinaNet and
  FCOS heads) are cast to float32 before decoding and losses (:func:`decode_in_float32`).

So boxes, scores and masks leave the model in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

__all__ = [
    "Float32AnchorGenerator",
    "autocast",
    "cpu_has_native_bf16",
    "decode_in_float32",
    "make_grad_scaler",
    "resolve_amp",
    "resolve_dtype",
]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {list(_DTYPES)}")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which oneDNN needs for fast bf16 convs.

    Without them (AVX2-only CPUs) bf16 convolutions run on slow reference kernels: measured 60x slower
    than float32 on a 2-core AVX2 EPYC.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(enabled: bool | str, dtype: str, device: torch.device | str) -> tuple[bool, str, str]:
    """Turn an ``AmpConfig`` into what runs here: ``(enabled, dtype, reason)``.

    ``enabled="auto"`` means autocast on CUDA and on CPUs with native bf16 (always in bfloat16 there),
    float32 elsewhere. An explicit ``True`` is honoured, with a warning when bf16/fp16 on this CPU would
    be slower than float32.
    """
    device_type = torch.device(device).type
    if enabled == "auto":
        if device_type == "cuda":
            return True, dtype, "CUDA device"
        if cpu_has_native_bf16():
            return True, "bfloat16", "CPU with native bfloat16"
        return False, dtype, "this CPU has no native bfloat16 (AVX512-BF16/AMX), so float32 is faster"
    if enabled and device_type == "cpu" and not cpu_has_native_bf16():
        import warnings

        warnings.warn(
            f"{dtype} autocast on a CPU without native bfloat16 (AVX512-BF16/AMX) runs slow reference kernels, "
            "often many times slower than float32; set amp.enabled: auto (or false) to use float32 here",
            stacklevel=2,
        )
    return bool(enabled), dtype, "requested"


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` that always builds anchors in float32.

    Only the feature maps' spatial sizes are read, so reduced-precision maps are replaced by
    zero-stride float32 stand-ins of the same size (no memory is allocated).
    """

    def forward(self, image_list: Any, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if feature_maps and feature_maps[0].dtype != torch.float32:
            feature_maps = [
                torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape[-2:]) for f in feature_maps
            ]
        return super().forward(image_list, feature_maps)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        items = [_to_float32(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    return value


def _cast_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
    return _to_float32(output)


def decode_in_float32(model: nn.Module) -> nn.Module:
    """Register hooks that hand float32 head outputs to torchvision's box decoding and losses.

    Applies to whichever of these the model has: ``rpn.head``, ``roi_heads.box_predictor``,
    ``roi_heads.mask_predictor``, ``roi_heads.keypoint_predictor`` and ``head`` (RetinaNet, FCOS).
    Idempotent; returns ``model``.
    """
    paths = ("rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor", "roi_heads.keypoint_predictor", "head")
    for path in paths:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module) and not getattr(module, "_decodes_in_float32", False):
            module.register_forward_hook(_cast_hook)
            module._decodes_in_float32 = True
    return model


def autocast(device: torch.device | str, enabled: bool, dtype: str | torch.dtype = "bfloat16") -> contextlib.AbstractContextManager:
    """``torch.amp.autocast`` for ``device``'s type, or a null context when disabled."""
    device_type = torch.device(device).type
    if not enabled:
        return contextlib.nullcontext()
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    return torch.amp.autocast(device_type=device_type, dtype=torch_dtype)


def make_grad_scaler(device: torch.device | str, enabled: bool, dtype: str | torch.dtype) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled only for float16 (bfloat16 has float32's range and needs none)."""
    torch_dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled and torch_dtype == torch.float16)

