"""Feature pyramid network with declared outputs (``p2``..``p7``).

The module and parameter names are torchvision's (``inner_blocks.{i}.0``, ``layer_blocks.{i}.0``,
``extra_blocks.p6`` / ``extra_blocks.p7``), so the ``backbone.fpn.*`` part of a torchvision detector
checkpoint loads unchanged, including checkpoints saved before torchvision wrapped each conv in a
``Sequential`` (their ``inner_blocks.{i}.weight`` keys are renamed on load).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureInfo, FeatureSpec, ShapeSpec
from .norm import make_norm

__all__ = ["FPN"]

EXTRA_CHOICES = ("none", "maxpool", "p6p7_c5", "p6p7_p5")


def _level(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    if not digits:
        raise ValueError(f"feature name {name!r} carries no level digit (expected names like 'c3')")
    return int(digits)


def _conv_norm(in_ch: int, out_ch: int, kernel: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=norm == "none")]
    if norm != "none":
        layers.append(make_norm(norm)(out_ch))
    return nn.Sequential(*layers)


class MaxPoolP6(nn.Module):
    """P6 as a stride-2 subsampling of the top pyramid level (the R-CNN extra level; no parameters)."""

    def forward(self, p: list[Tensor], c: list[Tensor]) -> list[Tensor]:
        return [F.max_pool2d(p[-1], kernel_size=1, stride=2, padding=0)]


class ConvP6P7(nn.Module):
    """P6 = 3x3/2 conv of C5 or P5, P7 = 3x3/2 conv of ReLU(P6) (RetinaNet / FCOS)."""

    def __init__(self, in_channels: int, out_channels: int, *, from_p5: bool) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.constant_(m.bias, 0)
        self.from_p5 = from_p5

    def forward(self, p: list[Tensor], c: list[Tensor]) -> list[Tensor]:
        p6 = self.p6(p[-1] if self.from_p5 else c[-1])
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down feature pyramid over named input levels.

    Each input level ``cK`` gets a 1x1 lateral conv; the coarser merged map is upsampled (nearest) to
    the lateral's exact size and added, so any input size works; a 3x3 conv then gives ``pK``.

    Args:
        in_feature_info: the inputs, e.g. ``body.feature_info`` (names ``c2``..``c5``).
        out_channels: width of every output level.
        extra: ``"none"``, ``"maxpool"`` (P6 by subsampling P5), ``"p6p7_c5"`` or ``"p6p7_p5"``.
        norm: ``"none"``, ``"bn"`` or ``"gn"`` after each FPN conv (convs then have no bias).

    Input: a mapping with at least the names of ``in_feature_info`` (extra keys are ignored).
    Output: ``OrderedDict`` ``pK`` -> ``[N, out_channels, H_K, W_K]`` in ``feature_info`` order.

    Example:
        >>> fpn = FPN(FeatureInfo([("c4", 1024, 16), ("c5", 2048, 32)]), 256, extra="maxpool")
        >>> fpn.feature_info.names()
        ('p4', 'p5', 'p6')
    """

    _version = 2

    def __init__(
        self,
        in_feature_info: FeatureInfo,
        out_channels: int = 256,
        *,
        extra: str = "maxpool",
        norm: str = "none",
    ) -> None:
        super().__init__()
        if extra not in EXTRA_CHOICES:
            raise ValueError(f"extra must be one of {list(EXTRA_CHOICES)}, got {extra!r}")
        if norm not in ("none", "bn", "gn"):
            raise ValueError(f"norm must be 'none', 'bn' or 'gn', got {norm!r}")
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        if len(in_feature_info) == 0:
            raise ValueError("the FPN needs at least one input level")
        self.in_feature_info = in_feature_info
        self.inner_blocks = nn.ModuleList(_conv_norm(s.channels, out_channels, 1, norm) for s in in_feature_info)
        self.layer_blocks = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, norm) for _ in in_feature_info)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        specs = [FeatureSpec(f"p{_level(s.name)}", out_channels, s.stride) for s in in_feature_info]
        top_level, top_stride = _level(in_feature_info[-1].name), in_feature_info[-1].stride
        self.extra_blocks: nn.Module | None
        if extra == "maxpool":
            self.extra_blocks = MaxPoolP6()
            specs.append(FeatureSpec(f"p{top_level + 1}", out_channels, top_stride * 2))
        elif extra in ("p6p7_c5", "p6p7_p5"):
            from_p5 = extra == "p6p7_p5"
            if not from_p5 and in_feature_info[-1].name != "c5":
                raise ValueError(f"extra='p6p7_c5' needs 'c5' as the top input, got {in_feature_info[-1].name!r}")
            in_ch = out_channels if from_p5 else in_feature_info[-1].channels
            self.extra_blocks = ConvP6P7(in_ch, out_channels, from_p5=from_p5)
            specs.append(FeatureSpec(f"p{top_level + 1}", out_channels, top_stride * 2))
            specs.append(FeatureSpec(f"p{top_level + 2}", out_channels, top_stride * 4))
        else:
            self.extra_blocks = None
        self.extra = extra
        self.out_channels = out_channels
        #: Outputs of this module, in order: (name, channels, stride).
        self.feature_info = FeatureInfo(specs)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        missing = [n for n in self.in_feature_info.names() if n not in features]
        if missing:
            raise KeyError(f"FPN input lacks {missing}; it received {list(features)}")
        c = [features[n] for n in self.in_feature_info.names()]
        for spec, t in zip(self.in_feature_info, c):
            if t.dim() != 4 or t.shape[1] != spec.channels:
                raise ValueError(
                    f"FPN input {spec.name!r} should be [N, {spec.channels}, H, W] as declared when the FPN was built, "
                    f"got shape {list(t.shape)}"
                )
        last = self.inner_blocks[-1](c[-1])
        results = [self.layer_blocks[-1](last)]
        for idx in range(len(c) - 2, -1, -1):
            lateral = self.inner_blocks[idx](c[idx])
            top_down = F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last))
        if self.extra_blocks is not None:
            results.extend(self.extra_blocks(results, c))
        return OrderedDict(zip(self.feature_info.names(), results))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchvision < 0.13 stored each FPN conv directly (``inner_blocks.0.weight``); since then it is
        # wrapped in a Sequential (``inner_blocks.0.0.weight``). Published COCO checkpoints use the old
        # layout, so rename it here, as torchvision's own FPN does.
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for kind in ("weight", "bias"):
                    old, new = f"{prefix}{block}.{i}.{kind}", f"{prefix}{block}.{i}.0.{kind}"
                    if old in state_dict and new not in state_dict:
                        state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
