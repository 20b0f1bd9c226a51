"""Typed options of the backbone: :class:`BackboneConfig` and :class:`FPNConfig`.

These are plain frozen dataclasses with no torch import, so YAML files and command lines can be
validated before any tensor is allocated. Every default lives here, next to its meaning. Fields
left as ``None`` mean "follow the consumer's convention": :func:`backbone.build_backbone` resolves
them to torchvision's ``resnet_fpn_backbone`` defaults, and ``detection.build_detector`` to the
defaults of the chosen detector (P2-P6 with max-pool for the R-CNNs, P3-P7 for RetinaNet and FCOS).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

__all__ = [
    "FPN_EXTRA_LEVELS",
    "ARCHITECTURES",
    "BLOCKS",
    "DEFAULT_FPN_EXTRA",
    "DEFAULT_FPN_NORM",
    "FPN_EXTRAS",
    "FPN_NORMS",
    "LEVELS",
    "NORMS",
    "OUTPUT_STRIDES",
    "STYLES",
    "BackboneConfig",
    "FPNConfig",
    "ResNetSpec",
    "check_choice",
    "check_dcn_stages",
    "check_levels",
    "check_trainable_stages",
]

#: Names of the body's outputs, in order; the digit is the stage level (log2 of the stride without dilation).
LEVELS: tuple[str, ...] = ("c2", "c3", "c4", "c5")

# Each vocabulary is declared once, as a Literal (which the config loader checks values against); the
# tuples below are read from it, and every module that needs the names uses those tuples.
NormName = Literal["bn", "frozen_bn", "gn", "sync_bn"]
FPNNormName = Literal["none", "bn", "gn"]
ExtraName = Literal["none", "maxpool", "p6p7_c5", "p6p7_p5"]
BlockName = Literal["basic", "bottleneck"]
StyleName = Literal["pytorch", "caffe"]
OutputStride = Literal[8, 16, 32]

NORMS: tuple[str, ...] = get_args(NormName)
FPN_NORMS: tuple[str, ...] = get_args(FPNNormName)
FPN_EXTRAS: tuple[str, ...] = get_args(ExtraName)
#: Pyramid levels each extra adds above the top input level (P6, or P6 and P7).
FPN_EXTRA_LEVELS: dict[str, int] = {"none": 0, "maxpool": 1, "p6p7_c5": 2, "p6p7_p5": 2}
BLOCKS: tuple[str, ...] = get_args(BlockName)
STYLES: tuple[str, ...] = get_args(StyleName)
OUTPUT_STRIDES: tuple[int, ...] = get_args(OutputStride)

#: What ``fpn.extra: null`` and ``fpn.norm: null`` mean for :func:`backbone.build_backbone`
#: (torchvision's ``resnet_fpn_backbone``: a max-pool P6, no norm in the FPN).
DEFAULT_FPN_EXTRA: str = "maxpool"
DEFAULT_FPN_NORM: str = "none"

#: Stages ``trainable_stages`` counts: the stem and one per level.
MAX_TRAINABLE_STAGES = len(LEVELS) + 1


class ResNetSpec(NamedTuple):
    """How one named ResNet variant is built (the numbers of torchvision's model builders)."""

    block: BlockName
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


def check_choice(field_name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise ``ValueError`` naming ``field_name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        hint = _suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(f"{field_name} must be one of {list(choices)}, got {value!r}" + hint)


def check_trainable_stages(value: int) -> None:
    """The one range check of ``trainable_stages`` (torchvision's ``trainable_layers``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TRAINABLE_STAGES:
        raise ValueError(
            f"trainable_stages must be in 0..{MAX_TRAINABLE_STAGES} (0 freezes everything, "
            f"{MAX_TRAINABLE_STAGES} trains the stem too); got {value}"
        )


def check_levels(field_name: str, levels: tuple[str, ...], allow_empty: bool) -> None:
    """Raise unless ``levels`` names distinct :data:`LEVELS` in increasing order."""
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


def check_dcn_stages(dcn_stages: tuple[str, ...], out_features: tuple[str, ...], block: str, name: str = "") -> None:
    """Raise unless ``dcn_stages`` names built levels of a bottleneck body (``name`` is the architecture, for messages)."""
    check_levels("dcn_stages", dcn_stages, allow_empty=True)
    if dcn_stages and block != "bottleneck":
        raise ValueError(
            f"dcn_stages={list(dcn_stages)}: deformable convs replace the 3x3 conv of bottleneck blocks, but "
            f"{name or 'this body'} is built from basic blocks; use a bottleneck ResNet (resnet50 and up, resnext*, "
            "wide_resnet*) or set dcn_stages: []"
        )
    unbuilt = [n for n in dcn_stages if out_features and LEVELS.index(n) > LEVELS.index(out_features[-1])]
    if unbuilt:
        raise ValueError(
            f"dcn_stages names {unbuilt}, but out_features {list(out_features)} ends at {out_features[-1]!r}, so those "
            "stages are not built; drop them from dcn_stages or extend out_features"
        )


def _doc(text: str) -> dict[str, str]:
    """Field metadata holding its description (what ``print_config --reference`` shows)."""
    return {"doc": text}


@dataclass(frozen=True, kw_only=True)
class FPNConfig:
    """Options of the feature pyramid on top of the ResNet body.

    Each field's description is in its metadata (``dataclasses.fields(cls)[i].metadata["doc"]``).
    """

    enabled: bool = field(default=True, metadata=_doc(
        "build the FPN. Without it the backbone returns the body's ``c*`` maps."
    ))
    out_channels: int = field(default=256, metadata=_doc(
        "width of every pyramid level (torchvision and detectron2 use 256)."
    ))
    extra: ExtraName | None = field(default=None, metadata=_doc(
        "extra top levels, one of :data:`FPN_EXTRAS`. ``\"maxpool\"`` adds P6 by stride-2 subsampling of "
        "P5 (the R-CNN default), ``\"p6p7_c5\"`` / ``\"p6p7_p5\"`` add conv P6 and P7 computed from C5 or"
        " from P5 (RetinaNet / FCOS), ``\"none\"`` adds nothing. ``None`` follows the consumer's default "
        "(:data:`DEFAULT_FPN_EXTRA` for ``build_backbone``)."
    ))
    norm: FPNNormName | None = field(default=None, metadata=_doc(
        "normalisation inside the FPN convs, one of :data:`FPN_NORMS`: ``\"none\"`` (torchvision's v1 "
        "models), ``\"bn\"`` (the v2 models) or ``\"gn\"`` (32 groups). ``None`` follows the consumer's "
        "default (:data:`DEFAULT_FPN_NORM`, or ``\"bn\"`` for the R-CNN v2 detectors)."
    ))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.out_channels, bool) or not isinstance(self.out_channels, int) or self.out_channels <= 0:
            raise ValueError(f"fpn.out_channels must be a positive integer, got {self.out_channels}")
        if self.extra is not None:
            check_choice("fpn.extra", self.extra, FPN_EXTRAS)
        if self.norm is not None:
            check_choice("fpn.norm", self.norm, FPN_NORMS)
        if self.norm == "gn" and self.out_channels % 32:
            raise ValueError(
                f"fpn.norm='gn' uses 32 groups, so fpn.out_channels must be a multiple of 32; got {self.out_channels}"
            )

    def resolved_extra(self) -> str:
        """``extra`` with ``None`` replaced by :data:`DEFAULT_FPN_EXTRA`."""
        return DEFAULT_FPN_EXTRA if self.extra is None else self.extra

    def resolved_norm(self) -> str:
        """``norm`` with ``None`` replaced by :data:`DEFAULT_FPN_NORM`."""
        return DEFAULT_FPN_NORM if self.norm is None else self.norm


def _fpn_config(value: bool | Mapping[str, Any] | FPNConfig) -> FPNConfig:
    """An :class:`FPNConfig` from ``True``/``False`` (``enabled``), a mapping of its fields, or itself."""
    if isinstance(value, FPNConfig):
        return value
    if isinstance(value, bool):
        return FPNConfig(enabled=value)
    if isinstance(value, Mapping):
        _check_option_names("fpn", value, _field_names(FPNConfig))
        return FPNConfig(**value)
    raise TypeError(f"fpn must be true/false, a mapping of FPNConfig fields or an FPNConfig, got {type(value).__name__}")


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_option_names(what: str, options: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"unknown {what} option(s) {unknown}{hint}; valid options: {', '.join(valid)}")


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Options of :func:`backbone.build_backbone`.

    Each field's description is in its metadata (``dataclasses.fields(cls)[i].metadata["doc"]``).
    """

    name: str = field(default="resnet50", metadata=_doc(
        "one of :data:`ARCHITECTURES` (``resnet18`` ... ``wide_resnet101_2``)."
    ))
    weights: str | None = field(default=None, metadata=_doc(
        "``None`` (random init), a local file holding a torchvision ImageNet state dict (``fc.*`` is "
        "dropped), or a torchvision weights name such as ``\"IMAGENET1K_V1\"``, ``\"DEFAULT\"`` or "
        "``\"ResNet50_Weights.IMAGENET1K_V2\"``."
    ))
    norm: NormName | None = field(default=None, metadata=_doc(
        "one of :data:`NORMS` (``bn``, ``frozen_bn``, ``gn``, ``sync_bn``). ``None`` follows torchvision:"
        " frozen BN when ``weights`` are loaded, trainable BN otherwise."
    ))
    gn_groups: int = field(default=32, metadata=_doc(
        "number of groups when ``norm == \"gn\"``."
    ))
    trainable_stages: int | None = field(default=None, metadata=_doc(
        "0-5 with torchvision's meaning, counted from C5 down (5 also trains the stem). ``None`` gives 3 "
        "with ``weights`` and 5 without, as torchvision's detectors do. Below 5 without ``weights`` it "
        "still freezes (randomly initialised) stages, with a warning."
    ))
    norm_eval: bool = field(default=False, metadata=_doc(
        "keep BN statistics frozen (BN layers stay in eval mode) while their affine parameters still train."
    ))
    out_features: tuple[str, ...] | None = field(default=None, metadata=_doc(
        "body levels to return (and to feed the FPN); ``None`` means ``c2..c5``, or the detector's "
        "default. Stages after the last one named are not built."
    ))
    style: StyleName = field(default="pytorch", metadata=_doc(
        "``\"pytorch\"`` puts the stride in the 3x3 conv of bottleneck blocks (ResNet v1.5, torchvision);"
        " ``\"caffe\"`` puts it in the first 1x1 (detectron2's MSRA weights)."
    ))
    output_stride: OutputStride = field(default=32, metadata=_doc(
        "32 (plain), 16 (C5 dilated) or 8 (C4 and C5 dilated)."
    ))
    zero_init_residual: bool = field(default=False, metadata=_doc(
        "zero the last norm's scale in each residual branch."
    ))
    checkpoint_stages: tuple[str, ...] = field(default=(), metadata=_doc(
        "levels whose blocks use activation checkpointing, for example ``(\"c2\", \"c3\")``; outputs and "
        "gradients are unchanged, peak training memory drops. Eager mode only: TorchScript-compiled "
        "copies run these stages normally."
    ))
    base_channels: int = field(default=64, metadata=_doc(
        "width of the stem and first stage (each later stage doubles it). 64 is the standard ResNet and "
        "the only width pretrained weights exist for; 32 halves every width (about a quarter of the "
        "compute), for training from scratch on small images and CPUs."
    ))
    dcn_stages: tuple[str, ...] = field(default=(), metadata=_doc(
        "levels whose bottleneck blocks use a modulated deformable 3x3 conv (DCNv2), for example "
        "``(\"c3\", \"c4\", \"c5\")`` as in detectron2's and mmdet's DCN recipes. Bottleneck architectures "
        "only (resnet50 and up, resnext, wide_resnet). The main kernels keep their ``conv2.weight`` keys, so "
        "ImageNet weights load; the new offset convs start at zero (mask 0.5) and are reported as new keys. "
        "Not exportable to ONNX."
    ))
    fpn: FPNConfig = field(default_factory=FPNConfig, metadata=_doc(
        "the pyramid options (:class:`FPNConfig`)."
    ))

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | BackboneConfig | None = None, /, **overrides: Any) -> BackboneConfig:
        """The one converter to a config: a mapping of fields (as read from YAML) or a config, plus overrides.

        ``fpn`` may be ``True``/``False``, a mapping of :class:`FPNConfig` fields or an
        :class:`FPNConfig`; ``out_features``, ``checkpoint_stages`` and ``dcn_stages`` may be lists (or one name).
        Unknown keys raise ``TypeError`` naming the closest valid one.
        """
        if isinstance(mapping, BackboneConfig):
            base: dict[str, Any] = {name: getattr(mapping, name) for name in _field_names(cls)}
        elif isinstance(mapping, Mapping):
            base = dict(mapping)
        elif mapping is None:
            base = {}
        else:
            raise TypeError(f"expected a mapping of BackboneConfig fields or a BackboneConfig, got {type(mapping).__name__}")
        base.update(overrides)
        _check_option_names("backbone", base, _field_names(cls))
        if "fpn" in base:
            base["fpn"] = _fpn_config(base["fpn"])
        for key in ("out_features", "checkpoint_stages", "dcn_stages"):
            value = base.get(key)
            if value is not None:
                base[key] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**base)

    def validate(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ValueError(
                f"unknown backbone name {self.name!r}; choose one of {list(ARCHITECTURES)}." + _suggest(self.name, list(ARCHITECTURES))
            )
        if self.norm is not None:
            check_choice("norm", self.norm, NORMS)
        if self.gn_groups <= 0:
            raise ValueError(f"gn_groups must be positive, got {self.gn_groups}")
        if not isinstance(self.base_channels, int) or self.base_channels < 1:
            raise ValueError(f"base_channels must be a positive channel count (64 for standard ResNets); got {self.base_channels!r}")
        if self.weights and self.base_channels != 64:
            raise ValueError(
                f"weights={self.weights!r} are for the standard width, but base_channels={self.base_channels}; "
                "pretrained ResNets all have base_channels=64: drop weights or base_channels"
            )
        if self.trainable_stages is not None:
            check_trainable_stages(self.trainable_stages)
        if self.out_features is not None:
            check_levels("out_features", tuple(self.out_features), allow_empty=False)
        check_levels("checkpoint_stages", tuple(self.checkpoint_stages), allow_empty=True)
        check_dcn_stages(self.dcn_stages, self.resolved_out_features(), ARCHITECTURES[self.name].block, self.name)
        check_choice("style", self.style, STYLES)
        if self.style == "caffe" and ARCHITECTURES[self.name].block == "basic":
            raise ValueError(
                f"style='caffe' moves the stride into the first 1x1 conv of bottleneck blocks, but {self.name} is built "
                "from basic blocks, which have no 1x1 conv; use style='pytorch' (the two are identical for basic blocks)"
            )
        if self.output_stride not in OUTPUT_STRIDES:
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
        """The norm actually used: frozen BN with pretrained weights, trainable BN otherwise "
        "(torchvision's rule)."""
        if self.norm is not None:
            return self.norm
        return "frozen_bn" if self.weights else "bn"

    def resolved_trainable_stages(self) -> int:
        """Trainable stages actually used: 3 with pretrained weights, all without (torchvision's rule)."""
        if self.trainable_stages is not None:
            return self.trainable_stages
        return 3 if self.weights else MAX_TRAINABLE_STAGES
