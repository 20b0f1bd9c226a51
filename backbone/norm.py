"""The one place that knows how each norm layer is made and how BN statistics are frozen."""

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from .config import NORMS

__all__ = ["BN_TYPES", "NORM_LAYERS", "FrozenBatchNorm2d", "freeze_bn_stats", "make_norm", "norm_kind"]


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


#: The layer class of each name in :data:`backbone.config.NORMS` (``gn`` is made with its group count).
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "gn": nn.GroupNorm,
    "sync_bn": nn.SyncBatchNorm,
}

#: Norm layers whose statistics can be updated by training (what `norm_eval` and freezing switch off).
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.SyncBatchNorm)


def make_norm(kind: str, *, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """Return a factory ``channels -> norm module`` for ``kind``: one of :data:`~backbone.config.NORMS`, or ``"none"``.

    ``gn`` uses ``gn_groups`` groups; a channel count that ``gn_groups`` does not divide raises a
    ``ValueError`` when the layer is made, naming both numbers.
    """
    if kind == "none":
        return lambda channels: nn.Identity()
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)} (or 'none')")
    if kind == "gn":

        def group_norm(channels: int) -> nn.Module:
            if channels % gn_groups:
                raise ValueError(
                    f"GroupNorm with {gn_groups} groups cannot normalise {channels} channels; "
                    "choose gn_groups that divides every stage width (32 works for all ResNets)"
                )
            return nn.GroupNorm(gn_groups, channels)

        return group_norm
    return NORM_LAYERS[kind]


def norm_kind(module: nn.Module) -> str | None:
    """Short name of a norm module (a :data:`~backbone.config.NORMS` entry), or ``None`` if it is not one."""
    if isinstance(module, _TorchvisionFrozenBN):  # also torchvision's own class, which detector heads may use
        return "frozen_bn"
    return next((kind for kind, cls in NORM_LAYERS.items() if isinstance(module, cls)), None)


def freeze_bn_stats(module: nn.Module) -> None:
    """Put every trainable-statistics BN layer under ``module`` in eval mode (statistics stop updating)."""
    for m in module.modules():
        if isinstance(m, BN_TYPES):
            m.eval()
