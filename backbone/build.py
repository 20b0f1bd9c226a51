"""``build_backbone``: the single translator from options to modules, and ``BackboneWithFPN``."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ARCHITECTURES, LEVELS, BackboneConfig, FPNConfig
from .features import FeatureInfo, ShapeSpec
from .fpn import FPN
from .norm import make_norm
from .resnet import ResNetBody
from .weights import fetch_torchvision_weights, load_state_dict_checked, read_checkpoint

__all__ = ["BackboneWithFPN", "build_backbone", "load_backbone_weights"]


class BackboneWithFPN(nn.Module):
    """A ResNet body with an optional FPN on top: the module detectors consume.

    State-dict keys are ``body.*`` and ``fpn.*``, exactly as in torchvision's ``BackboneWithFPN``,
    so the ``backbone.*`` part of torchvision detector checkpoints loads unchanged.

    Attributes:
        body: the :class:`~backbone.resnet.ResNetBody` (outputs ``c2``..``c5``).
        fpn: the :class:`~backbone.fpn.FPN`, or ``None`` when built without one.
        feature_info: outputs of ``forward`` (name, channels, stride), e.g. ``p2``..``p6``.
        out_channels: torchvision's convention: the channels every output level shares.

    Input: float tensor ``[N, 3, H, W]``. Output: ``OrderedDict`` name -> ``[N, C, H/s, W/s]``.
    """

    def __init__(self, body: ResNetBody, fpn: FPN | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        #: Convert the input batch to the channels-last memory format (see :meth:`set_channels_last`).
        self.channels_last = False

    def set_channels_last(self, enabled: bool = True) -> BackboneWithFPN:
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

    @property
    def out_channels(self) -> int:
        return self.fpn.out_channels if self.fpn is not None else self.body.out_channels

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    @property
    def size_divisibility(self) -> int:
        """detectron2 convention: pad inputs to a multiple of this (the body's coarsest stride)."""
        return self.body.size_divisibility

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        return self.fpn(features) if self.fpn is not None else features


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(BackboneConfig))


def _to_config(spec: str | BackboneConfig | Mapping[str, Any] | None, options: dict[str, Any]) -> BackboneConfig:
    if isinstance(spec, BackboneConfig):
        base: dict[str, Any] = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    elif isinstance(spec, Mapping):
        base = dict(spec)
    elif isinstance(spec, str):
        base = {"name": spec}
    elif spec is None:
        base = {}
    else:
        raise TypeError(f"build_backbone takes a name, a BackboneConfig or a mapping, got {type(spec).__name__}")
    base.update(options)
    unknown = [k for k in base if k not in _OPTION_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _OPTION_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"build_backbone got unknown option(s) {unknown}{hint}; valid options: {', '.join(_OPTION_NAMES)}")
    fpn = base.get("fpn", FPNConfig())
    if isinstance(fpn, bool):
        fpn = FPNConfig(enabled=fpn)
    elif isinstance(fpn, Mapping):
        fpn = FPNConfig(**fpn)
    base["fpn"] = fpn
    for key in ("out_features", "checkpoint_stages"):
        if base.get(key) is not None:
            if isinstance(base[key], str):
                base[key] = (base[key],)
            base[key] = tuple(base[key])
    return BackboneConfig(**base)


def build_backbone(spec: str | BackboneConfig | Mapping[str, Any] | None = None, /, **options: Any) -> BackboneWithFPN:
    """Build a ResNet(-FPN) backbone.

    Args:
        spec: a name (``"resnet50"``), a :class:`BackboneConfig`, or a mapping of its fields (as read
            from YAML). Keyword ``options`` override it; they are the fields of
            :class:`BackboneConfig`. ``fpn`` may also be ``True``/``False`` or a mapping of
            :class:`FPNConfig` fields.
        **options: see :class:`BackboneConfig` (``weights``, ``norm``, ``trainable_stages``,
            ``norm_eval``, ``out_features``, ``style``, ``output_stride``, ``zero_init_residual``,
            ``checkpoint_stages``, ``base_channels``, ``fpn``).

    Returns:
        :class:`BackboneWithFPN`. Defaults reproduce torchvision's ``resnet_fpn_backbone``:
        C2-C5 into a 256-wide FPN with a max-pool P6, outputs ``p2``..``p6``.

    Example:
        >>> bb = build_backbone("resnet18", fpn={"out_channels": 128})
        >>> bb.feature_info.names(), bb.out_channels
        (('p2', 'p3', 'p4', 'p5', 'p6'), 128)
    """
    cfg = _to_config(spec, options)
    arch = ARCHITECTURES[cfg.name]
    out_features = cfg.resolved_out_features()
    body = ResNetBody(
        arch.block,
        arch.layers,
        out_features=out_features,
        groups=arch.groups,
        width_per_group=arch.width_per_group,
        norm_layer=make_norm(cfg.resolved_norm(), gn_groups=cfg.gn_groups),
        stride_in_1x1=cfg.style == "caffe",
        output_stride=cfg.output_stride,
        trainable_stages=5,  # freeze after loading weights, so loading never depends on requires_grad
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
        fpn = FPN(body.feature_info, cfg.fpn.out_channels, extra=cfg.fpn.extra or "maxpool", norm=cfg.fpn.norm or "none")
    return BackboneWithFPN(body, fpn)


def load_backbone_weights(body: ResNetBody, name: str, weights: str | os.PathLike[str]) -> None:
    """Load ImageNet weights into ``body``: a local torchvision-format file, or a torchvision weights name.

    The classifier (``fc.*``) and stages the body does not build are skipped; everything else must
    match exactly (strict), or a :class:`~backbone.weights.WeightsError` lists the offending keys.
    """
    text = os.fspath(weights)
    looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".bin", ".ckpt")) or text.startswith("~")
    if Path(text).expanduser().is_file() or looks_like_path:
        path = Path(text).expanduser()
    else:
        path = fetch_torchvision_weights(name, text)
    state_dict = read_checkpoint(path)
    unbuilt = tuple(f"layer{i + 1}." for i in range(len(body.stage_names), len(LEVELS)))
    load_state_dict_checked(body, state_dict, source=str(path), ignore_prefixes=("fc.",) + unbuilt)
