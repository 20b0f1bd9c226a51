"""Typed options of the backbone: :class:`BackboneConfig` and :class:`FPNConfig`.

These are plain frozen dataclasses with no torch import, so YAML files and command lines can be
validated before any tensor is allocated. Every default lives here, next to its meaning. Fields
left as ``None`` mean "follow the consumer's convention": :func:`backbone.build_backbone` resolves
them to torchvision's ``resnet_fpn_backbone`` defaults, and ``detection.build_detector`` to the
defaults of the chosen detector (P2-P6 with max-pool for the R-CNNs, P3-P7 for RetinaNet and FCOS).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = ["ARCHITECTURES", "LEVELS", "BackboneConfig", "FPNConfig", "ResNetSpec"]

#: Names of the body's outputs, in order; the digit is the stage level (log2 of the stride without dilation).
LEVELS: tuple[str, ...] = ("c2", "c3", "c4", "c5")

NormName = Literal["bn", "frozen_bn", "gn", "sync_bn"]
ExtraName = Literal["none", "maxpool", "p6p7_c5", "p6p7_p5"]


class ResNetSpec(NamedTuple):
    """How one named ResNet variant is built (the numbers of torchvision's model builders)."""

    block: Literal["basic", "bottleneck"]
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


ARCHITECTURES: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2)),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3)),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetSpec("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetSpec("bottleneck", (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetSpec("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": ResNetSpec("bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": ResNetSpec("bottleneck", (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetSpec("bottleneck", (3, 4, 23, 3), width_per_group=128),
}


