"""``optimize_for_inference``: a faster eval-only detector with the same outputs.

What it does, in place, to a detector in eval mode:

1. folds every frozen or eval-mode BatchNorm into the convolution before it (the body's blocks and
   stem, and ``Sequential(conv, norm, ...)`` stacks in the FPN and the v2 heads), leaving an
   ``Identity`` where the norm was;
2. converts the convolutional parts to the channels-last memory format, which oneDNN (CPU) and cuDNN
   (tensor cores) run faster;
3. optionally runs the forward pass under autocast (``precision="bf16"`` or ``"fp16"``); boxes, scores
   and masks are still decoded and returned in float32 (see :mod:`detection.amp`).

In fp32 mode the outputs match the unoptimised model to about 1e-4 (folding reorders float operations).
The folded model is for inference only: training it again would train the folded weights without
normalisation.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .amp import autocast, decode_in_float32

__all__ = ["fold_batch_norms", "optimize_for_inference"]

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _foldable(norm: nn.Module) -> bool:
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    eps = norm.eps
    scale = norm.weight * (norm.running_var + eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype).clone(), requires_grad=False)
    else:
        conv.bias.mul_(scale).add_(shift)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold eligible BN layers into their preceding convs, in place; returns how many were folded.

    Pairs are found structurally: ``convN``/``bnN`` attributes of one module (ResNet blocks and stem)
    and consecutive ``Conv2d`` -> BN entries of any ``nn.Sequential`` (projection shortcuts, FPN and
    head stacks). Training-mode BN (statistics still updating) is left alone.
    """
    folded = 0
    for module in list(model.modules()):
        for i in range(1, 4):
            conv, norm = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and norm is not None and _foldable(norm):
                _fold(conv, norm)
                setattr(module, f"bn{i}", nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (_, first), (second_name, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and _foldable(second):
                    _fold(first, second)
                    module._modules[second_name] = nn.Identity()
                    folded += 1
    return folded


def _channels_last_input(backbone: nn.Module) -> None:
    forward = backbone.forward

    @functools.wraps(forward)
    def wrapped(x: torch.Tensor):  # type: ignore[no-untyped-def]
        return forward(x.contiguous(memory_format=torch.channels_last))

    backbone.forward = wrapped


def optimize_for_inference(
    model: nn.Module,
    *,
    precision: Precision = "fp32",
    channels_last: bool = True,
    fold_bn: bool = True,
) -> nn.Module:
    """Make a detector faster for inference, in place; returns it (in eval mode).

    Args:
        model: a detector from :func:`detection.build_detector` (any torchvision detector with a
            ``backbone`` works; float32 decoding hooks are added if missing).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run convolutions and linear layers under
            autocast. Boxes, scores and masks come out float32 either way. On CPUs without native
            bf16 (AVX512-BF16/AMX) reduced precision is slower than fp32, and a warning says so.
        channels_last: use the channels-last memory format for the backbone and FPN.
        fold_bn: fold frozen / eval-mode BatchNorm into the preceding convolutions.

    Returns:
        ``model``, optimised. Call it as before: ``model(list_of_images)``.

    Example:
        >>> model = optimize_for_inference(build_detector("mask_rcnn", "resnet50").eval())  # doctest: +SKIP
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {list(_DTYPES)}, got {precision!r}")
    model.eval()
    decode_in_float32(model)
    if fold_bn:
        fold_batch_norms(model)
    backbone = getattr(model, "backbone", None)
    if channels_last and backbone is not None:
        backbone.to(memory_format=torch.channels_last)
        _channels_last_input(backbone)
    if precision != "fp32":
        param = next(model.parameters())
        device = param.device
        if device.type == "cpu" and precision == "bf16":
            from .amp import cpu_has_native_bf16

            if not cpu_has_native_bf16():
                warnings.warn(
                    "this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 inference runs slow reference "
                    "kernels here and will be slower than fp32",
                    stacklevel=2,
                )
        forward = model.forward
        dtype = _DTYPES[precision]

        @functools.wraps(forward)
        def reduced(*args, **kwargs):  # type: ignore[no-untyped-def]
            with autocast(device, True, dtype):
                return forward(*args, **kwargs)

        model.forward = reduced
    model._optimized_for_inference = precision
    return model
