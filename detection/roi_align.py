"""RoIAlign on several CPU threads, forward and backward, with torchvision's kernels and results.

torchvision's CPU RoIAlign kernels (``torchvision::roi_align`` and ``_roi_align_backward``) run on
one thread, and in a Mask R-CNN training step they are a quarter to a third of the time.
:func:`threaded_roi_align` runs the same kernels on chunks of the RoIs concurrently (the kernels
release the GIL):

* forward: each level's RoIs are split into ``workers`` chunks, each pooled into its rows of the
  output;
* backward: each level's RoIs are grouped by image, and each group's gradient is computed by the
  kernel for that image alone and written to that image's slice of the level's gradient. Within an
  image the RoIs keep their order, so the kernel sums into each pixel in torchvision's order and
  the gradient is bit-identical. With more workers than images, an image's RoIs are split further
  and the pieces' gradients summed (equal up to float summation order).

:class:`ThreadedMultiScaleRoIAlign` is torchvision's ``MultiScaleRoIAlign`` on top of it, the pooler
:func:`detection.build_detector` gives the R-CNNs.
"""

import math
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torchvision.ops import MultiScaleRoIAlign

from ._torchvision import convert_to_roi_format, filter_input, multiscale_roi_align, setup_scales

__all__ = ["ContiguousMaps", "ThreadedMultiScaleRoIAlign", "threaded_roi_align"]

Executor = Callable[[int], ThreadPoolExecutor]


