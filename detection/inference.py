"""``optimize_for_inference``: a faster eval-only detector with the same outputs.

What it does to a detector, putting it in eval mode:

1. folds every frozen or eval-mode BatchNorm into the convolution before it (the body's blocks and
   stem, and ``Sequential(conv, norm, ...)`` stacks in the FPN and the v2 heads), leaving an
   ``Identity`` where the norm was;
2. converts the convolutional parts (backbone, FPN, RPN head, mask head) to the channels-last memory
   format, which oneDNN (CPU) and cuDNN (tensor cores) run faster;
3. swaps in the modules of :mod:`detection.inference_modules`: the mask predictor as two matrix
   products on CPU, the box head's linear layers through oneDNN, per-class NMS over only as many
   top scores as the kept detections need, and a transform that pastes the predicted masks into
   one preallocated tensor; a torchvision-built model also gets the sparse-product RoI poolers
   (:class:`detection.roi_align.SparseMultiScaleRoIAlign`) that ``build_detector`` gives;
4. optionally runs the forward pass under autocast (``precision="bf16"`` or ``"fp16"``): the
   detector is then returned inside an :class:`AutocastDetector`. Boxes, scores and masks are still
   decoded and returned in float32 (see :mod:`detection.heads`).

Everything is a module (attribute assignment of subclasses of torchvision's modules), so the result
can be printed, moved, copied and pickled like any model. In fp32 mode the outputs match the
unoptimised model to about 1e-4 (folding reorders float operations). The folded model is for
inference only: training it again would train the folded weights without normalisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from .inference_modules import GemmMaskRCNNPredictor, OneDNNLinear, PasteMasksTransform, TopKRoIHeads, paste_masks
from .precision import PrecisionPolicy, to_dtype
from .roi_align import SparseMultiScaleRoIAlign

__all__ = ["AutocastDetector", "fold_batch_norms", "optimize_for_inference", "paste_masks"]


class AutocastDetector(nn.Module):
    """A detector whose forward pass runs under a :class:`~detection.precision.PrecisionPolicy`'s autocast.

    Call it as the detector: ``model(images)`` in eval mode, ``model(images, targets)`` in training.
    The detector is the ``detector`` attribute (so state-dict keys gain a ``detector.`` prefix).
    """

    def __init__(self, detector: nn.Module, policy: PrecisionPolicy) -> None:
        super().__init__()
        self.detector = detector
        self.policy = policy

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):  # type: ignore[no-untyped-def]
        with self.policy.autocast():
            return self.detector(images, targets)

    def extra_repr(self) -> str:
        return f"policy={self.policy.describe()}"


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    if not isinstance(conv, nn.Conv2d):
        return False
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and not conv.training and norm.track_running_stats


@torch.no_grad()
def _fused(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    if isinstance(norm, nn.BatchNorm2d):
        return fuse_conv_bn_eval(conv, norm)
    # FrozenBatchNorm2d is not a BatchNorm2d (fuse_conv_bn_eval rejects it), but it has the same buffers.
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    )
    return fused


def fold_batch_norms(model: nn.Module) -> int:
    """Fold eligible BN layers into their preceding convs; returns how many were folded.

    Pairs are found structurally: ``convN``/``bnN`` attributes of one module (ResNet blocks and stem)
    and consecutive ``Conv2d`` -> BN entries of any ``nn.Sequential`` (projection shortcuts, FPN and
    head stacks). Each pair becomes the fused conv and an ``Identity``. Training-mode BN (statistics
    still updating) is left alone.
    """
    folded = 0
    for module in list(model.modules()):
        for i in range(1, 4):
            conv, norm = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if norm is not None and _foldable(conv, norm):
                setattr(module, f"conv{i}", _fused(conv, norm))
                setattr(module, f"bn{i}", nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (first_name, first), (second_name, second) in zip(children, children[1:]):
                if _foldable(first, second):
                    module._modules[first_name] = _fused(first, second)
                    module._modules[second_name] = nn.Identity()
                    folded += 1
    return folded


def _to_channels_last(model: nn.Module) -> None:
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "set_channels_last"):
        backbone.set_channels_last()
    elif isinstance(backbone, nn.Module):
        backbone.to(memory_format=torch.channels_last)
    # A convolution with channels-last weights returns channels-last maps whatever its input's format,
    # so the heads need only their weights converted.
    rpn_head = getattr(getattr(model, "rpn", None), "head", None)
    mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    for head in (rpn_head, mask_head):
        if isinstance(head, nn.Module):
            head.to(memory_format=torch.channels_last)


def _swap_in_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, OneDNNLinear.from_linear(child))
        else:
            _swap_in_linears(child)


def _swap_in_fast_modules(model: nn.Module) -> None:
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(roi_heads, RoIHeads) and not isinstance(roi_heads, TopKRoIHeads):
        roi_heads = model.roi_heads = TopKRoIHeads.from_roi_heads(roi_heads)
    if isinstance(roi_heads, nn.Module):
        _swap_in_linears(roi_heads)
        for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
            pooler = getattr(roi_heads, name, None)
            if type(pooler) is MultiScaleRoIAlign:  # a torchvision-built model; build_detector's are sparse already
                setattr(roi_heads, name, SparseMultiScaleRoIAlign.from_pooler(pooler))
        predictor = getattr(roi_heads, "mask_predictor", None)
        if not isinstance(predictor, GemmMaskRCNNPredictor) and GemmMaskRCNNPredictor.supports(predictor):
            roi_heads.mask_predictor = GemmMaskRCNNPredictor.from_predictor(predictor)
    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform) and not isinstance(transform, PasteMasksTransform):
        model.transform = PasteMasksTransform.from_transform(transform)


def optimize_for_inference(
    model: nn.Module,
    *,
    precision: str = "fp32",
    channels_last: bool = True,
    fold_bn: bool = True,
) -> nn.Module:
    """Make a detector faster for inference, in place; returns the model to use (in eval mode).

    Args:
        model: a detector from :func:`detection.build_detector` (any torchvision detector with a
            ``backbone`` works), or an :class:`AutocastDetector` returned by an earlier call.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` (any name of
            :data:`detection.precision.PRECISIONS`) to run convolutions and linear layers under
            autocast. Boxes, scores and masks come out float32 either way. On CPUs without native
            bf16 (AVX512-BF16/AMX) reduced precision is slower than fp32, and a warning says so.
        channels_last: use the channels-last memory format for the backbone, FPN, RPN and mask heads.
        fold_bn: fold frozen / eval-mode BatchNorm into the preceding convolutions.

    Returns:
        In fp32, ``model`` itself, optimised. In reduced precision, an :class:`AutocastDetector`
        holding it: use the returned module. Call it as before: ``model(list_of_images)``.

    Example:
        >>> model = optimize_for_inference(build_detector("mask_rcnn", "resnet50"))  # doctest: +SKIP
    """
    dtype = to_dtype(precision)
    if isinstance(model, AutocastDetector):
        model = model.detector
    model.eval()
    if fold_bn:
        fold_batch_norms(model)
    if channels_last:
        _to_channels_last(model)
    _swap_in_fast_modules(model)
    if dtype == torch.float32:
        return model
    param = next(model.parameters(), None)
    policy = PrecisionPolicy.of(dtype, param.device if param is not None else "cpu")
    return AutocastDetector(model, policy).eval()
