"""The one place that knows how each norm layer is made and how BN statistics are frozen."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

__all__ = ["BN_TYPES", "FrozenBatchNorm2d", "freeze_bn_stats", "make_norm", "norm_kind"]


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """BatchNorm with fixed statistics and affine parameters (torchvision's, keys and all).

    It subclasses torchvision's class, so ``isinstance`` checks and state-dict keys are unchanged
    (``num_batches_tracked`` in a checkpoint is ignored). The difference: under autocast the scale
    and shift are cast to the input's dtype, so a bf16/fp16 activation stays bf16/fp16 instead of
    being promoted to float32 by the float32 buffers, which would double the memory traffic of
    every frozen BN layer and cast back before each following conv.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)


#: Norm layers whose statistics can be updated by training (what `norm_eval` and freezing switch off).
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.SyncBatchNorm)


def make_norm(kind: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """Return a factory ``channels -> norm module`` for ``kind`` in ``bn | frozen_bn | gn | sync_bn | none``.

    ``gn`` uses ``gn_groups`` groups; a channel count that ``gn_groups`` does not divide raises a
    ``ValueError`` when the layer is made, naming both numbers.
    """
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "sync_bn":
        return nn.SyncBatchNorm
    if kind == "gn":

        def group_norm(channels: int) -> nn.Module:
            if channels % gn_groups:
                raise ValueError(
                    f"GroupNorm with {gn_groups} groups cannot normalise {channels} channels; "
                    "choose gn_groups that divides every stage width (32 works for all ResNets)"
                )
            return nn.GroupNorm(gn_groups, channels)

        return group_norm
    if kind == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of bn, frozen_bn, gn, sync_bn")


def norm_kind(module: nn.Module) -> str | None:
    """Short name of a norm module (``bn``, ``frozen_bn``, ``gn``, ``sync_bn``), or ``None`` if it is not one."""
    if isinstance(module, _TorchvisionFrozenBN):
        return "frozen_bn"
    if isinstance(module, nn.SyncBatchNorm):
        return "sync_bn"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, nn.GroupNorm):
        return "gn"
    return None


def freeze_bn_stats(module: nn.Module) -> None:
    """Put every trainable-statistics BN layer under ``module`` in eval mode (statistics stop updating)."""
    for m in module.modules():
        if isinstance(m, BN_TYPES):
            m.eval()
