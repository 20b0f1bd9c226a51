"""RoIAlign on CPU as a sparse matrix product: torchvision's sampling and weights, on every thread.

torchvision's CPU RoIAlign kernel runs on one thread, reads NCHW (so it copies a channels-last map),
and its backward recomputes every bilinear weight for every channel. Yet each pooled value is a
fixed weighted sum of at most ``4 * sampling_ratio**2`` pixels of one channel, with the same
weights in every channel. So the pooled RoIs of one level are ``S @ F``: ``F`` is the map as a
(pixels x channels) matrix, a view of a channels-last map, and ``S`` is a sparse matrix holding
torchvision's sample positions and bilinear weights (:func:`roi_align_matrix`). The gradient is
``S.T @ G``. Values equal torchvision's up to float rounding (the sums run in another order).

Measured on 2 threads of an AMD EPYC, 800 RoIs of two 800 px images on P2 (2 x 256 x 200 x 200):
torchvision forward 246 ms and backward 492 ms; as sparse products 37 ms and 78 ms, plus 4 ms to
build ``S``.

:class:`SparseMultiScaleRoIAlign` is torchvision's ``MultiScaleRoIAlign`` (same level mapping,
settings and state dict) that pools this way on CPU; the poolers :func:`detection.build_detector`
gives the R-CNNs. On GPU, under TorchScript, tracing (ONNX) and ``torch.compile`` / ``torch.export``,
and with ``sampling_ratio <= 0`` (a sample grid that varies per RoI) it is torchvision's own
multi-scale pooling.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign

from ._torchvision import convert_to_roi_format, filter_input, multiscale_roi_align, setup_scales

__all__ = ["SparseMultiScaleRoIAlign", "ThreadedBackwardMultiScaleRoIAlign", "roi_align", "roi_align_matrix"]


def _sample_axis(start: Tensor, bin_size: Tensor, size: int, bins: int, grid: int) -> tuple[Tensor, ...]:
    """Along one axis, as torchvision's kernel computes them: for each RoI, bin and sample ``[R, bins, grid]``,
    whether the sample is inside the map, its lower and upper pixel, and the upper pixel's weight."""
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None]
    sample = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    step = bin_size[:, None, None]
    pos = start[:, None, None] + bin_index * step + sample * step / grid
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64)
    edge = low >= size - 1  # at the last pixel both neighbours are that pixel
    low = low.clamp(max=size - 1)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    return inside, low, high, frac


def roi_align_matrix(rois: Tensor, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int,
                     aligned: bool, map_shape: tuple[int, int, int]) -> Tensor:
    """The sparse ``(R * out_h * out_w, N * H * W)`` matrix of RoIAlign over an ``N x C x H x W`` map.

    Row ``(r, i, j)`` holds the weights of output bin ``(i, j)`` of RoI ``r``; column ``(n, y, x)`` is
    pixel ``(y, x)`` of image ``n``. The sample positions, border rules and bilinear weights are
    torchvision's (``roi_align`` with ``sampling_ratio > 0``), each divided by the samples per bin.
    Each row has ``4 * sampling_ratio**2`` entries (zero for samples off the map; a pixel may repeat).
    """
    images, height, width = map_shape
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy mode: every RoI at least one pixel wide and high
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    in_y, y_low, y_high, fy = _sample_axis(y1, roi_h / out_h, height, out_h, sampling_ratio)
    in_x, x_low, x_high, fx = _sample_axis(x1, roi_w / out_w, width, out_w, sampling_ratio)
    # The four corners in torchvision's order: (low, low), (low, high), (high, low), (high, high).
    rows = torch.stack([y_low, y_low, y_high, y_high], -1) * width
    rows = rows + rois[:, 0].to(torch.int64)[:, None, None, None] * (height * width)
    cols = torch.stack([x_low, x_high, x_low, x_high], -1)
    wy = torch.stack([1 - fy, 1 - fy, fy, fy], -1) * in_y[..., None]
    wx = torch.stack([1 - fx, fx, 1 - fx, fx], -1) * in_x[..., None]
    # [R, out_h, out_w, sample_y, sample_x, corner]
    weights = wy[:, :, None, :, None, :] * wx[:, None, :, None, :, :] / max(sampling_ratio * sampling_ratio, 1)
    columns = rows[:, :, None, :, None, :] + cols[:, None, :, None, :, :]
    per_row = 4 * sampling_ratio * sampling_ratio
    n_rows = len(rois) * out_h * out_w
    crow = torch.arange(0, n_rows * per_row + 1, per_row, device=rois.device)
    with warnings.catch_warnings():  # torch flags its CSR layout as beta on first use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, columns.reshape(-1), weights.reshape(-1),
                                       (n_rows, images * height * width), check_invariants=False)


