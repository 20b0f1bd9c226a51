"""torchvision's anchor generator and prediction heads, returning float32 under autocast.

Under ``torch.autocast`` torchvision's detectors generate anchors in the feature maps' dtype and
decode boxes from bf16/fp16 regressions, so boxes, scores and masks come out in reduced precision
(bf16 spacing is 4 px for coordinates between 512 and 1024). The subclasses here keep the
convolutions in reduced precision but return their outputs in float32, so box decoding, losses,
NMS and mask pasting run in float32 whatever the autocast dtype:

* :class:`Float32AnchorGenerator` builds anchors in float32 (float64 for float64 feature maps);
* :class:`Float32RPNHead`, :class:`Float32FastRCNNPredictor`, :class:`Float32MaskRCNNPredictor`,
  :class:`Float32KeypointRCNNPredictor`, :class:`Float32RetinaNetHead` and :class:`Float32FCOSHead`
  return float16/bfloat16 outputs as float32; float32 and float64 outputs are returned unchanged,
  so ``model.double()`` runs in float64 end to end.

They are subclasses, not wrappers: parameters, state-dict keys and constructor arguments are
torchvision's, so torchvision checkpoints load unchanged. Each re-implements torchvision's few-line
``forward`` because TorchScript cannot compile ``super().forward(...)``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, RPNHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

__all__ = [
    "Float32AnchorGenerator",
    "Float32FCOSHead",
    "Float32FastRCNNPredictor",
    "Float32KeypointRCNNPredictor",
    "Float32MaskRCNNPredictor",
    "Float32RPNHead",
    "Float32RetinaNetHead",
    "upcast_reduced",
]


def upcast_reduced(t: Tensor) -> Tensor:
    """``t`` as float32 if it is float16 or bfloat16; any other dtype is returned unchanged."""
    if t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        return t.float()
    return t


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` building anchors in float32 (float64 for float64 maps).

    torchvision's builds them in the feature maps' dtype, which is bf16/fp16 under autocast.
    """

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        image_size = image_list.tensors.shape[-2:]
        dtype = torch.float64 if feature_maps[0].dtype == torch.float64 else torch.float32
        device = feature_maps[0].device
        strides = [
            [
                torch.empty((), dtype=torch.int64, device=device).fill_(image_size[0] // g[0]),
                torch.empty((), dtype=torch.int64, device=device).fill_(image_size[1] // g[1]),
            ]
            for g in grid_sizes
        ]
        self.set_cell_anchors(dtype, device)
        anchors_over_all_feature_maps = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(anchors_over_all_feature_maps) for _ in range(len(image_list.image_sizes))]


class Float32RPNHead(RPNHead):
    """torchvision's ``RPNHead`` (``conv_depth=2`` in the v2 models) with float32 objectness and deltas."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits = []
        bbox_reg = []
        for feature in x:
            t = self.conv(feature)
            logits.append(upcast_reduced(self.cls_logits(t)))
            bbox_reg.append(upcast_reduced(self.bbox_pred(t)))
        return logits, bbox_reg


class Float32FastRCNNPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` with float32 class scores and box deltas."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4:
            torch._assert(list(x.shape[2:]) == [1, 1], "the box predictor expects [N, C] or [N, C, 1, 1] inputs")
        x = x.flatten(start_dim=1)
        return upcast_reduced(self.cls_score(x)), upcast_reduced(self.bbox_pred(x))


class Float32MaskRCNNPredictor(MaskRCNNPredictor):
    """torchvision's ``MaskRCNNPredictor`` (2x2 transposed conv, ReLU, 1x1 conv) with float32 mask logits."""

    def forward(self, x: Tensor) -> Tensor:
        return upcast_reduced(self.mask_fcn_logits(self.relu(self.conv5_mask(x))))


class Float32KeypointRCNNPredictor(KeypointRCNNPredictor):
    """torchvision's ``KeypointRCNNPredictor`` with float32 heatmaps (upsampled in float32)."""

    def forward(self, x: Tensor) -> Tensor:
        x = upcast_reduced(self.kps_score_lowres(x))
        return F.interpolate(
            x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False, recompute_scale_factor=False
        )


class Float32RetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` with float32 class logits and box regressions."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        return {
            "cls_logits": upcast_reduced(self.classification_head(x)),
            "bbox_regression": upcast_reduced(self.regression_head(x)),
        }


class Float32FCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` with float32 class logits, box regressions and centerness."""

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_logits = self.classification_head(x)
        bbox_regression, bbox_ctrness = self.regression_head(x)
        return {
            "cls_logits": upcast_reduced(cls_logits),
            "bbox_regression": upcast_reduced(bbox_regression),
            "bbox_ctrness": upcast_reduced(bbox_ctrness),
        }