def _suggest(value: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_levels(field_name: str, levels: tuple[str, ...], allow_empty: bool) -> None:
    if isinstance(levels, str):
        raise TypeError(f"{field_name} must be a list of level names such as ['c3', 'c4', 'c5'], got the string {levels!r}")
    if not levels and not allow_empty:
        raise ValueError(f"{field_name} must name at least one of {list(LEVELS)}, got an empty list")
    unknown = [n for n in levels if n not in LEVELS]
    if unknown:
        raise ValueError(
            f"{field_name} has unknown level(s) {unknown}; the ResNet body produces {list(LEVELS)}."
            + _suggest(str(unknown[0]), LEVELS)
        )
    if len(set(levels)) != len(levels) or list(levels) != sorted(levels, key=LEVELS.index):
        raise ValueError(f"{field_name} must list distinct levels in increasing order, got {list(levels)}")


@dataclass(frozen=True, kw_only=True)
class FPNConfig:
    """Options of the feature pyramid on top of the ResNet body.

    Attributes:
        enabled: build the FPN. Without it the backbone returns the body's ``c*`` maps.
        out_channels: width of every pyramid level (torchvision and detectron2 use 256).
        extra: extra top levels. ``"maxpool"`` adds P6 by stride-2 subsampling of P5 (the R-CNN
            default), ``"p6p7_c5"`` / ``"p6p7_p5"`` add conv P6 and P7 computed from C5 or from P5
            (RetinaNet / FCOS), ``"none"`` adds nothing. ``None`` follows the consumer's default.
        norm: normalisation inside the FPN convs: ``"none"`` (torchvision's v1 models), ``"bn"``
            (the v2 models) or ``"gn"`` (32 groups). ``None`` follows the consumer's default
            (``"none"``, or ``"bn"`` for the R-CNN v2 detectors).
    """

    enabled: bool = True
    out_channels: int = 256
    extra: ExtraName | None = None
    norm: Literal["none", "bn", "gn"] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.out_channels <= 0:
            raise ValueError(f"fpn.out_channels must be a positive integer, got {self.out_channels}")
        if self.norm == "gn" and self.out_channels % 32:
            raise ValueError(
                f"fpn.norm='gn' uses 32 groups, so fpn.out_channels must be a multiple of 32; got {self.out_channels}"
            )


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Options of :func:`backbone.build_backbone`.

    Attributes:
        name: one of :data:`ARCHITECTURES` (``resnet18`` ... ``wide_resnet101_2``).
        weights: ``None`` (random init), a local file holding a torchvision ImageNet state dict
            (``fc.*`` is dropped), or a torchvision weights name such as ``"IMAGENET1K_V1"``,
            ``"DEFAULT"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``.
        norm: ``bn``, ``frozen_bn``, ``gn`` or ``sync_bn``. ``None`` follows torchvision: frozen BN
            when ``weights`` are loaded, trainable BN otherwise.
        gn_groups: number of groups when ``norm == "gn"``.
        trainable_stages: 0-5 with torchvision's meaning, counted from C5 down (5 also trains the
            stem). ``None`` gives 3 with ``weights`` and 5 without, as torchvision's detectors do.
        norm_eval: keep BN statistics frozen (BN layers stay in eval mode) while their affine
            parameters still train.
        out_features: body levels to return (and to feed the FPN); ``None`` means ``c2..c5``, or
            the detector's default. Stages after the last one named are not built.
        style: ``"pytorch"`` puts the stride in the 3x3 conv of bottleneck blocks (ResNet v1.5,
            torchvision); ``"caffe"`` puts it in the first 1x1 (detectron2's MSRA weights).
        output_stride: 32 (plain), 16 (C5 dilated) or 8 (C4 and C5 dilated).
        zero_init_residual: zero the last norm's scale in each residual branch.
        checkpoint_stages: levels whose blocks use activation checkpointing, for example
            ``("c2", "c3")``; outputs and gradients are unchanged, peak training memory drops.
        base_channels: width of the stem and first stage (each later stage doubles it). 64 is the
            standard ResNet and the only width pretrained weights exist for; 32 halves every width
            (about a quarter of the compute), for training from scratch on small images and CPUs.
        fpn: the pyramid options (:class:`FPNConfig`).
    """

    name: str = "resnet50"
    weights: str | None = None
    norm: NormName | None = None
    gn_groups: int = 32
    trainable_stages: int | None = None
    norm_eval: bool = False
    out_features: tuple[str, ...] | None = None
    style: Literal["pytorch", "caffe"] = "pytorch"
    output_stride: Literal[8, 16, 32] = 32
    zero_init_residual: bool = False
    checkpoint_stages: tuple[str, ...] = ()
    base_channels: int = 64
    fpn: FPNConfig = field(default_factory=FPNConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ValueError(
                f"unknown backbone name {self.name!r}; choose one of {list(ARCHITECTURES)}." + _suggest(self.name, list(ARCHITECTURES))
            )
        if self.norm is not None and self.norm not in ("bn", "frozen_bn", "gn", "sync_bn"):
            raise ValueError(f"norm must be one of bn, frozen_bn, gn, sync_bn (or None for the default); got {self.norm!r}")
        if self.gn_groups <= 0:
            raise ValueError(f"gn_groups must be positive, got {self.gn_groups}")
        if not isinstance(self.base_channels, int) or self.base_channels < 1:
            raise ValueError(f"base_channels must be a positive channel count (64 for standard ResNets); got {self.base_channels!r}")
        if self.weights and self.base_channels != 64:
            raise ValueError(
                f"weights={self.weights!r} are for the standard width, but base_channels={self.base_channels}; "
                "pretrained ResNets all have base_channels=64: drop weights or base_channels"
            )
        if self.trainable_stages is not None and not 0 <= self.trainable_stages <= 5:
            raise ValueError(
                f"trainable_stages must be in 0..5 (0 freezes everything, 5 trains the stem too); got {self.trainable_stages}"
            )
        if self.out_features is not None:
            _check_levels("out_features", tuple(self.out_features), allow_empty=False)
        _check_levels("checkpoint_stages", tuple(self.checkpoint_stages), allow_empty=True)
        if self.style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {self.style!r}")
        if self.style == "caffe" and ARCHITECTURES[self.name].block == "basic":
            raise ValueError(
                f"style='caffe' moves the stride into the first 1x1 conv of bottleneck blocks, but {self.name} is built "
                "from basic blocks, which have no 1x1 conv; use style='pytorch' (the two are identical for basic blocks)"
            )
        if self.output_stride not in (8, 16, 32):
            raise ValueError(
                f"output_stride must be 32 (no dilation), 16 (dilated C5) or 8 (dilated C4 and C5); got {self.output_stride}"
            )
        if not isinstance(self.fpn, FPNConfig):
            raise TypeError(f"fpn must be an FPNConfig, got {type(self.fpn).__name__}")
        levels = self.resolved_out_features()
        if self.fpn.enabled and self.fpn.extra == "p6p7_c5" and levels[-1] != "c5":
            raise ValueError(f"fpn.extra='p6p7_c5' computes P6 from C5, so out_features must end with 'c5'; got {list(levels)}")

    def resolved_out_features(self) -> tuple[str, ...]:
        """``out_features`` with ``None`` replaced by the full ``c2..c5``."""
        return LEVELS if self.out_features is None else tuple(self.out_features)

    def resolved_norm(self) -> str:
        """The norm actually used: frozen BN with pretrained weights, trainable BN otherwise (torchvision's rule)."""
        if self.norm is not None:
            return self.norm
        return "frozen_bn" if self.weights else "bn"

    def resolved_trainable_stages(self) -> int:
        """Trainable stages actually used: 3 with pretrained weights, 5 without (torchvision's rule)."""
        if self.trainable_stages is not None:
            return self.trainable_stages
        return 3 if self.weights else 5
