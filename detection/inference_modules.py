"""Drop-in replacements for torchvision modules, faster in CPU inference, with the same outputs.

:func:`detection.optimize_for_inference` swaps them in by attribute assignment; each is a
subclass of the module it replaces (same constructor, parameters and state-dict keys):

* :class:`GemmMaskRCNNPredictor` (``MaskRCNNPredictor``): the 2x2 transposed conv, ReLU and 1x1 conv
  as two matrix products, well below the convolution kernels' cost for many small RoIs;
* :class:`PasteMasksTransform` (``GeneralizedRCNNTransform``): pastes the predicted masks into one
  preallocated tensor (:func:`paste_masks`) instead of one full-image tensor per mask and a stack;
* :class:`TopKRoIHeads` (``RoIHeads``): per-class NMS only over as many of the highest scores as it
  takes to fill ``detections_per_img`` (:func:`batched_nms_top_k`), not over every class of every box;
* :class:`OneDNNLinear` (``nn.Linear``): the box head's matrix products through oneDNN (:func:`cpu_linear`).

Each computes what the module it replaces computes (to float rounding) and falls back to it where
the fast version does not apply (GPU, gradients). The RoI poolers the fast path uses are
:class:`detection.roi_align.SparseMultiScaleRoIAlign`, which :func:`detection.build_detector` gives
every R-CNN.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from ._torchvision import batched_nms_vanilla, expand_boxes, expand_masks, resize_boxes, resize_keypoints
from .heads import Float32MaskRCNNPredictor, upcast_reduced

__all__ = [
    "GemmMaskRCNNPredictor",
    "OneDNNLinear",
    "PasteMasksTransform",
    "TopKRoIHeads",
    "batched_nms_top_k",
    "cpu_linear",
    "paste_masks",
]


class GemmMaskRCNNPredictor(Float32MaskRCNNPredictor):
    """The mask predictor computed as two matrix products on CPU without gradients.

    Same parameters, keys and (float32) outputs as :class:`~detection.heads.Float32MaskRCNNPredictor`;
    on GPU or with gradients it runs the convolutions.
    """

    @staticmethod
    def supports(predictor: nn.Module) -> bool:
        """Whether ``predictor`` is a ``MaskRCNNPredictor`` of torchvision's structure (2x2/2 deconv, ReLU, 1x1 conv)."""
        deconv, relu, logits = (getattr(predictor, n, None) for n in ("conv5_mask", "relu", "mask_fcn_logits"))
        return (
            isinstance(deconv, nn.ConvTranspose2d) and isinstance(relu, nn.ReLU) and isinstance(logits, nn.Conv2d)
            and deconv.kernel_size == (2, 2) and deconv.stride == (2, 2) and deconv.padding == (0, 0)
            and deconv.output_padding == (0, 0) and deconv.groups == 1 and deconv.dilation == (1, 1)
            and deconv.bias is not None and logits.kernel_size == (1, 1) and logits.groups == 1
            and logits.bias is not None and len(predictor._modules) == 3
        )

    @classmethod
    def from_predictor(cls, predictor: nn.Module) -> GemmMaskRCNNPredictor:
        """The GEMM version of ``predictor``, sharing its layers (see :meth:`supports`)."""
        if not cls.supports(predictor):
            raise ValueError(f"{type(predictor).__name__} is not a MaskRCNNPredictor (2x2/2 deconv, ReLU, 1x1 conv)")
        new = cls.__new__(cls)
        # Sequential's constructor takes the existing layers; MaskRCNNPredictor's would make new ones.
        nn.Sequential.__init__(new, OrderedDict(predictor.named_children()))
        return new

    def forward(self, x: Tensor) -> Tensor:
        deconv, logits = self.conv5_mask, self.mask_fcn_logits
        if x.device.type != "cpu" or (torch.is_grad_enabled() and deconv.weight.requires_grad):
            return super().forward(x)
        n, c, h, w = x.shape
        mid, classes = deconv.out_channels, logits.out_channels
        # out[n, o, 2i+a, 2j+b] = sum_c x[n, c, i, j] * W[c, o, a, b] + bias[o]: one GEMM whose rows are
        # pixels (n, i, j) and whose columns are (a, b, o); the 1x1 conv is a second GEMM per output pixel.
        w1 = deconv.weight.permute(2, 3, 1, 0).reshape(4 * mid, c)
        y = cpu_linear(x.permute(0, 2, 3, 1).reshape(-1, c), w1, deconv.bias.repeat(4)).relu_()
        z = cpu_linear(y.reshape(-1, mid), logits.weight.reshape(classes, mid), logits.bias)
        z = z.reshape(n, h, w, 2, 2, classes).permute(0, 5, 1, 3, 2, 4).reshape(n, classes, 2 * h, 2 * w)
        return upcast_reduced(z)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
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


class PasteMasksTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` whose ``postprocess`` pastes masks with :func:`paste_masks`."""

    @classmethod
    def from_transform(cls, transform: GeneralizedRCNNTransform) -> PasteMasksTransform:
        """The same resizing and normalisation as ``transform``."""
        new = cls(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                  size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
                  _skip_resize=transform._skip_resize)
        return new.train(transform.training)

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original)
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], size, original)
        return result


try:  # oneDNN's linear kernel, the one torch.compile's CPU backend calls; absent from builds without oneDNN
    _onednn_linear = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):
    _onednn_linear = None


def cpu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN on CPU where no gradient is needed.

    For float32, ``F.linear`` calls MKL's GEMM, which takes its AVX2 code path on AMD CPUs; oneDNN's
    uses AVX-512 there and runs the box head's products about 2x faster (AMD EPYC, 2 threads: fc6 of
    the R50-FPN box head, 1000 x 12544 by 12544 x 1024, 119 ms in MKL, 58 ms in oneDNN).
    Under CPU autocast the operands are cast as autocast casts them for ``F.linear``.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if _onednn_linear is None or x.device.type != "cpu" or needs_grad:
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`cpu_linear`: same parameters, keys and outputs."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneDNNLinear:
        """A layer sharing ``linear``'s parameters."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return cpu_linear(x, self.weight, self.bias)


#: torchvision's ``batched_nms`` runs one NMS over class-offset boxes up to this many box coordinates on
#: CPU, and one NMS per class above it; :func:`batched_nms_top_k` defers to it up to there.
TORCHVISION_SINGLE_NMS_NUMEL = 4000


def batched_nms_top_k(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, k: int) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]``, running NMS only on as many
    of the highest scores as it takes to keep ``k`` boxes.

    Greedy NMS decides each box from the higher-scored boxes of its class alone, so NMS over the ``n``
    highest scores (and every score tied with the n-th) keeps exactly the boxes that full NMS keeps
    among them; once that is ``k`` boxes, no lower score can reach the top ``k``. ``n`` starts at
    ``8 k`` and doubles. Each round calls torchvision's own per-class NMS.
    """
    total = len(scores)
    if boxes.numel() <= TORCHVISION_SINGLE_NMS_NUMEL or 8 * k >= total or torch.jit.is_tracing():
        return batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    order = scores.argsort(descending=True)
    n = 8 * k
    while n < total:
        top = order[: int((scores >= scores[order[n - 1]]).sum())]
        keep = batched_nms_vanilla(boxes[top], scores[top], idxs[top], iou_threshold)
        if len(keep) >= k:
            return top[keep[:k]]
        n = 2 * len(top)
    return batched_nms(boxes, scores, idxs, iou_threshold)[:k]


class TopKRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose ``postprocess_detections`` runs NMS through :func:`batched_nms_top_k`.

    With a low ``score_thresh`` every class of every proposal is a candidate (90,000 for COCO's
    1,000 proposals) and per-class NMS over all of them costs more than the box head; the
    ``detections_per_img`` that come out are the same.
    """

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads) -> TopKRoIHeads:
        """The same heads, submodules and settings as ``roi_heads`` (its state is shared, not copied)."""
        new = cls.__new__(cls)
        # RoIHeads' constructor rebuilds its matcher, sampler and box coder from numbers; taking over the
        # module's state keeps every setting, including any a later torchvision adds. The module's own
        # tables (submodules, hooks) are copied, so swapping a submodule of one leaves the other as it was.
        new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in roi_heads.__dict__.items()})
        return new

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        per_image = [len(p) for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(per_image)
        all_scores = F.softmax(class_logits, -1).split(per_image)
        results: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for boxes, scores, shape in zip(all_boxes, all_scores, image_shapes):
            boxes, scores, labels = self._candidates(clip_boxes_to_image(boxes, shape), scores)
            keep = batched_nms_top_k(boxes, scores, labels, self.nms_thresh, self.detections_per_img)
            for result, t in zip(results, (boxes, scores, labels)):
                result.append(t[keep])
        return results

    def _candidates(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every (box, class) pair of one image as torchvision's ``postprocess_detections`` lists them:
        background dropped, then scores at or below ``score_thresh``, then boxes under 0.01 px."""
        labels = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size=1e-2)
        return boxes[keep], scores[keep], labels[keep]