def _as_rows(t: Tensor) -> Tensor:
    """An ``N x C x H x W`` tensor as its ``(N * H * W) x C`` matrix (a view when ``t`` is channels-last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _apply_matrix(t: Tensor, rois: Tensor, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int,
                  aligned: bool, map_shape: tuple[int, int, int], transposed: bool) -> Tensor:
    """``S @ rows(t)``, or ``S.T @ rows(t)``, for RoIAlign's matrix ``S``: in float32 for reduced dtypes
    (torchvision's autocast rule for RoIAlign), with autocast off for the product."""
    compute = torch.promote_types(t.dtype, torch.float32)
    with torch.autocast(t.device.type, enabled=False):
        matrix = roi_align_matrix(rois.to(compute), spatial_scale, output_size, sampling_ratio, aligned, map_shape)
        return (matrix.t() if transposed else matrix) @ _as_rows(t.to(compute))


@torch.library.custom_op("detection::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, rois: Tensor, spatial_scale: float, output_h: int, output_w: int,
                  sampling_ratio: int, aligned: bool) -> Tensor:
    images, channels, height, width = input.shape
    pooled = _apply_matrix(input, rois, spatial_scale, (output_h, output_w), sampling_ratio, aligned,
                           (images, height, width), transposed=False)
    return pooled.view(len(rois), output_h, output_w, channels).permute(0, 3, 1, 2).to(input.dtype)


@torch.library.custom_op("detection::roi_align_backward", mutates_args=())
def _roi_align_backward_op(grad: Tensor, rois: Tensor, spatial_scale: float, sampling_ratio: int, aligned: bool,
                           images: int, height: int, width: int) -> Tensor:
    grad_input = _apply_matrix(grad, rois, spatial_scale, (grad.shape[2], grad.shape[3]), sampling_ratio, aligned,
                               (images, height, width), transposed=True)
    return grad_input.view(images, height, width, grad.shape[1]).permute(0, 3, 1, 2).to(grad.dtype)


@_roi_align_op.register_fake
def _(input, rois, spatial_scale, output_h, output_w, sampling_ratio, aligned):  # type: ignore[no-untyped-def]
    return input.new_empty((rois.shape[0], input.shape[1], output_h, output_w))


@_roi_align_backward_op.register_fake
def _(grad, rois, spatial_scale, sampling_ratio, aligned, images, height, width):  # type: ignore[no-untyped-def]
    return grad.new_empty((images, grad.shape[1], height, width))


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, rois, spatial_scale, _, _, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.options = (spatial_scale, sampling_ratio, aligned, input.shape[0], input.shape[2], input.shape[3])
    ctx.dtype = input.dtype


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    (rois,) = ctx.saved_tensors
    grad_input = _roi_align_backward_op(grad.contiguous(memory_format=torch.channels_last), rois, *ctx.options)
    return grad_input.to(ctx.dtype), None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


def roi_align(input: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
              aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (``sampling_ratio > 0``, ``rois`` as ``[K, 5]``) as the sparse products
    ``S @ F`` and, for the gradient, ``S.T @ G`` (an operator of its own, ``detection::roi_align``, so that
    FLOP counters and tracers see one op, not a product with a sparse matrix's dense shape).

    Computed in float32 for bfloat16 / float16 maps and returned in their dtype, as torchvision's
    autocast rule for RoIAlign does (float64 stays float64). The output is channels-last.
    """
    return _roi_align_op(input, rois, float(spatial_scale), int(output_size[0]), int(output_size[1]),
                         int(sampling_ratio), bool(aligned))


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` pooling each level through :func:`roi_align` on CPU.

    Same settings, level mapping (``LevelMapper``) and state dict as torchvision's module; outputs
    and gradients equal its own up to float rounding. On GPU, under TorchScript, tracing and
    compilation, and with ``sampling_ratio <= 0`` it is torchvision's multi-scale pooling.
    """

    @classmethod
    def from_pooler(cls, pooler: MultiScaleRoIAlign) -> SparseMultiScaleRoIAlign:
        """The sparse version of torchvision's ``pooler``: same settings (and level mapping, once inferred)."""
        new = cls(list(pooler.featmap_names), pooler.output_size, pooler.sampling_ratio,
                  canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
        new.scales, new.map_levels = pooler.scales, pooler.map_levels
        return new

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(features, image_shapes, self.canonical_scale,
                                                        self.canonical_level)
        scales, mapper = self.scales, self.map_levels
        assert scales is not None and mapper is not None
        if torch.jit.is_scripting() or features[0].device.type != "cpu" or self.sampling_ratio <= 0:
            return multiscale_roi_align(features, boxes, self.output_size, self.sampling_ratio, scales, mapper)
        return self._pool(features, boxes, scales, mapper)

    @torch.jit.unused
    def _pool(self, features: list[Tensor], boxes: list[Tensor], scales: list[float], mapper: Any) -> Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exporters know torchvision's op, not CSR
            return multiscale_roi_align(features, boxes, self.output_size, self.sampling_ratio, scales, mapper)
        rois = convert_to_roi_format(boxes)
        size = (int(self.output_size[0]), int(self.output_size[1]))
        if len(features) == 1:
            return roi_align(features[0], rois, size, scales[0], self.sampling_ratio)
        levels = mapper(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            if len(index):
                result[index] = roi_align(feature, rois[index], size, scale, self.sampling_ratio)
        return result


#: The earlier name of :class:`SparseMultiScaleRoIAlign`, kept for code that imports it.
ThreadedBackwardMultiScaleRoIAlign = SparseMultiScaleRoIAlign