class ContiguousMaps:
    """Contiguous (NCHW) copies of feature maps, in a given dtype, made once per map and shared by the
    poolers that hold it.

    RoIAlign reads contiguous maps and copies a channels-last map on every call (under autocast it also
    casts to float32 on every call); the box and mask poolers of one model read the same maps. A copy
    lives as long as the map it was made from (a weak reference drops it with the map), so maps must not
    change in place between the poolers' calls, which holds within a detector's forward. A copy made
    without gradients is not reused where gradients are needed, nor the other way round. Pickled or
    deep-copied, it starts empty.
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[weakref.ref, Tensor]] = {}

    def __call__(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = t.dtype if dtype is None else dtype
        if t.is_contiguous() and t.dtype == dtype:
            return t
        key = id(t)
        entry = self._copies.get(key)
        tracked = torch.is_grad_enabled() and t.requires_grad
        if entry is not None and entry[0]() is t and entry[1].dtype == dtype and entry[1].requires_grad == tracked:
            return entry[1]
        copy = t.to(dtype=dtype, memory_format=torch.contiguous_format)
        self._copies[key] = (weakref.ref(t, lambda _, key=key: self._copies.pop(key, None)), copy)
        return copy

    def __len__(self) -> int:
        return len(self._copies)

    def __reduce__(self) -> tuple[type, tuple]:
        return ContiguousMaps, ()


def _pool_rois(out: Tensor, index: Tensor, feature: Tensor, rois: Tensor, scale: float, output_size: tuple[int, int],
               sampling_ratio: int, aligned: bool, inference: bool) -> None:
    """Worker: ``out[index] = roi_align(feature, rois[index])``."""
    # Grad and inference modes are thread-local: run the worker in the caller's.
    with torch.inference_mode(inference), torch.no_grad():
        pooled = torch.ops.torchvision.roi_align(feature, rois[index].to(feature.dtype), scale, output_size[0],
                                                 output_size[1], sampling_ratio, aligned)
        out[index] = pooled.to(out.dtype)


def _pool_rois_backward(grad: Tensor, rois: Tensor, index: Tensor, scale: float, shape: tuple[int, int, int],
                        sampling_ratio: int, aligned: bool, into: Tensor | None) -> Tensor:
    """Worker: the gradient ``[1, C, H, W]`` of one image's map from ``rois[index]`` (all of that image),
    written into ``into`` when given."""
    with torch.no_grad():
        rois = rois[index]
        rois[:, 0] = 0  # the kernel sees that image alone
        out = torch.ops.torchvision._roi_align_backward(grad[index], rois, scale, grad.shape[2], grad.shape[3], 1,
                                                        *shape, sampling_ratio, aligned)
        if into is not None:
            into.copy_(out[0])
    return out


class _ThreadedRoIAlign(torch.autograd.Function):
    """RoIAlign over several levels at once, each RoI read from the level ``levels`` gives it."""

    @staticmethod
    def forward(ctx: FunctionCtx, executor: Executor, workers: int, rois: Tensor, levels: Tensor,
                scales: tuple[float, ...], output_size: tuple[int, int], sampling_ratio: int, aligned: bool,
                *features: Tensor) -> Tensor:
        first = features[0]
        per_level = [torch.where(levels == level)[0] for level in range(len(features))]
        shape = (len(rois), first.shape[1], *output_size)
        covered = sum(len(index) for index in per_level) == len(rois)
        out = first.new_empty(shape) if covered else first.new_zeros(shape)
        pool, inference = executor(workers), torch.is_inference_mode_enabled()
        jobs = [
            pool.submit(_pool_rois, out, chunk, feature, rois, scale, output_size, sampling_ratio, aligned, inference)
            for index, feature, scale in zip(per_level, features, scales)
            for chunk in index.tensor_split(workers) if len(chunk)
        ]
        for job in jobs:
            job.result()
        ctx.save_for_backward(rois, levels)
        ctx.setup = (executor, workers, scales, sampling_ratio, aligned, [tuple(f.shape) for f in features])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        executor, workers, scales, sampling_ratio, aligned, shapes = ctx.setup
        head: tuple[None, ...] = (None,) * 8
        if grad is None:
            return head + (None,) * len(shapes)
        rois, levels = ctx.saved_tensors
        grad = grad.contiguous()
        images = rois[:, 0].long()
        pool = executor(workers)
        grads, sums = [], []
        for level, (scale, shape) in enumerate(zip(scales, shapes)):
            index = torch.where(levels == level)[0]
            if not len(index):
                grads.append(None)
                continue
            index = index[torch.argsort(images[index], stable=True)]  # by image, in RoI order within each
            counts = torch.bincount(images[index], minlength=shape[0]).tolist()
            level_grad = grad.new_empty(shape)
            pieces = max(1, math.ceil(workers / shape[0]))
            for image, group in enumerate(index.split(counts)):
                if not len(group):
                    level_grad[image].zero_()
                    continue
                parts = group.tensor_split(min(pieces, len(group)))
                into = level_grad[image] if len(parts) == 1 else None
                jobs = [pool.submit(_pool_rois_backward, grad, rois, p, scale, shape[1:], sampling_ratio, aligned, into)
                        for p in parts]
                if into is None:
                    sums.append((level_grad[image], jobs))
                else:
                    sums.append((None, jobs))
            grads.append(level_grad)
        for target, jobs in sums:
            results = [job.result() for job in jobs]
            if target is not None:
                target.copy_(results[0][0])
                for part in results[1:]:
                    target.add_(part[0])
        return head + tuple(grads)


def threaded_roi_align(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    executor: Executor,
    workers: int,
) -> Tensor:
    """RoIAlign of ``rois`` ``[K, 5]`` (image index, x1, y1, x2, y2) from ``features[levels[k]]``, on
    ``workers`` threads from ``executor(workers)``; differentiable with respect to the features.

    ``features`` are ``[N, C, H_l, W_l]`` maps of one dtype, read in place if contiguous (else copied);
    ``levels`` ``[K]`` int64 in ``[0, len(features))`` (a RoI with another level gets zeros, as in
    torchvision). Returns ``[K, C, *output_size]`` in the features' dtype: what torchvision's
    ``roi_align`` gives for each RoI from its level, with the same gradients.
    """
    features = [f.contiguous() for f in features]
    return _ThreadedRoIAlign.apply(executor, workers, rois.contiguous(), levels, tuple(scales), tuple(output_size),
                                   sampling_ratio, aligned, *features)


def _autocast_float32(dtype: torch.dtype) -> bool:
    """Whether torchvision's RoIAlign would cast a map of ``dtype`` to float32 here (its autocast rule)."""
    return torch.is_autocast_enabled("cpu") and dtype.is_floating_point and dtype != torch.float64


class ThreadedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` running RoIAlign, forward and backward, on several CPU threads.

    The same constructor, level mapping and kernels as torchvision's, so outputs are identical and
    gradients equal (see :func:`threaded_roi_align`); only each level's RoIs are split into chunks that
    run concurrently on ``torch.get_num_threads()`` threads. Feature maps are made contiguous once per
    map (in float32 under autocast, where torchvision's RoIAlign casts them on every call) through
    ``maps``, a :class:`ContiguousMaps` that the poolers of one model can share. Runs torchvision's
    forward on GPU, with one thread, under TorchScript (it scripts like torchvision's) and when traced
    or compiled.

    The thread pool is created on first use and shut down by :meth:`close`, or when the module is
    garbage-collected; it is neither pickled nor deep-copied (a copy makes its own).

    Example:
        >>> pooler = ThreadedMultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
        >>> pooler(features, proposals, image_sizes).shape  # doctest: +SKIP
        torch.Size([K, 256, 7, 7])
    """

    __annotations__ = dict(MultiScaleRoIAlign.__annotations__)

    def __init__(self, *args: Any, maps: ContiguousMaps | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.maps = maps if maps is not None else ContiguousMaps()
        self._reset_pool()

    @classmethod
    def from_pooler(cls, pooler: MultiScaleRoIAlign, maps: ContiguousMaps | None = None) -> "ThreadedMultiScaleRoIAlign":
        """The threaded version of ``pooler``, with the same settings (and level mapping, once inferred)."""
        new = cls(list(pooler.featmap_names), pooler.output_size, pooler.sampling_ratio, maps=maps,
                  canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
        new.scales, new.map_levels = pooler.scales, pooler.map_levels
        return new

    def _reset_pool(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_finalizer: weakref.finalize | None = None
        self._pool_lock = threading.Lock()

    @torch.jit.unused
    def _executor(self, workers: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None or self._pool._max_workers != workers:
                self.close()
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roi_align")
                self._pool_finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool

    @torch.jit.unused
    def close(self) -> None:
        """Shut the thread pool down (a later call starts a new one)."""
        if self._pool_finalizer is not None:
            self._pool_finalizer.detach()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool, self._pool_finalizer = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for key in ("_pool", "_pool_finalizer", "_pool_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_pool()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool ``boxes`` (per image ``[K_i, 4]`` xyxy in input pixels) into ``[sum K_i, C, *output_size]``."""
        features = filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(features, image_shapes, self.canonical_scale,
                                                        self.canonical_level)
        if not torch.jit.is_scripting():
            if self._threads_apply(features):
                return self._threaded_forward(features, boxes)
        return multiscale_roi_align(features, boxes, self.output_size, self.sampling_ratio, self.scales,
                                    self.map_levels)

    @torch.jit.unused
    def _threads_apply(self, features: list[Tensor]) -> bool:
        return (torch.get_num_threads() > 1 and features[0].device.type == "cpu" and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling())

    @torch.jit.unused
    def _threaded_forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        dtype = features[0].dtype
        read = [self.maps(f, torch.float32 if _autocast_float32(f.dtype) else f.dtype) for f in features]
        rois = convert_to_roi_format(boxes)
        if len(features) > 1:
            levels = self.map_levels(boxes)
        else:
            levels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        out = threaded_roi_align(read, rois.to(read[0].dtype), levels, self.scales, self.output_size,
                                 self.sampling_ratio, False, self._executor, torch.get_num_threads())
        return out.to(dtype)
