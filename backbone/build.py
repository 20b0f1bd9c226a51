"""``build_backbone``: the single translator from options to modules, and ``BackboneWithFPN``."""

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import ARCHITECTURES, LEVELS, MAX_TRAINABLE_STAGES, BackboneConfig
from .features import FeatureInfo, ShapeSpec
from .fpn import FPN
from .norm import make_norm
from .resnet import ResNetBody
from .weights import load_backbone_weights

__all__ = ["BackboneWithFPN", "build_backbone", "load_backbone_weights", "torchvision_level_names"]

#: torchvision's names for the levels an FPN extra block adds (``LastLevelMaxPool``, ``LastLevelP6P7``).
_TORCHVISION_EXTRA_NAMES = {"maxpool": ("pool",), "p6p7_c5": ("p6", "p7"), "p6p7_p5": ("p6", "p7")}


def torchvision_level_names(body: ResNetBody, fpn: FPN | None = None) -> list[str]:
    """torchvision's names for the outputs of ``body`` (+ ``fpn``): ``'0'``, ``'1'``, ... for the levels
    built on body outputs, then the extra block's (``'pool'``, or ``'p6'``, ``'p7'``).

    These are the names torchvision's ``resnet_fpn_backbone`` returns and its detectors' default
    RoI poolers (``featmap_names=['0', '1', '2', '3']``) read.
    """
    numbered = [str(i) for i in range(len(body.feature_info))]
    return numbered + list(_TORCHVISION_EXTRA_NAMES.get(fpn.extra, ())) if fpn is not None else numbered


