"""``build_backbone``: the single translator from options to modules, and ``BackboneWithFPN``."""

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import ARCHITECTURES, MAX_TRAINABLE_STAGES, BackboneConfig
from .features import FeatureInfo, ShapeSpec
from .fpn import FPN
from .norm import make_norm
from .resnet import ResNetBody
from .weights import load_backbone_weights

__all__ = ["BackboneWithFPN", "build_backbone", "load_backbone_weights"]


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

    Input: float tensor ``[N, 3, H, W]``. Output: ``OrderedDict`` name -> ``[N, C, H/s, W/s]``.
    """

    # Python-side metadata: TorchScript leaves these properties out of the compiled module.
    __jit_unused_properties__ = ["feature_info", "size_divisibility"]

    def __init__(self, body: ResNetBody, fpn: FPN | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels: int = fpn.out_channels if fpn is not None else body.out_channels
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

    @property
    def feature_info(self) -> FeatureInfo:
        return self.fpn.feature_info if self.fpn is not None else self.body.feature_info

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
            return self.fpn(features)
        return features


def build_backbone(spec: str | BackboneConfig | Mapping[str, Any] | None = None, /, **options: Any) -> BackboneWithFPN:
    """Build a ResNet(-FPN) backbone.

    Args:
        spec: a name (``"resnet50"``), a :class:`BackboneConfig`, or a mapping of its fields (as read
            from YAML). Keyword ``options`` override it; they are the fields of
            :class:`BackboneConfig`. ``fpn`` may also be ``True``/``False`` or a mapping of
            :class:`FPNConfig` fields (see :meth:`BackboneConfig.from_mapping`).
        **options: see :class:`BackboneConfig` (``weights``, ``norm``, ``trainable_stages``,
            ``norm_eval``, ``out_features``, ``style``, ``output_stride``, ``zero_init_residual``,
            ``checkpoint_stages``, ``base_channels``, ``fpn``).

    Returns:
        :class:`BackboneWithFPN`. Defaults reproduce torchvision's ``resnet_fpn_backbone``:
        C2-C5 into a 256-wide FPN with a max-pool P6, outputs ``p2``..``p6``.

    Warns:
        UserWarning: ``trainable_stages`` below 5 without ``weights``: randomly initialised stages
            are frozen (torchvision ignores the setting in that case; here it keeps its meaning).

    Example:
        >>> bb = build_backbone("resnet18", fpn={"out_channels": 128})
        >>> bb.feature_info.names(), bb.out_channels
        (('p2', 'p3', 'p4', 'p5', 'p6'), 128)
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    cfg = BackboneConfig.from_mapping(spec, **options)
    if cfg.trainable_stages is not None and cfg.trainable_stages < MAX_TRAINABLE_STAGES and not cfg.weights:
        warnings.warn(
            f"trainable_stages={cfg.trainable_stages} without weights freezes randomly initialised stages of "
            f"{cfg.name}; set weights, or trainable_stages={MAX_TRAINABLE_STAGES} to train them",
            UserWarning,
            stacklevel=2,
        )
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
    )
    if cfg.weights:
        load_backbone_weights(body, cfg.name, cfg.weights)
    body.freeze(cfg.resolved_trainable_stages())
    fpn = None
    if cfg.fpn.enabled:
        fpn = FPN(body.feature_info, cfg.fpn.out_channels, extra=cfg.fpn.resolved_extra(), norm=cfg.fpn.resolved_norm())
    return BackboneWithFPN(body, fpn)
