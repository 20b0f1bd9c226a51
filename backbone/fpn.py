"""Feature pyramid network with declared outputs (``p2``..``p7``): torchvision's, with our level names.

:class:`FPN` is a :class:`torchvision.ops.FeaturePyramidNetwork` with torchvision's extra blocks, so
module and parameter names are torchvision's (``inner_blocks.{i}.0``, ``layer_blocks.{i}.0``,
``extra_blocks.p6`` / ``extra_blocks.p7``) and the ``backbone.fpn.*`` part of a torchvision detector
checkpoint loads unchanged, including checkpoints saved before torchvision wrapped each conv in a
``Sequential`` (torchvision's own ``_load_from_state_dict`` renames their ``inner_blocks.{i}.weight``).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .config import DEFAULT_FPN_EXTRA, DEFAULT_FPN_NORM, FPN_EXTRA_LEVELS, FPN_EXTRAS, FPN_NORMS, check_choice
from .features import FeatureInfo, FeatureSpec, ShapeSpec
from .norm import make_norm

__all__ = ["FPN"]

def _level(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    if not digits:
        raise ValueError(f"feature name {name!r} carries no level digit (expected names like 'c3')")
    return int(digits)


def _extra_block(extra: str, top: FeatureSpec, out_channels: int) -> ExtraFPNBlock | None:
    if extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "none":
        return None
    from_p5 = extra == "p6p7_p5"
    if not from_p5 and top.name != "c5":
        raise ValueError(f"extra='p6p7_c5' needs 'c5' as the top input, got {top.name!r}")
    block = LastLevelP6P7(out_channels if from_p5 else top.channels, out_channels)
    # torchvision infers use_P5 from in_channels == out_channels, which is wrong for P6 from C5 when C5
    # is as wide as the FPN (a half-width ResNet-18 has a 256-channel C5): say which input is meant.
    block.use_P5 = from_p5
    return block


class FPN(FeaturePyramidNetwork):
    """Top-down feature pyramid over named input levels (torchvision's, outputs named ``pK``).

    Each input level ``cK`` gets a 1x1 lateral conv; the coarser merged map is upsampled (nearest) to
    the lateral's exact size and added, so any input size works; a 3x3 conv then gives ``pK``.
    Initialisation is torchvision's (``kaiming_uniform_(a=1)``, zero bias).

    Args:
        in_feature_info: the inputs, e.g. ``body.feature_info`` (names ``c2``..``c5``).
        out_channels: width of every output level.
        extra: one of :data:`~backbone.config.FPN_EXTRAS`: ``"none"``, ``"maxpool"`` (P6 by
            subsampling P5, torchvision's ``LastLevelMaxPool``), ``"p6p7_c5"`` or ``"p6p7_p5"``
            (torchvision's ``LastLevelP6P7`` on C5 or P5).
        norm: one of :data:`~backbone.config.FPN_NORMS`, after each FPN conv (convs then have no bias).

    Input: a mapping with at least the names of ``in_feature_info`` (extra keys are ignored).
    Output: ``OrderedDict`` ``pK`` -> ``[N, out_channels, H_K, W_K]`` in ``feature_info`` order.

    Example:
        >>> fpn = FPN(FeatureInfo([("c4", 1024, 16), ("c5", 2048, 32)]), 256, extra="maxpool")
        >>> fpn.feature_info.names()
        ('p4', 'p5', 'p6')
    """

    def __init__(
        self,
        in_feature_info: FeatureInfo,
        out_channels: int = 256,
        *,
        extra: str = DEFAULT_FPN_EXTRA,
        norm: str = DEFAULT_FPN_NORM,
    ) -> None:
        check_choice("extra", extra, FPN_EXTRAS)
        check_choice("norm", norm, FPN_NORMS)
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        if len(in_feature_info) == 0:
            raise ValueError("the FPN needs at least one input level")
        super().__init__(
            [s.channels for s in in_feature_info],
            out_channels,
            norm_layer=None if norm == "none" else make_norm(norm),
        )
        top = in_feature_info[-1]
        self.extra_blocks = _extra_block(extra, top, out_channels)
        specs = [FeatureSpec(f"p{_level(s.name)}", out_channels, s.stride) for s in in_feature_info]
        specs += [
            FeatureSpec(f"p{_level(top.name) + k}", out_channels, top.stride * 2**k)
            for k in range(1, FPN_EXTRA_LEVELS[extra] + 1)
        ]
        self.in_feature_info = in_feature_info
        self.extra = extra
        self.out_channels = out_channels
        #: Outputs of this module, in order: (name, channels, stride).
        self.feature_info = FeatureInfo(specs)
        # Plain lists for forward (which TorchScript compiles; it cannot read FeatureInfo).
        self.in_names: list[str] = list(in_feature_info.names())
        self.in_channels_list: list[int] = list(in_feature_info.channels())
        self.out_names: list[str] = list(self.feature_info.names())

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        c: list[Tensor] = []
        for name, channels in zip(self.in_names, self.in_channels_list):
            if name not in x:
                raise KeyError(f"FPN input lacks '{name}'; it received {list(x.keys())}")
            t = x[name]
            # torch._assert rather than `if ...: raise`, so that FX tracing records the checks.
            message = f"FPN input '{name}' should be [N, {channels}, H, W] as declared when the FPN was built"
            torch._assert(t.dim() == 4, message)
            torch._assert(t.shape[1] == channels, message)
            c.append(t)
        # torchvision's top-down pass, written out because TorchScript cannot call it through super();
        # it is unchanged apart from taking the declared inputs and naming the outputs pK.
        last = self.get_result_from_inner_blocks(c[-1], -1)
        results = [self.get_result_from_layer_blocks(last, -1)]
        for idx in range(len(c) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(c[idx], idx)
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.get_result_from_layer_blocks(last, idx))
        if self.extra_blocks is not None:
            results, _ = self.extra_blocks(results, c, list(self.in_names))
        return OrderedDict([(k, v) for k, v in zip(self.out_names, results)])
