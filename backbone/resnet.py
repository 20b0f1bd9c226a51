"""The ResNet body: residual blocks, stages and the C2-C5 multi-scale outputs.

Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4`` and, inside a
block, ``conv1``/``bn1``/.../``downsample``), so torchvision ImageNet checkpoints load with ``strict=True``
and no key conversion. The names ``c2``..``c5`` appear only in outputs and in ``feature_info``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .config import ARCHITECTURES, LEVELS
from .features import FeatureInfo, FeatureSpec, ShapeSpec
from .norm import BN_TYPES, freeze_bn_stats

__all__ = ["BasicBlock", "Bottleneck", "ResNetBody"]

NormFactory = Callable[[int], nn.Module]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, groups=groups, dilation=dilation, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _projection(in_ch: int, out_ch: int, stride: int, norm_layer: NormFactory) -> nn.Sequential | None:
    """1x1 projection shortcut, needed wherever the stride or the width changes."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-projection shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (as in torchvision)")
        del stride_in_1x1  # a basic block has no 1x1 conv; BackboneConfig rejects style='caffe' for it
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = _projection(in_channels, planes, stride, norm_layer)
        self.out_channels = planes

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, with an identity or projection shortcut.

    ``stride_in_1x1=False`` is torchvision's ResNet v1.5 (stride in the 3x3); ``True`` is the original
    MSRA/Caffe layout used by detectron2's ImageNet weights (stride in the first 1x1).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv1x1(in_channels, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride, norm_layer)
        self.out_channels = out_channels

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@contextmanager
def _bn_stats_paused(module: nn.Module) -> Iterator[None]:
    """Run BN layers on batch statistics without changing their running statistics.

    Used while activation checkpointing recomputes a block during backward: the forward pass already
    updated the statistics once. The layers keep tracking (so the recompute saves exactly the tensors
    the forward saved, which checkpointing verifies) but with momentum 0, which leaves the running
    mean and variance as they are; the batch counter is restored afterwards.
    """
    paused = [m for m in module.modules() if isinstance(m, BN_TYPES) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in paused]
    for m in paused:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(paused, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _checkpointed(block: nn.Module, x: Tensor) -> Tensor:
    calls = 0

    def run(inp: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(inp)
        with _bn_stats_paused(block):
            return block(inp)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


class ResNetBody(nn.Module):
    """A ResNet without its classifier, returning ``OrderedDict`` of C-level features.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        out_features: levels to return, any increasing subset of ``("c2", "c3", "c4", "c5")``.
            Stages after the last one named are not built.
        groups, width_per_group: ResNeXt cardinality and bottleneck width (torchvision's meaning).
        norm_layer: factory ``channels -> module`` (see :func:`backbone.norm.make_norm`).
        stride_in_1x1: caffe-style bottlenecks (stride in the first 1x1 conv).
        output_stride: 32, 16 (C5 dilated) or 8 (C4 and C5 dilated).
        trainable_stages: 0-5, counted from C5 downwards; 5 also trains the stem (torchvision's
            ``trainable_layers``). Frozen parts get ``requires_grad=False`` and their BN layers stay
            in eval mode after every ``.train()`` call.
        norm_eval: keep all BN statistics frozen (eval mode) while affine parameters train.
        zero_init_residual: initialise the last norm of each residual branch to zero.
        checkpoint_stages: levels whose blocks recompute activations in backward instead of
            storing them (same outputs and gradients, lower peak memory).
        base_channels: width of the stem and of the first stage's blocks (``planes``); each later
            stage doubles it. 64 is every standard ResNet; 32 gives a ResNet of half the width and
            about a quarter of the compute (no pretrained weights exist for it).

    Input: float tensor ``[N, 3, H, W]``, normalised as torchvision's ImageNet weights expect.
    Output: ``OrderedDict`` name -> tensor ``[N, C, ceil(H / stride), ceil(W / stride)]`` in
    ``feature_info`` order.

    Example:
        >>> body = ResNetBody("basic", (2, 2, 2, 2), out_features=("c3", "c4", "c5"))
        >>> [f.name for f in body.feature_info], body.feature_info.channels()
        (['c3', 'c4', 'c5'], (128, 256, 512))
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        *,
        out_features: Sequence[str] = LEVELS,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
        output_stride: int = 32,
        trainable_stages: int = 5,
        norm_eval: bool = False,
        zero_init_residual: bool = False,
        checkpoint_stages: Sequence[str] = (),
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must give a positive block count for each of the 4 stages, got {list(layers)}")
        unknown = [n for n in out_features if n not in LEVELS]
        if unknown or not out_features:
            raise ValueError(f"out_features must be a non-empty subset of {list(LEVELS)}, got {list(out_features)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be a positive channel count, got {base_channels}")
        block_cls: type[BasicBlock] | type[Bottleneck] = BasicBlock if block == "basic" else Bottleneck
        self._out_features = tuple(n for n in LEVELS if n in out_features)
        self.norm_eval = norm_eval
        self.checkpoint_stages = frozenset(checkpoint_stages)

        self.conv1 = nn.Conv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Which stages trade their stride for dilation (torchvision's replace_stride_with_dilation).
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[output_stride]
        last_stage = LEVELS.index(self._out_features[-1])
        in_channels, stride_so_far, dilation = base_channels, 4, 1
        specs: list[FeatureSpec] = []
        self.stage_names: list[str] = []
        for i, (planes, num_blocks) in enumerate(zip((base_channels, 2 * base_channels, 4 * base_channels, 8 * base_channels), layers)):
            if i > last_stage:
                break
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if i > 0 and dilate[i - 1]:
                dilation *= stride
                stride = 1
            blocks = []
            for b in range(int(num_blocks)):
                blocks.append(
                    block_cls(
                        in_channels,
                        planes,
                        stride=stride if b == 0 else 1,
                        dilation=previous_dilation if b == 0 else dilation,
                        groups=groups,
                        width_per_group=width_per_group,
                        norm_layer=norm_layer,
                        stride_in_1x1=stride_in_1x1,
                    )
                )
                in_channels = blocks[-1].out_channels
            stride_so_far *= stride
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            specs.append(FeatureSpec(LEVELS[i], in_channels, stride_so_far))

        #: Outputs of this module, in order: (name, channels, stride).
        self.feature_info = FeatureInfo(s for s in specs if s.name in self._out_features)
        self._init_weights(zero_init_residual)
        self._frozen: list[nn.Module] = []
        self.freeze(trainable_stages)

    # -- construction helpers -------------------------------------------------------------------
    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    norm = m.last_norm()
                    if getattr(norm, "weight", None) is not None:
                        nn.init.constant_(norm.weight, 0)

    def stages(self) -> list[tuple[str, list[nn.Module]]]:
        """The stem and the built stages as ``(name, modules)``, from the input upwards."""
        parts: list[tuple[str, list[nn.Module]]] = [("stem", [self.conv1, self.bn1])]
        for i, name in enumerate(self.stage_names):
            parts.append((LEVELS[i], [getattr(self, name)]))
        return parts

    def freeze(self, trainable_stages: int) -> None:
        """Freeze all but the top ``trainable_stages`` stages (5 = nothing frozen, 0 = everything).

        Freezing goes through module references: parameters get ``requires_grad=False`` and BN layers
        inside frozen parts stay in eval mode after every ``.train()``.
        """
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        self.trainable_stages = trainable_stages
        # Order from the top: c5, c4, c3, c2, stem (torchvision's ["layer4", ..., "conv1"]).
        all_parts = [self.conv1, self.bn1] + [getattr(self, f"layer{i}", None) for i in range(1, 5)]
        frozen_count = 5 - trainable_stages  # how many of (stem, c2, c3, c4, c5) are frozen, from the bottom
        frozen: list[nn.Module] = []
        if frozen_count >= 1:
            frozen += [self.conv1, self.bn1]
        frozen += [m for m in all_parts[2 : 2 + max(frozen_count - 1, 0)] if m is not None]
        for m in self.modules():
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
        for m in frozen:
            m.requires_grad_(False)
        self._frozen = frozen
        self.train(self.training)

    def is_frozen(self, module: nn.Module) -> bool:
        """Whether ``module`` lies inside a frozen part."""
        return any(module is f or any(module is sub for sub in f.modules()) for f in self._frozen)

    def train(self, mode: bool = True) -> ResNetBody:
        super().train(mode)
        if mode:
            for m in self._frozen:
                freeze_bn_stats(m)
            if self.norm_eval:
                freeze_bn_stats(self)
        return self

    # -- the conventions users know --------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        """torchvision convention: channels of the last (coarsest) output."""
        return self.feature_info[-1].channels

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    @property
    def size_divisibility(self) -> int:
        """detectron2 convention: input sizes divisible by this keep every output aligned to the input grid."""
        return max(self.feature_info.strides())

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        grad = torch.is_grad_enabled() and self.training
        for i, name in enumerate(self.stage_names):
            level = LEVELS[i]
            stage: nn.Sequential = getattr(self, name)
            if grad and level in self.checkpoint_stages and any(p.requires_grad for p in stage.parameters()):
                for block in stage:
                    x = _checkpointed(block, x)
            else:
                x = stage(x)
            if level in self._out_features:
                outputs[level] = x
        return outputs


def resnet_spec(name: str) -> tuple[str, tuple[int, int, int, int], int, int]:
    """``(block, layers, groups, width_per_group)`` for a named variant; raises ``ValueError`` listing names."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown ResNet name {name!r}; choose one of {list(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    return spec.block, spec.layers, spec.groups, spec.width_per_group
