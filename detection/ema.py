"""An exponential moving average (EMA) of a model's weights, for evaluation at the end of training.

:class:`ModelEma` keeps an averaged copy of the detector through
:class:`torch.optim.swa_utils.AveragedModel` and adds the decay warm-up of mmdet's ``ExpMomentumEMA``
(YOLOX): early updates weigh the current weights heavily, so the average does not drag the random
initialisation along::

    decay_n = decay * (1 - exp(-n / warmup_steps))      n: updates made before this one

The first update (``n = 0``) copies the weights; ``warmup_steps = 0`` uses ``decay`` from the second
one on. :class:`detection.loop.TrainState` calls :meth:`ModelEma.update` after each optimizer step
that changed the weights and stores :meth:`ModelEma.state_dict` in every checkpoint.

Example:
    >>> ema = ModelEma(model, decay=0.9998, warmup_steps=2000)  # doctest: +SKIP
    >>> optimizer.step(); ema.update(model)                      # doctest: +SKIP
    >>> ema.module.eval()(images)                                # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ModelEma", "ema_decay"]


def ema_decay(decay: float, warmup_steps: int, updates: int) -> float:
    """The weight of the old average in the update that follows ``updates`` earlier ones.

    ``0`` for the first update (a copy); ``decay * (1 - exp(-updates / warmup_steps))`` during the
    warm-up, which tends to ``decay``; ``decay`` itself when ``warmup_steps`` is 0.
    """
    if updates <= 0:
        return 0.0
    if warmup_steps == 0:
        return decay
    return decay * (1.0 - math.exp(-updates / warmup_steps))


class ModelEma:
    """An exponential moving average of ``model``'s weights, held in a copy of it.

    Follows timm's ``ModelEmaV3``: every floating-point entry of the state dict (the parameters and
    the float buffers, so BatchNorm's running mean and variance too) is averaged with the same
    decay, and integer buffers (BatchNorm's ``num_batches_tracked``) are copied from the model.

    Args:
        model: the model being trained, unwrapped (not its ``DistributedDataParallel`` wrapper); the
            copy is made on its device and in its memory format (channels-last stays channels-last).
        decay: the weight of the old average once the warm-up is over, in (0, 1) (``train.ema.decay``).
        warmup_steps: time constant of the decay warm-up in updates (see :func:`ema_decay`); 0 for none
            (``train.ema.warmup_steps``).

    Attributes:
        module: the averaged detector, in eval mode, without gradients; evaluate it like the model.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup_steps: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1); got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0; got {warmup_steps}")
        self.decay, self.warmup_steps = decay, warmup_steps
        self._averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.module.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self._averaged.module

    @property
    def updates(self) -> int:
        """Number of updates made so far."""
        return int(self._averaged.n_averaged)

    def describe(self) -> str:
        """One phrase for the log, e.g. ``weight EMA (decay 0.9998, warm-up 2000 steps)``."""
        return f"weight EMA (decay {self.decay:g}, warm-up {self.warmup_steps} steps)"

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        return ema_decay(self.decay, self.warmup_steps, self.updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after an optimizer step)."""
        self._averaged.update_parameters(model)

    def _average(self, averaged: list[Tensor], current: list[Tensor], updates: Tensor | int) -> None:
        # AveragedModel hands the tensors over grouped by device and dtype, after copying on the first update.
        if averaged[0].is_floating_point():
            get_ema_multi_avg_fn(ema_decay(self.decay, self.warmup_steps, int(updates)))(averaged, current, updates)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        """``{"model": the averaged weights (the detector's own keys), "updates": int}``."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the weights strictly, and the update count)."""
        self.module.load_state_dict(state["model"])
        self._averaged.n_averaged.fill_(int(state["updates"]))

    def reset(self, model: nn.Module) -> None:
        """Start again from ``model``'s weights, with no update made."""
        self.module.load_state_dict(model.state_dict())
        self._averaged.n_averaged.zero_()
