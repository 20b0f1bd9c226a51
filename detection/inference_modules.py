"""Drop-in replacements for three torchvision modules, faster in CPU inference, with the same outputs.

:func:`detection.optimize_for_inference` swaps them in by attribute assignment; each is a
subclass of the module it replaces (same constructor, parameters and state-dict keys):

* :class:`ThreadedMultiScaleRoIAlign` (``MultiScaleRoIAlign``): splits each level's RoIs across
  ``torch.get_num_threads()`` threads, where torchvision's RoIAlign kernel runs on one;
* :class:`GemmMaskRCNNPredictor` (``MaskRCNNPredictor``): the 2x2 transposed conv, ReLU and 1x1 conv
  as two matrix products, well below the convolution kernels' cost for many small RoIs;
* :class:`PasteMasksTransform` (``GeneralizedRCNNTransform``): pastes the predicted masks into one
  preallocated tensor (:func:`paste_masks`) instead of one full-image tensor per mask and a stack.

Each computes exactly what the module it replaces computes and falls back to it where the fast
version does not apply (GPU, gradients, one thread).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ._torchvision import expand_boxes, expand_masks, resize_boxes, resize_keypoints
from .heads import Float32MaskRCNNPredictor, upcast_reduced
from .roi_align import ContiguousMaps, ThreadedMultiScaleRoIAlign

__all__ = ["ContiguousMaps", "GemmMaskRCNNPredictor", "PasteMasksTransform", "ThreadedMultiScaleRoIAlign", "paste_masks"]


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
        w1 = deconv.weight.permute(0, 2, 3, 1).reshape(c, 4 * mid)
        y = torch.addmm(deconv.bias.repeat(4), x.permute(0, 2, 3, 1).reshape(-1, c), w1).relu_()
        z = torch.addmm(logits.bias, y.reshape(-1, mid), logits.weight.reshape(classes, mid).t())
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
