"""The training step and the inference loop: precision, gradient accumulation and clipping, non-finite guard."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .precision import PrecisionPolicy

__all__ = ["NonFiniteLossError", "StepResult", "describe_bad_step", "non_finite_tensors", "run_inference", "to_device", "train_step"]


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses for too many consecutive steps."""


def to_device(
    images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]] | None, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    imgs = [img.to(device, non_blocking=True) for img in images]
    if targets is None:
        return imgs, None
    return imgs, [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


@dataclass(frozen=True, slots=True)
class StepResult:
    """Outcome of one training iteration: this rank's loss terms, whether the step was finite on every
    rank (``bad`` says what was not: ``"loss"`` or ``"gradients"``), and whether the optimizer stepped
    (the last micro-step of an accumulation)."""

    losses: dict[str, float]
    finite: bool
    stepped: bool
    bad: str | None = None


def train_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: PrecisionPolicy,
    accumulate_steps: int = 1,
    micro_step: int = 0,
    clip_grad_norm: float | None = None,
    all_ranks_finite: Callable[[bool], bool] = lambda ok: ok,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepResult:
    """Forward under ``precision``, backward and (every ``accumulate_steps`` micro-steps) an optimizer step.

    The loss is divided by ``accumulate_steps``; the backward passes of the other micro-steps run
    inside ``no_sync()`` (DDP's gradient all-reduce waits for the last one). Gradients are unscaled
    before clipping; with float16 the ``GradScaler`` skips steps whose gradients overflow. A
    non-finite loss on any rank skips the backward pass and clears the accumulated gradients on
    every rank (the caller counts consecutive bad steps and restarts the accumulation).
    """
    with precision.autocast():
        loss_dict = model(images, targets)
    # Losses are summed in float32 whatever the autocast dtype.
    loss_dict = {k: v.float() for k, v in loss_dict.items()}
    total = sum(loss_dict.values())
    finite = all_ranks_finite(bool(torch.isfinite(total).item()))
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(values, finite=False, stepped=False, bad="loss")
    last_micro = (micro_step + 1) % accumulate_steps == 0
    sync_ctx = no_sync() if (no_sync is not None and not last_micro) else contextlib.nullcontext()
    with sync_ctx:
        scaler.scale(total / accumulate_steps).backward()
    if not last_micro:
        return StepResult(values, finite=True, stepped=False)
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    # float16: the GradScaler skips an overflowing step itself and lowers its scale (routine, not a bad step).
    if not scaler.is_enabled() and not all_ranks_finite(bool(torch.isfinite(norm).item())):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(values, finite=False, stepped=False, bad="gradients")
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(values, finite=True, stepped=True)


def describe_bad_step(iteration: int, losses: Mapping[str, float], image_ids: Iterable[int], bad: str = "loss") -> str:
    """``non-finite <loss|gradients> at iteration N: <loss terms>; image ids in this batch: [...]``."""
    terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
    ids = ", ".join(str(i) for i in image_ids)
    return f"non-finite {bad} at iteration {iteration}: {terms}; image ids in this batch: [{ids}]"


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or inf."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    precision: PrecisionPolicy,
    *,
    on_batch: Callable[[list[torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]], None],
    max_images: int | None = None,
    total_images: int | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run ``model`` in eval mode under ``precision`` over ``loader`` and hand each batch's CPU outputs to ``on_batch``.

    Outputs are float32 whatever the precision (``precision.output_dtype``: the detectors built
    here decode boxes in float32).

    Returns:
        The number of images processed.
    """
    was_training = model.training
    model.eval()
    seen, start, last_report = 0, time.perf_counter(), 0.0
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            if not images:
                continue
            if max_images is not None and seen >= max_images:
                break
            dev_images, _ = to_device(images, None, device)
            with precision.autocast():
                outputs = model(dev_images)
            outputs = [{k: v.detach().to("cpu") for k, v in out.items()} for out in outputs]
            on_batch(images, targets, outputs)
            seen += len(images)
            now = time.perf_counter()
            if log is not None and (now - last_report > 10 or (total_images and seen >= total_images)):
                last_report = now
                rate = seen / max(now - start, 1e-9)
                left = ((total_images or seen) - seen) / rate if rate > 0 else math.nan
                log(f"eval: {seen}/{total_images or '?'} images, {rate:.1f} img/s, eta {left:.0f}s")
    finally:
        model.train(was_training)
        sys.stderr.flush()
    return seen
