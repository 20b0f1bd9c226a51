"""RoIAlign for CPU training whose backward runs the images of a batch on separate threads.

torchvision's CPU RoIAlign backward (``torchvision::_roi_align_backward``) runs on one thread; in a
Mask R-CNN R50-FPN training step at 800 px it is about a tenth of the time in float32 and a quarter
under bf16 autocast. :class:`RoIAlignFunction` keeps torchvision's forward and computes the gradient
of each image with torchvision's backward kernel, applied to that image's RoIs alone, the images on
separate threads (the kernel releases the GIL). Within an image the RoIs keep their order, so each
pixel's gradient is summed in torchvision's order: the result is bit-identical.

:class:`ThreadedBackwardMultiScaleRoIAlign` is torchvision's ``MultiScaleRoIAlign`` (same level
mapping, outputs and state dict) that pools through it where the features need gradients on CPU; the
poolers :func:`detection.build_detector` gives the R-CNNs. Levels with little work (under
:data:`MIN_SPLIT_ELEMENTS` pooled values, such as every level of the quickstart) keep torchvision's
single call, where handing work to a thread costs more than it saves.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ._torchvision import convert_to_roi_format, filter_input, multiscale_roi_align, setup_scales

__all__ = ["MIN_SPLIT_ELEMENTS", "RoIAlignFunction", "ThreadedBackwardMultiScaleRoIAlign"]

#: A level's backward is split by image when its gradient holds at least this many pooled values
#: (RoIs x channels x output height x width).
MIN_SPLIT_ELEMENTS = 1 << 20

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared worker threads for the per-image backward (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align_backward")
        return _pool


def _image_gradient(grad: Tensor, rois: Tensor, image: int, shape: tuple[int, int, int], options: tuple) -> Tensor:
    """torchvision's backward kernel on the RoIs of one image: that image's ``[1, C, H, W]`` gradient."""
    output_size, spatial_scale, sampling_ratio, aligned = options
    index = torch.where(rois[:, 0] == image)[0]
    own = rois[index].clone()
    own[:, 0] = 0
    channels, height, width = shape
    with torch.no_grad():
        return torch.ops.torchvision._roi_align_backward(
            grad[index], own, spatial_scale, output_size[0], output_size[1], 1, channels, height, width,
            sampling_ratio, aligned,
        )


class RoIAlignFunction(torch.autograd.Function):
    """``torchvision.ops.roi_align`` whose backward computes each image's gradient on its own thread.

    The forward is torchvision's call (under autocast too: float32 inside, the input's dtype out), and
    the gradient is torchvision's kernel's, bit for bit: computed in float32 for bfloat16 or float16
    maps and returned in their dtype, as torchvision's autocast rule gives it.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.shape, ctx.dtype = tuple(input.shape), input.dtype
        ctx.options = (output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        images, shape = ctx.shape[0], ctx.shape[1:]
        compute = torch.promote_types(ctx.dtype, torch.float32)  # float32 for bf16/fp16 maps, as autocast does
        grad, rois = grad.to(compute).contiguous(), rois.to(compute)
        workers = min(images, torch.get_num_threads())
        if workers < 2 or grad.numel() < MIN_SPLIT_ELEMENTS:
            output_size, spatial_scale, sampling_ratio, aligned = ctx.options
            grad_input = torch.ops.torchvision._roi_align_backward(
                grad, rois, spatial_scale, output_size[0], output_size[1], *ctx.shape, sampling_ratio, aligned
            )
        else:  # images round-robin over the threads; this thread takes the first share
            def share(first: int) -> list[Tensor]:
                return [_image_gradient(grad, rois, image, shape, ctx.options) for image in range(first, images, workers)]

            jobs = [_executor(workers - 1).submit(share, first) for first in range(1, workers)]
            shares = [share(0)] + [job.result() for job in jobs]
            grad_input = torch.cat([shares[image % workers][image // workers] for image in range(images)])
        return grad_input.to(ctx.dtype), None, None, None, None, None


class ThreadedBackwardMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` whose CPU backward runs the images on separate threads.

    Same settings, level mapping (``LevelMapper``), outputs, gradients (bit-identical) and state dict
    as torchvision's module. When the features are on CPU and need gradients, each level's RoIs are
    pooled through :class:`RoIAlignFunction`; otherwise (evaluation, GPU, TorchScript, ONNX) by
    torchvision's own multi-scale pooling.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(features, image_shapes, self.canonical_scale,
                                                        self.canonical_level)
        scales, mapper = self.scales, self.map_levels
        assert scales is not None and mapper is not None
        if (torch.jit.is_scripting() or features[0].device.type != "cpu"
                or not (torch.is_grad_enabled() and features[0].requires_grad)):
            return multiscale_roi_align(features, boxes, self.output_size, self.sampling_ratio, scales, mapper)
        return self._pool_with_threaded_backward(features, boxes, scales, mapper)

    @torch.jit.unused
    def _pool_with_threaded_backward(self, features: list[Tensor], boxes: list[Tensor], scales: list[float],
                                     mapper: Any) -> Tensor:
        rois = convert_to_roi_format(boxes)
        levels = mapper(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        size = (int(self.output_size[0]), int(self.output_size[1]))
        result = features[0].new_zeros((len(rois), features[0].shape[1], *size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            pooled = RoIAlignFunction.apply(feature, rois[index], size, scale, self.sampling_ratio, False)
            result[index] = pooled.to(result.dtype)
        return result