class BackboneWithFPN(nn.Module):
    """A ResNet body with an optional FPN on top: the module detectors consume.

    State-dict keys are ``body.*`` and ``fpn.*``, exactly as in torchvision's ``BackboneWithFPN``,
    so the ``backbone.*`` part of torchvision detector checkpoints loads unchanged. The module can be
    compiled with ``torch.jit.script``, traced with ``torch.fx`` and exported with ``torch.export``
    or ONNX (activation checkpointing runs in eager mode only).

    Attributes:
        body: the :class:`~backbone.resnet.ResNetBody` (outputs ``c2``..``c5``).
        fpn: the :class:`~backbone.fpn.FPN`, or ``None`` when built without one.
        feature_info: outputs of ``forward`` (name, channels, stride), e.g. ``p2``..``p6``.
        out_channels: torchvision's convention: the channels every output level shares.
        out_names: the names ``forward`` gives its outputs, in order: ``feature_info.names()``.

    Args:
        body, fpn: the modules.
        names: rename the outputs (one name per output, in order), e.g. torchvision's
            ``'0'``..``'3'``, ``'pool'`` (see :func:`torchvision_level_names`); ``None`` keeps
            ``feature_info``'s names of the body / FPN. Only the output keys change, not the state dict.

    Input: float tensor ``[N, 3, H, W]``. Output: ``OrderedDict`` name -> ``[N, C, H/s, W/s]``.
    """

    # Python-side metadata: TorchScript leaves these properties out of the compiled module.
    __jit_unused_properties__ = ["feature_info", "size_divisibility"]
    # Plain attributes for forward (which TorchScript compiles; it cannot read FeatureInfo).
    renamed: bool
    inner_names: list[str]
    out_names: list[str]

    def __init__(self, body: ResNetBody, fpn: FPN | None = None, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels: int = fpn.out_channels if fpn is not None else body.out_channels
        inner = self._inner_feature_info()
        if names is not None and len(names) != len(inner):
            raise ValueError(f"names: expected {len(inner)} names, one per output {list(inner.names())}; got {list(names)}")
        self.renamed = names is not None
        self.inner_names = list(inner.names())
        self.out_names = list(names) if names is not None else list(inner.names())
        if self.renamed:
            FeatureInfo(self._renamed(inner))  # validates the names (unique, non-empty) now
        #: Convert the input batch to the channels-last memory format (see :meth:`set_channels_last`).
        self.channels_last = False

    def set_channels_last(self, enabled: bool = True) -> "BackboneWithFPN":
        """Run in the channels-last memory format (faster convolutions with oneDNN and cuDNN), or back.

        Converts the parameters and makes :meth:`forward` convert its input batch; outputs are the
        same up to float rounding. Returns ``self``.
        """
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled
        return self

    def _inner_feature_info(self) -> FeatureInfo:
        return self.fpn.feature_info if self.fpn is not None else self.body.feature_info

    def _renamed(self, inner: FeatureInfo) -> list[tuple[str, int, int]]:
        return [(name, s.channels, s.stride) for name, s in zip(self.out_names, inner)]

    @property
    def feature_info(self) -> FeatureInfo:
        inner = self._inner_feature_info()
        return FeatureInfo(self._renamed(inner)) if self.renamed else inner

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    @property
    def size_divisibility(self) -> int:
        """detectron2 convention: pad inputs to a multiple of this (the body's coarsest stride)."""
        return self.body.size_divisibility

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        if self.fpn is not None:
            features = self.fpn(features)
        if self.renamed:
            return OrderedDict([(new, features[old]) for old, new in zip(self.inner_names, self.out_names)])
        return features


def _warn_frozen(cfg: BackboneConfig) -> None:
    """Warn about options that freezing makes pointless: random stages kept frozen, offsets that never train."""
    trainable = cfg.resolved_trainable_stages()
    if cfg.trainable_stages is not None and trainable < MAX_TRAINABLE_STAGES and not cfg.weights:
        warnings.warn(
            f"trainable_stages={trainable} without weights freezes randomly initialised stages of "
            f"{cfg.name}; set weights, or trainable_stages={MAX_TRAINABLE_STAGES} to train them",
            UserWarning,
            stacklevel=3,
        )
    # The parts are the stem then c2..c5; the lowest MAX_TRAINABLE_STAGES - trainable are frozen.
    frozen = [n for n in cfg.dcn_stages if LEVELS.index(n) + 1 < MAX_TRAINABLE_STAGES - trainable]
    if frozen:
        needed = MAX_TRAINABLE_STAGES - 1 - LEVELS.index(frozen[0])
        warnings.warn(
            f"dcn_stages {frozen} lie in stages frozen by trainable_stages={trainable}, so their offset convs never "
            f"train (from ImageNet weights they stay zero: a plain 3x3 grid at mask 0.5); set trainable_stages={needed} "
            "or drop them from dcn_stages",
            UserWarning,
            stacklevel=3,
        )


def build_backbone(
    spec: str | BackboneConfig | Mapping[str, Any] | None = None, /, *, torchvision_names: bool = False, **options: Any
) -> BackboneWithFPN:
    """Build a ResNet(-FPN) backbone.

    Args:
        spec: a name (``"resnet50"``), a :class:`BackboneConfig`, or a mapping of its fields (as read
            from YAML). Keyword ``options`` override it; they are the fields of
            :class:`BackboneConfig`. ``fpn`` may also be ``True``/``False`` or a mapping of
            :class:`FPNConfig` fields (see :meth:`BackboneConfig.from_mapping`).
        **options: see :class:`BackboneConfig` (``weights``, ``norm``, ``trainable_stages``,
            ``norm_eval``, ``out_features``, ``style``, ``output_stride``, ``zero_init_residual``,
            ``checkpoint_stages``, ``base_channels``, ``dcn_stages``, ``fpn``).
        torchvision_names: name the outputs as torchvision's ``resnet_fpn_backbone`` does (``'0'``,
            ``'1'``, ``'2'``, ``'3'``, ``'pool'`` for the default P2-P6; see
            :func:`torchvision_level_names`); ``feature_info`` follows. Use it to plug the backbone
            into a torchvision detector with its default RoI poolers, which read levels ``'0'``..``'3'``:
            ``FasterRCNN(build_backbone("resnet18", torchvision_names=True), num_classes=4)``. With our
            names (``p2``..``p6``) such a detector fails at its first forward inside torchvision
            (``IndexError`` in ``MultiScaleRoIAlign``) unless it is given a pooler with
            ``featmap_names=bb.feature_info.names()[:4]``; :func:`detection.build_detector` does that.

    Returns:
        :class:`BackboneWithFPN`. Defaults reproduce torchvision's ``resnet_fpn_backbone``:
        C2-C5 into a 256-wide FPN with a max-pool P6, outputs ``p2``..``p6``.

    Warns:
        UserWarning: ``trainable_stages`` below 5 without ``weights``: randomly initialised stages
            are frozen (torchvision ignores the setting in that case; here it keeps its meaning).
        UserWarning: ``dcn_stages`` in frozen stages: their offset convs never train.
        UserWarning: ``weights`` lack the offset convs of ``dcn_stages`` (always so for ImageNet
            files): they are listed as new keys and start at zero.

    Example:
        >>> bb = build_backbone("resnet18", fpn={"out_channels": 128})
        >>> bb.feature_info.names(), bb.out_channels
        (('p2', 'p3', 'p4', 'p5', 'p6'), 128)
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    cfg = BackboneConfig.from_mapping(spec, **options)
    _warn_frozen(cfg)
    arch = ARCHITECTURES[cfg.name]
    body = ResNetBody(
        arch.block,
        arch.layers,
        out_features=cfg.resolved_out_features(),
        groups=arch.groups,
        width_per_group=arch.width_per_group,
        norm_layer=make_norm(cfg.resolved_norm(), gn_groups=cfg.gn_groups),
        stride_in_1x1=cfg.style == "caffe",
        output_stride=cfg.output_stride,
        trainable_stages=MAX_TRAINABLE_STAGES,  # freeze after loading weights, so loading never depends on requires_grad
        norm_eval=cfg.norm_eval,
        zero_init_residual=cfg.zero_init_residual,
        checkpoint_stages=cfg.checkpoint_stages,
        base_channels=cfg.base_channels,
        dcn_stages=cfg.dcn_stages,
    )
    if cfg.weights:
        load_backbone_weights(body, cfg.name, cfg.weights)
    body.freeze(cfg.resolved_trainable_stages())
    fpn = None
    if cfg.fpn.enabled:
        fpn = FPN(body.feature_info, cfg.fpn.out_channels, extra=cfg.fpn.resolved_extra(), norm=cfg.fpn.resolved_norm())
    return BackboneWithFPN(body, fpn, torchvision_level_names(body, fpn) if torchvision_names else None)
