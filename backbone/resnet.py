"""The ResNet body: residual blocks, stages and the C2-C5 multi-scale outputs.

Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4`` and, inside a
block, ``conv1``/``bn1``/.../``downsample``), so torchvision ImageNet checkpoints load with ``strict=True``
and no key conversion. The names ``c2``..``c5`` appear only in outputs and in ``feature_info``.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

from .config import (
    BLOCKS,
    LEVELS,
    MAX_TRAINABLE_STAGES,
    OUTPUT_STRIDES,
    check_choice,
    check_dcn_stages,
    check_levels,
    check_trainable_stages,
)
from .deform import ModulatedDeformConv2d
from .features import FeatureInfo, FeatureSpec, ShapeSpec
from .norm import BN_TYPES, freeze_bn_stats

__all__ = ["BasicBlock", "Bottleneck", "ResNetBody"]

NormFactory = Callable[[int], nn.Module]


def _projection(in_ch: int, out_ch: int, stride: int, norm_layer: NormFactory) -> nn.Sequential | None:
    """1x1 projection shortcut, needed wherever the stride or the width changes (torchvision's ``downsample``)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(tv_resnet.conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's two-3x3-conv block (ResNet-18/34), which also takes ``dilation > 1``.

    torchvision's class refuses dilation (it raises ``NotImplementedError``), but output_stride 16
    and 8 need it; so the block is built undilated and its two 3x3 convs get the dilation (and
    the matching padding) before any use: same modules, keys and initialisation.
    """

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
        deformable: bool = False,
    ) -> None:
        del stride_in_1x1  # a basic block has no 1x1 conv; BackboneConfig rejects style='caffe' for it
        if deformable:
            # As in detectron2 and mmdet: DCN replaces a bottleneck's 3x3; neither defines it for basic blocks.
            raise ValueError("deformable convs are built into bottleneck blocks only; a BasicBlock has none")
        downsample = _projection(in_channels, planes * self.expansion, stride, norm_layer)
        super().__init__(in_channels, planes, stride, downsample, groups, width_per_group, norm_layer=norm_layer)
        for conv in (self.conv1, self.conv2):
            conv.dilation = conv.padding = (dilation, dilation)
        self.out_channels = planes * self.expansion

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand block.

    ``stride_in_1x1=False`` is torchvision's ResNet v1.5 (stride in the 3x3); ``True`` is the original
    MSRA/Caffe layout used by detectron2's ImageNet weights (stride in the first 1x1).
    ``deformable=True`` builds the 3x3 ``conv2`` as a :class:`~backbone.deform.ModulatedDeformConv2d`
    (DCNv2) with the same stride, dilation, groups and ``conv2.weight`` key.
    """

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
        deformable: bool = False,
    ) -> None:
        downsample = _projection(in_channels, planes * self.expansion, stride, norm_layer)
        super().__init__(in_channels, planes, stride, downsample, groups, width_per_group, dilation, norm_layer)
        if stride_in_1x1:
            self.conv1.stride, self.conv2.stride = (stride, stride), (1, 1)
        if deformable:
            width = self.conv2.in_channels
            self.conv2 = ModulatedDeformConv2d(
                width, width, 3, stride=self.conv2.stride[0], padding=dilation, dilation=dilation, groups=groups
            )
        self.out_channels = planes * self.expansion

    def last_norm(self) -> nn.Module:
        return self.bn3


_BLOCK_CLASSES: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
#: Which of the stages c3, c4, c5 trade their stride for dilation (torchvision's replace_stride_with_dilation).
_DILATED = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


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


