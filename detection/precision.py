"""Numeric precision: the one vocabulary of precision names and the policy that applies one.

:data:`PRECISIONS` is the only table of names: the config's ``amp.dtype`` takes the long names
(``float16``, ``bfloat16``), tools' ``--precision`` / ``--optimize`` flags take the short ones
(``fp32``, ``fp16``, ``bf16``), and both resolve through :func:`to_dtype`.

:class:`PrecisionPolicy` is what training, evaluation and inference consult: whether the forward
pass runs under autocast and in which dtype, the ``GradScaler`` (enabled only for float16), and the
dtype of the boxes, scores and masks a model returns (float32 under autocast; the detectors built by
:func:`detection.build_detector` decode in float32 whatever the autocast dtype).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch

__all__ = ["AUTOCAST_DTYPES", "PRECISIONS", "PrecisionPolicy", "cpu_has_native_bf16", "short_name", "to_dtype"]

#: Every precision name, long and short, and its dtype.
PRECISIONS: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

#: The config's ``amp.dtype`` values: the dtypes autocast can run in.
AUTOCAST_DTYPES: tuple[str, ...] = ("float16", "bfloat16")

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """The dtype of a precision name (``"bfloat16"`` or ``"bf16"``); a dtype passes through."""
    if isinstance(name, torch.dtype):
        if name not in _SHORT:
            raise ValueError(f"unsupported precision {name}; choose one of {list(PRECISIONS)}")
        return name
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {list(PRECISIONS)}")
    return PRECISIONS[name]


def short_name(dtype: str | torch.dtype) -> str:
    """``fp32``, ``fp16`` or ``bf16``: the name the tools print and take as flags."""
    return _SHORT[to_dtype(dtype)]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), which oneDNN needs for fast bf16 convs.

    Without them (AVX2-only CPUs) bf16 convolutions run on slow reference kernels, many times slower
    than float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_runs_avx512() -> bool:
    """Whether ATen's CPU kernels run AVX-512 here (``torch.backends.cpu.get_cpu_capability()``; the
    environment variable ``ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one device runs a model: float32, or autocast in ``dtype``.

    Build it with :meth:`resolve` (from a config's ``amp`` section) or :meth:`of` (from a precision
    name). ``reason`` says why this precision was chosen, for the log.
    """

    device_type: str
    dtype: torch.dtype = torch.float32
    reason: str = "float32 requested"

    @classmethod
    def of(cls, precision: str | torch.dtype, device: torch.device | str = "cpu") -> PrecisionPolicy:
        """The policy for a precision name (``"fp32"``, ``"bf16"``, ``"float16"``...), warning where it is slow."""
        dtype = to_dtype(precision)
        device_type = torch.device(device).type
        if dtype != torch.float32:
            _warn_if_slow(device_type, dtype)
        return cls(device_type, dtype, "requested")

    @classmethod
    def resolve(cls, enabled: bool | str, dtype: str, device: torch.device | str) -> PrecisionPolicy:
        """The policy for an ``amp`` config section: ``enabled`` is ``True``, ``False`` or ``"auto"``.

        ``"auto"`` means autocast on CUDA and on CPUs with native bf16 (always in bfloat16 there),
        float32 elsewhere. An explicit ``True`` is honoured, with a warning where it is slow.
        """
        device_type = torch.device(device).type
        if enabled == "auto":
            if device_type == "cuda":
                return cls(device_type, to_dtype(dtype), "CUDA device")
            if cpu_has_native_bf16():
                return cls(device_type, torch.bfloat16, "CPU with native bfloat16")
            return cls(device_type, torch.float32, "this CPU has no native bfloat16 (AVX512-BF16/AMX), so float32 is faster")
        if not enabled:
            return cls(device_type, torch.float32, "amp disabled")
        return cls.of(dtype, device_type)

    @property
    def enabled(self) -> bool:
        """Whether the forward pass runs under autocast."""
        return self.dtype != torch.float32

    @property
    def name(self) -> str:
        """``fp32``, ``fp16`` or ``bf16``."""
        return _SHORT[self.dtype]

    @property
    def channels_last(self) -> bool:
        """Whether convolutions run faster in the channels-last memory format under this policy.

        On a CPU with AVX-512, yes: oneDNN's convolution kernels take channels-last (NHWC) maps and
        weights and reorder contiguous (NCHW) ones at every layer, forward and backward (measured: a
        Mask R-CNN R50-FPN training step at 800 px 0.84-0.85x the time in fp32), and its fast bf16
        kernels need it. With AVX2 kernels only, no: the same step took 14.5-14.7 s channels-last
        against 11.9-13.7 s contiguous (the same CPU with ``ONEDNN_MAX_CPU_ISA=AVX2
        ATEN_CPU_CAPABILITY=avx2``). On CUDA under autocast, yes (tensor cores); for float32 on CUDA, no.
        This is what ``train.channels_last: auto`` follows.
        """
        if self.device_type == "cpu":
            return cpu_runs_avx512()
        return self.device_type == "cuda" and self.enabled

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype of boxes, scores and masks the model returns under this policy."""
        return torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in this policy's dtype, or a null context for float32."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A ``GradScaler``, enabled only for float16 (bfloat16 has float32's range and needs none)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def describe(self) -> str:
        """One phrase for the log, e.g. ``amp bf16 (CPU with native bfloat16)``."""
        return f"amp {self.name if self.enabled else 'off'} ({self.reason})"


def _warn_if_slow(device_type: str, dtype: torch.dtype) -> None:
    if device_type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            f"{short_name(dtype)} autocast on a CPU without native bfloat16 (AVX512-BF16/AMX) runs slow reference "
            "kernels, often many times slower than float32; use float32 here (amp.enabled: auto or false)",
            stacklevel=3,
        )
