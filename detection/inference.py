"""``optimize_for_inference``: a faster eval-only detector with the same outputs.

What it does, in place, to a detector in eval mode:

1. folds every frozen or eval-mode BatchNorm into the convolution before it (the body's blocks and
   stem, and ``Sequential(conv, norm, ...)`` stacks in the FPN and the v2 heads), leaving an
   ``Identity`` where the norm was;
2. converts the convolutional parts (backbone, FPN, RPN head, mask head) to the channels-last memory
   format, which oneDNN (CPU) and cuDNN (tensor cores) run faster;
3. on CPU, where torchvision's RoIAlign kernel runs on one thread, splits each pooler's RoIs across
   ``torch.get_num_threads()`` threads (every RoI is computed exactly as before), and hands the poolers
   contiguous feature maps once rather than letting every call copy them;
4. on CPU, computes the mask predictor (2x2 stride-2 transposed conv, ReLU, 1x1 conv) as two matrix
   products, which runs well below the convolution kernels' cost for many small RoIs;
5. pastes the predicted masks into one preallocated tensor instead of one full-image tensor per mask
   followed by a stack (same interpolation, identical masks);
6. optionally runs the forward pass under autocast (``precision="bf16"`` or ``"fp16"``); boxes, scores
   and masks are still decoded and returned in float32 (see :mod:`detection.amp`).

In fp32 mode the outputs match the unoptimised model to about 1e-4 (folding reorders float operations).
The folded model is for inference only: training it again would train the folded weights without
normalisation.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from .amp import autocast, decode_in_float32

__all__ = ["fold_batch_norms", "optimize_for_inference", "paste_masks"]

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _foldable(norm: nn.Module) -> bool:
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.track_running_stats


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    eps = norm.eps
    scale = norm.weight * (norm.running_var + eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype).clone(), requires_grad=False)
    else:
        conv.bias.mul_(scale).add_(shift)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold eligible BN layers into their preceding convs, in place; returns how many were folded.

    Pairs are found structurally: ``convN``/``bnN`` attributes of one module (ResNet blocks and stem)
    and consecutive ``Conv2d`` -> BN entries of any ``nn.Sequential`` (projection shortcuts, FPN and
    head stacks). Training-mode BN (statistics still updating) is left alone.
    """
    folded = 0
    for module in list(model.modules()):
        for i in range(1, 4):
            conv, norm = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and norm is not None and _foldable(norm):
                _fold(conv, norm)
                setattr(module, f"bn{i}", nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (_, first), (second_name, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and _foldable(second):
                    _fold(first, second)
                    module._modules[second_name] = nn.Identity()
                    folded += 1
    return folded


def channels_last_input(module: nn.Module) -> None:
    """Patch ``module.forward`` to convert its (batched, 4-D) input to the channels-last format."""
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(x: torch.Tensor):  # type: ignore[no-untyped-def]
        return forward(x.contiguous(memory_format=torch.channels_last))

    module.forward = wrapped


_EXECUTOR_LOCK = threading.Lock()
_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(workers: int) -> ThreadPoolExecutor:
    with _EXECUTOR_LOCK:
        if workers not in _EXECUTORS:
            _EXECUTORS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align")
        return _EXECUTORS[workers]


def _roi_align_job(inference: bool, amp: torch.dtype | None, *args: Any) -> torch.Tensor:
    # Grad, inference and autocast modes are thread-local: run the worker in the caller's.
    amp_ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.inference_mode(inference), torch.no_grad(), amp_ctx:
        return roi_align(*args)


def _threaded_roi_pool(pooler: MultiScaleRoIAlign) -> None:
    """Patch ``pooler.forward`` to run RoIAlign on several threads for CPU inference.

    The same arithmetic as torchvision's ``MultiScaleRoIAlign`` (same level mapping, same kernel per
    RoI), so outputs are identical; only the RoIs of each level are split into chunks that run
    concurrently (the kernel releases the GIL). Falls back to the original forward on GPU, when
    gradients are needed, or with one thread.
    """
    forward = pooler.forward

    @functools.wraps(forward)
    def threaded(x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        workers = torch.get_num_threads()
        features = _filter_input(x, pooler.featmap_names)
        if workers < 2 or features[0].device.type != "cpu" or (torch.is_grad_enabled() and features[0].requires_grad):
            return forward(x, boxes, image_shapes)
        if pooler.scales is None or pooler.map_levels is None:
            pooler.scales, pooler.map_levels = _setup_scales(
                features, image_shapes, pooler.canonical_scale, pooler.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            levels = torch.zeros(len(rois), dtype=torch.int64)
        else:
            levels = pooler.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *pooler.output_size))
        pool, inference = _executor(workers), torch.is_inference_mode_enabled()
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        jobs = []
        for level, (feature, scale) in enumerate(zip(features, pooler.scales)):
            idx = torch.where(levels == level)[0]
            for chunk in idx.tensor_split(workers):
                if len(chunk):
                    jobs.append((chunk, pool.submit(_roi_align_job, inference, amp, feature, rois[chunk],
                                                    pooler.output_size, scale, pooler.sampling_ratio)))
        for chunk, job in jobs:
            result[chunk] = job.result().to(result.dtype)
        return result

    pooler.forward = threaded


def _contiguous_features(roi_heads: nn.Module) -> None:
    """Patch ``roi_heads.forward`` so its poolers get contiguous (NCHW) feature maps, converted once.

    RoIAlign reads NCHW; given channels-last maps it copies the whole map on every call (one per
    level and pooler).
    """
    forward = roi_heads.forward

    @functools.wraps(forward)
    def wrapped(features: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        features = type(features)((k, v.contiguous()) for k, v in features.items())
        return forward(features, *args, **kwargs)

    roi_heads.forward = wrapped


def _gemm_mask_predictor(predictor: nn.Module) -> bool:
    """Patch torchvision's ``MaskRCNNPredictor`` (ConvTranspose 2x2/2, ReLU, 1x1 conv) to run as two
    matrix products on CPU. Returns whether the module had that structure."""
    deconv, relu, logits = (getattr(predictor, n, None) for n in ("conv5_mask", "relu", "mask_fcn_logits"))
    if not (
        isinstance(deconv, nn.ConvTranspose2d) and isinstance(relu, nn.ReLU) and isinstance(logits, nn.Conv2d)
        and deconv.kernel_size == (2, 2) and deconv.stride == (2, 2) and deconv.padding == (0, 0)
        and deconv.output_padding == (0, 0) and deconv.groups == 1 and deconv.dilation == (1, 1)
        and deconv.bias is not None and logits.kernel_size == (1, 1) and logits.groups == 1
        and logits.bias is not None and len(predictor._modules) == 3
    ):
        return False
    forward = predictor.forward

    @functools.wraps(forward)
    def gemm(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and deconv.weight.requires_grad):
            return forward(x)
        n, c, h, w = x.shape
        mid, classes = deconv.out_channels, logits.out_channels
        # out[n, o, 2i+a, 2j+b] = sum_c x[n, c, i, j] * W[c, o, a, b] + bias[o]: one GEMM whose rows are
        # pixels (n, i, j) and whose columns are (a, b, o); the 1x1 conv is a second GEMM per output pixel.
        w1 = deconv.weight.permute(0, 2, 3, 1).reshape(c, 4 * mid)
        y = torch.addmm(deconv.bias.repeat(4), x.permute(0, 2, 3, 1).reshape(-1, c), w1).relu_()
        z = torch.addmm(logits.bias, y.reshape(-1, mid), logits.weight.reshape(classes, mid).t())
        return z.reshape(n, h, w, 2, 2, classes).permute(0, 5, 1, 3, 2, 4).reshape(n, classes, 2 * h, 2 * w)

    predictor.forward = gemm
    return True


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], padding: int = 1) -> torch.Tensor:
    """Paste ``(N, 1, M, M)`` mask probabilities into ``(N, 1, H, W)`` images, like torchvision's
    ``paste_masks_in_image`` (same padding, box expansion and bilinear resize, so identical values),
    but writing into one preallocated tensor rather than stacking ``N`` full-image copies."""
    masks, scale = expand_masks(masks, padding=padding)
    boxes = expand_boxes(boxes, scale).to(dtype=torch.int64)
    im_h, im_w = image_size
    out = masks.new_zeros((len(masks), 1, im_h, im_w))
    for i, (bx0, by0, bx1, by1) in enumerate(boxes.tolist()):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(masks[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, im_w), max(by0, 0), min(by1 + 1, im_h)
        out[i, 0, y0:y1, x0:x1] = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return out


def _fast_postprocess(transform: nn.Module) -> None:
    """Patch ``GeneralizedRCNNTransform.postprocess`` to paste masks with :func:`paste_masks`."""
    postprocess = transform.postprocess

    @functools.wraps(postprocess)
    def fast(result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
             original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        if transform.training:
            return postprocess(result, image_shapes, original_image_sizes)
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original)
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], size, original)
        return result

    transform.postprocess = fast


