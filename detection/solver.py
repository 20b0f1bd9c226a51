"""Optimizer and learning-rate schedule from the ``train.optimizer`` / ``train.schedule`` config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_scheduler", "fit_schedule", "lr_factor"]

# Devices where torch.optim.AdamW(fused=True) has kernels.
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters.

    With ``no_decay_norm_and_bias`` the norm layers' parameters and all biases get no weight decay
    (two parameter groups); otherwise one group with ``weight_decay``. AdamW uses the fused update
    when ``cfg.fused`` is set and every parameter is on a device that has it.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if cfg.no_decay_norm_and_bias and (isinstance(module, _NORM_TYPES) or name == "bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every stage frozen?); nothing to optimise")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    params = decay + no_decay
    fused = cfg.fused and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=fused or None)


def lr_factor(iteration: int, cfg: ScheduleConfig, max_iters: int, iters_per_epoch: int) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based): linear warm-up times the main schedule.

    Milestones are in iterations, or in epochs when ``unit == "epoch"`` (converted with
    ``iters_per_epoch``). Cosine decays from 1 to ``min_lr_factor`` over ``max_iters``.
    """
    scale = iters_per_epoch if cfg.unit == "epoch" else 1
    if cfg.name == "multistep":
        main = cfg.gamma ** sum(iteration >= m * scale for m in cfg.milestones)
    elif cfg.name == "cosine":
        progress = min(iteration / max(max_iters, 1), 1.0)
        main = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        main = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        main *= cfg.warmup_factor * (1 - alpha) + alpha
    return main


def fit_schedule(cfg: ScheduleConfig, max_iters: int, iters_per_epoch: int) -> tuple[ScheduleConfig, str | None]:
    """``cfg`` fitted into ``max_iters``, and a warning line when it had to change (else ``None``).

    A warm-up of ``max_iters`` or more is cut to a tenth of ``max_iters``. When a milestone lies at or
    beyond ``max_iters``, all milestones are scaled by ``max_iters / (9/8 x last milestone)``, keeping
    their ratios (the 1x recipe's 60k and 80k of 90k iterations), and expressed in iterations.
    """
    scale = iters_per_epoch if cfg.unit == "epoch" else 1
    milestones = [m * scale for m in cfg.milestones]
    changes, new = [], cfg
    if cfg.warmup_iters >= max_iters:
        new = dataclasses.replace(new, warmup_iters=max_iters // 10)
        changes.append(f"warmup_iters {cfg.warmup_iters} -> {new.warmup_iters}")
    if cfg.name == "multistep" and milestones and milestones[-1] >= max_iters:
        factor = max_iters / (milestones[-1] * 9 / 8)
        fitted = tuple(sorted({max(1, int(m * factor)) for m in milestones}))
        new = dataclasses.replace(new, milestones=fitted, unit="iter")
        changes.append(f"milestones {list(cfg.milestones)} ({cfg.unit}) -> {list(fitted)} (iter)")
    if not changes:
        return cfg, None
    return new, (f"warning: train.schedule does not fit in {max_iters} iterations; scaled to fit: "
                 + "; ".join(changes))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_iters: int | Callable[[], int], iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state (the iteration count) goes into checkpoints.

    ``max_iters`` may be a function giving the current training length (planned from a time budget).
    """
    length = max_iters if callable(max_iters) else (lambda: max_iters)
    # One LambdaLR instead of torch's LinearLR + MultiStepLR / CosineAnnealingLR: SequentialLR starts the
    # schedule after the warm-up and ChainedScheduler's recursive cosine drifts, where this is warm-up x
    # schedule at every iteration; and existing checkpoints hold this scheduler's state.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg, length(), iters_per_epoch)
    )