# torchvision's ResNet builds all four stages and a classifier and returns only the logits; the body must
# stop after the last requested level, name its outputs and checkpoint stages, so it is ours.
class ResNetBody(nn.Module):
    """A ResNet without its classifier, returning an ``OrderedDict`` of C-level features.

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
            storing them (same outputs and gradients, lower peak memory). Eager mode only: a
            ``torch.jit.script`` copy runs them normally.
        base_channels: width of the stem and of the first stage's blocks (``planes``); each later
            stage doubles it. 64 is every standard ResNet; 32 gives a ResNet of half the width and
            about a quarter of the compute (no pretrained weights exist for it).
        dcn_stages: levels whose bottlenecks get a modulated deformable 3x3 conv (DCNv2,
            :class:`~backbone.deform.ModulatedDeformConv2d`) in every block, as detectron2's
            ``DEFORM_ON_PER_STAGE`` and mmdet's ``stage_with_dcn`` do. Bottleneck bodies only; the
            levels must be built. Outputs, ``feature_info`` and the main conv keys are unchanged.

    Input: float tensor ``[N, 3, H, W]``, normalised as torchvision's ImageNet weights expect.
    Output: ``OrderedDict`` name -> tensor ``[N, C, ceil(H / stride), ceil(W / stride)]`` in
    ``feature_info`` order.

    Example:
        >>> body = ResNetBody("basic", (2, 2, 2, 2), out_features=("c3", "c4", "c5"))
        >>> [f.name for f in body.feature_info], body.feature_info.channels()
        (['c3', 'c4', 'c5'], (128, 256, 512))
    """

    # Declared for TorchScript, which cannot infer the type of an empty list.
    _checkpointed: list[str]

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        out_features: Sequence[str] = LEVELS,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
        stride_in_1x1: bool = False,
        output_stride: int = 32,
        trainable_stages: int = MAX_TRAINABLE_STAGES,
        norm_eval: bool = False,
        zero_init_residual: bool = False,
        checkpoint_stages: Sequence[str] = (),
        base_channels: int = 64,
        dcn_stages: Sequence[str] = (),
    ) -> None:
        super().__init__()
        check_choice("block", block, BLOCKS)
        check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        check_levels("out_features", tuple(out_features), allow_empty=False)
        check_levels("checkpoint_stages", tuple(checkpoint_stages), allow_empty=True)
        check_dcn_stages(tuple(dcn_stages), tuple(out_features), block)
        if len(layers) != len(LEVELS) or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must give a positive block count for each of the 4 stages, got {list(layers)}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be a positive channel count, got {base_channels}")
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block_kwargs = {"groups": groups, "width_per_group": width_per_group, "norm_layer": norm_layer, "stride_in_1x1": stride_in_1x1}
        built = layers[: LEVELS.index(out_features[-1]) + 1]
        specs = self._build_stages(_BLOCK_CLASSES[block], built, base_channels, output_stride, block_kwargs, tuple(dcn_stages))
        #: Outputs of this module, in order: (name, channels, stride).
        self.feature_info = FeatureInfo(s for s in specs if s.name in out_features)
        # Plain attributes for forward and for torchvision's detectors (TorchScript cannot read FeatureInfo).
        self.out_channels: int = self.feature_info[-1].channels
        self.size_divisibility: int = max(self.feature_info.strides())
        self._levels: dict[str, str] = {f"layer{LEVELS.index(n) + 1}": n for n in self.feature_info.names()}
        self._checkpointed = [f"layer{LEVELS.index(n) + 1}" for n in checkpoint_stages if LEVELS.index(n) < len(self.stage_names)]
        self._init_weights(zero_init_residual)
        self._frozen: list[nn.Module] = []
        self.freeze(trainable_stages)

    # -- construction helpers -------------------------------------------------------------------
    def _build_stages(
        self,
        block_cls: type[nn.Module],
        layers: Sequence[int],
        base_channels: int,
        output_stride: int,
        block_kwargs: dict,
        dcn_stages: tuple[str, ...],
    ) -> list[FeatureSpec]:
        """Add ``layer1``.. (one per entry of ``layers``) and return each stage's output spec."""
        dilate = _DILATED[output_stride]
        in_channels, stride_so_far, dilation = base_channels, 4, 1
        specs: list[FeatureSpec] = []
        self.stage_names: list[str] = []
        for i, num_blocks in enumerate(layers):
            planes, stride, previous_dilation = base_channels * 2**i, 1 if i == 0 else 2, dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            blocks = []
            for b in range(int(num_blocks)):
                first = b == 0
                blocks.append(
                    block_cls(
                        in_channels,
                        planes,
                        stride=stride if first else 1,
                        dilation=previous_dilation if first else dilation,
                        deformable=LEVELS[i] in dcn_stages,
                        **block_kwargs,
                    )
                )
                in_channels = blocks[-1].out_channels
            stride_so_far *= stride
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            specs.append(FeatureSpec(LEVELS[i], in_channels, stride_so_far))
        return specs

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, ModulatedDeformConv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.reset_offset()  # the loop above reached its offset conv too; DCNv2 starts from zero offsets
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
        check_trainable_stages(trainable_stages)
        self.trainable_stages = trainable_stages
        # The parts from the bottom (stem, c2, c3, c4, c5); the lowest 5 - trainable_stages are frozen.
        frozen_parts = self.stages()[: MAX_TRAINABLE_STAGES - trainable_stages]
        self.requires_grad_(True)
        self._frozen = [m for _, modules in frozen_parts for m in modules]
        for m in self._frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBody":
        super().train(mode)
        if mode:
            for m in self._frozen:
                freeze_bn_stats(m)
            if self.norm_eval:
                freeze_bn_stats(self)
        return self

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2 convention: ``{name: ShapeSpec(channels, stride)}``."""
        return self.feature_info.output_shape()

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = OrderedDict()
        # The children in registration order are the network in order: conv1, bn1, relu, maxpool, layer1..
        for name, module in self.named_children():
            if name in self._checkpointed and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = self._run_checkpointed(name, x)
            else:
                x = module(x)
            if name in self._levels:
                outputs[self._levels[name]] = x
        return outputs

    @torch.jit.unused
    def _run_checkpointed(self, name: str, x: Tensor) -> Tensor:
        """Run stage ``name`` with activation checkpointing, block by block (eager mode only)."""
        stage: nn.Sequential = getattr(self, name)
        if not any(p.requires_grad for p in stage.parameters()):
            return stage(x)  # a frozen stage stores no activations for backward anyway
        for block in stage:
            x = _checkpointed(block, x)
        return x
