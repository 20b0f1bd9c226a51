"""Modulated deformable convolution (DCNv2) for the 3x3 convs of ResNet bottlenecks.

:class:`ModulatedDeformConv2d` is torchvision's :class:`~torchvision.ops.DeformConv2d` with its
offset and mask predicted from the input by a 3x3 conv (``conv_offset``), as in detectron2's
``DeformBottleneckBlock`` (``deform_modulated=True``) and mmcv's ``ModulatedDeformConv2dPack``
(mmdet's ``dcn=dict(type="DCNv2")``). The layout, initialisation and state-dict keys follow mmcv:

- the main kernel is ``weight`` (no bias), so a block's ``conv2.weight`` from a torchvision
  ImageNet checkpoint loads into it unchanged;
- ``conv_offset`` (``weight`` and ``bias``) predicts ``3 * k * k`` channels per offset group, split
  into thirds ``(o1, o2, m)``: ``cat(o1, o2)`` are the offsets in torchvision's interleaved
  ``(dy, dx)`` order per kernel tap, ``sigmoid(m)`` the mask;
- ``conv_offset`` starts at zero: zero offsets (sampling the plain 3x3 grid) and a mask of
  ``sigmoid(0) = 0.5``, so a freshly built module computes exactly half the plain convolution
  (detectron2 and mmcv initialise alike). Checkpoints lack these keys; the weight loader reports
  them as new (:func:`offset_state_keys`).
"""

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d

__all__ = ["ModulatedDeformConv2d", "modulated_deform_conv2d", "offset_state_keys"]


# A leaf for torch.fx: torchvision's deform_conv2d branches on tensor shapes, which symbolic tracing cannot
# follow, so traced graphs (create_feature_extractor, FX quantisation) call this function as one node.
@torch.fx.wrap
def modulated_deform_conv2d(
    x: Tensor,
    offset_mask: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """DCNv2 with mmcv's channel layout: ``offset_mask`` ``[N, 3 * G * k * k, H', W']`` splits into thirds
    ``(o1, o2, m)``; ``cat(o1, o2)`` are the offsets, ``sigmoid(m)`` the mask. The groups of ``weight``
    follow from the channels of ``x``, as in :func:`torchvision.ops.deform_conv2d`.

    Computed in float32 for inputs other than float32 / float64 (torchvision's CPU kernel has no other
    dtypes, and CPU autocast has no rule for it) and returned in the input's dtype.
    """
    dtype = x.dtype
    compute = dtype if dtype == torch.float32 or dtype == torch.float64 else torch.float32
    o1, o2, mask = torch.chunk(offset_mask.to(compute), 3, dim=1)
    out = deform_conv2d(
        x.to(compute),
        torch.cat((o1, o2), dim=1),
        weight.to(compute),
        None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=mask.sigmoid(),
    )
    return out.to(dtype)


@torch.jit.unused
def _refuse_onnx_export() -> None:
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            "backbone dcn_stages: ModulatedDeformConv2d cannot be exported to ONNX (torch.onnx has no translation "
            "for torchvision's deform_conv2d); export a backbone built without dcn_stages, or use torch.export "
            "or torch.jit.script, which keep the op"
        )


class ModulatedDeformConv2d(DeformConv2d):
    """A drop-in for a bias-free ``nn.Conv2d`` (3x3 in a ResNet) that learns where to sample, DCNv2-style.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as for
            ``nn.Conv2d`` (``groups`` is the ResNeXt cardinality of the main kernel).
        offset_groups: groups of input channels that share one set of offsets and masks
            (detectron2's ``deform_num_groups``, mmcv's ``deform_groups``); must divide ``in_channels``.

    The offset conv has the same kernel, stride, padding and dilation as the main kernel, so its
    output has the spatial size of the result; it is initialised to zero (see the module docstring).

    Input: ``[N, in_channels, H, W]``. Output: ``[N, out_channels, H', W']`` with ``H'``, ``W'`` as for
    ``nn.Conv2d`` with the same arguments. Float32 and float64 on every device torchvision's kernel
    runs on; inputs of another float dtype (autocast) are computed in float32 and cast back.

    Example:
        >>> conv = ModulatedDeformConv2d(16, 16, 3, padding=1)
        >>> conv(torch.rand(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        offset_groups: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        if offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"offset_groups must be a positive divisor of in_channels={in_channels}, got {offset_groups}")
        self.offset_groups = offset_groups
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels, 3 * offset_groups * taps, self.kernel_size, self.stride, self.padding, self.dilation, bias=True
        )
        self.reset_offset()

    def reset_offset(self) -> None:
        """Zero the offset conv: plain-grid sampling with mask 0.5, the DCNv2 initialisation."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not torch.jit.is_scripting():
            _refuse_onnx_export()
        return modulated_deform_conv2d(x, self.conv_offset(x), self.weight, self.stride, self.padding, self.dilation)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + (f", offset_groups={self.offset_groups})" if self.offset_groups != 1 else ")")


def offset_state_keys(module: nn.Module) -> list[str]:
    """State-dict keys of every :class:`ModulatedDeformConv2d` offset conv inside ``module``, in order.

    These are the keys a plain ResNet checkpoint cannot have: the loader accepts their absence and
    reports them as new deformable-conv offsets (left at their zero initialisation).
    """
    keys: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, ModulatedDeformConv2d):
            prefix = f"{name}.conv_offset." if name else "conv_offset."
            keys += [prefix + k for k in m.conv_offset.state_dict()]
    return keys