def _channels_last_module(module: nn.Module) -> None:
    module.to(memory_format=torch.channels_last)
    channels_last_input(module)


def optimize_for_inference(
    model: nn.Module,
    *,
    precision: Precision = "fp32",
    channels_last: bool = True,
    fold_bn: bool = True,
) -> nn.Module:
    """Make a detector faster for inference, in place; returns it (in eval mode).

    Args:
        model: a detector from :func:`detection.build_detector` (any torchvision detector with a
            ``backbone`` works; float32 decoding hooks are added if missing).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run convolutions and linear layers under
            autocast. Boxes, scores and masks come out float32 either way. On CPUs without native
            bf16 (AVX512-BF16/AMX) reduced precision is slower than fp32, and a warning says so.
        channels_last: use the channels-last memory format for the backbone and FPN.
        fold_bn: fold frozen / eval-mode BatchNorm into the preceding convolutions.

    Returns:
        ``model``, optimised. Call it as before: ``model(list_of_images)``.

    Example:
        >>> model = optimize_for_inference(build_detector("mask_rcnn", "resnet50").eval())  # doctest: +SKIP
    """
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {list(_DTYPES)}, got {precision!r}")
    model.eval()
    decode_in_float32(model)
    if fold_bn:
        fold_batch_norms(model)
    backbone = getattr(model, "backbone", None)
    if channels_last and backbone is not None:
        _channels_last_module(backbone)
    rpn_head = getattr(getattr(model, "rpn", None), "head", None)
    roi_heads = getattr(model, "roi_heads", None)
    mask_head = getattr(roi_heads, "mask_head", None)
    if channels_last:
        if isinstance(rpn_head, nn.Module):
            rpn_head.to(memory_format=torch.channels_last)  # its inputs are the (channels-last) FPN maps
        if isinstance(mask_head, nn.Module):
            _channels_last_module(mask_head)
    if isinstance(roi_heads, nn.Module):
        _contiguous_features(roi_heads)
        for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
            pooler = getattr(roi_heads, name, None)
            if isinstance(pooler, MultiScaleRoIAlign):
                _threaded_roi_pool(pooler)
        predictor = getattr(roi_heads, "mask_predictor", None)
        if isinstance(predictor, nn.Module):
            _gemm_mask_predictor(predictor)
    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform):
        _fast_postprocess(transform)
    if precision != "fp32":
        param = next(model.parameters())
        device = param.device
        if device.type == "cpu" and precision == "bf16":
            from .amp import cpu_has_native_bf16

            if not cpu_has_native_bf16():
                warnings.warn(
                    "this CPU has no native bfloat16 (AVX512-BF16/AMX): bf16 inference runs slow reference "
                    "kernels here and will be slower than fp32",
                    stacklevel=2,
                )
        forward = model.forward
        dtype = _DTYPES[precision]

        @functools.wraps(forward)
        def reduced(*args, **kwargs):  # type: ignore[no-untyped-def]
            with autocast(device, True, dtype):
                return forward(*args, **kwargs)

        model.forward = reduced
    model._optimized_for_inference = precision
    return model
