"""``model.head``: the plain-value options of torchvision's detector classes and of ``build_detector``.

Every field defaults to ``None``, which keeps the default of torchvision's class (``FasterRCNN``,
``MaskRCNN``, ``KeypointRCNN``, ``RetinaNet`` or ``FCOS``); :meth:`HeadConfig.to_kwargs` returns the
ones that are set, for ``build_detector(arch, **kwargs)``. Each field names the architectures it
applies to (``metadata["needs"]``, read from :data:`detection.archs.ARCHS`), and
:meth:`HeadConfig.check_arch` refuses an option the chosen ``model.arch`` does not take.

Modules (``rpn_head``, ``box_predictor``, anchor generators...) are not config values, and the
keywords that have their own keys (``num_classes``, ``min_size``, ``max_size``, the anchors) are
set under ``model``, not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..archs import ARCHS, ArchSpec, arch_spec
from .errors import FieldError
from .fields import COUNT, POSITIVE, UNIT, Bound, Section, option

__all__ = ["HeadConfig", "Needs"]

NEEDS = "needs"


@dataclass(frozen=True)
class Needs:
    """The architectures an option applies to: those whose :class:`ArchSpec` passes ``test``."""

    what: str
    test: Callable[[ArchSpec], bool]

    def archs(self) -> list[str]:
        """The ``model.arch`` names this option applies to."""
        return [name for name, spec in ARCHS.items() if self.test(spec)]

    def __str__(self) -> str:
        return f"{self.what} ({', '.join(self.archs())})"


RCNN = Needs("the R-CNN archs", lambda s: s.family == "rcnn")
MASKS = Needs("the Mask R-CNN archs", lambda s: s.masks)
KEYPOINTS = Needs("the Keypoint R-CNN arch", lambda s: s.keypoints)
ONE_STAGE = Needs("the one-stage archs", lambda s: s.family in ("retinanet", "fcos"))
RETINANET = Needs("the RetinaNet archs", lambda s: s.family == "retinanet")
FCOS = Needs("the FCOS arch", lambda s: s.family == "fcos")
ANY = Needs("every arch", lambda s: True)


def _opt(doc: str, needs: Needs, bound: Bound | None = None) -> Any:
    return option(None, doc=doc, bound=bound, **{NEEDS: needs})


@dataclass(frozen=True, kw_only=True)
class HeadConfig(Section):
    """Detector-head options (key ``model.head``); ``None`` keeps torchvision's default."""

    # -- every arch: GeneralizedRCNNTransform
    image_mean: tuple[float, float, float] | None = _opt(
        "per-channel mean subtracted from the [0, 1] RGB input (torchvision: ImageNet's [0.485, 0.456, 0.406]).",
        ANY,
        UNIT,
    )
    image_std: tuple[float, float, float] | None = _opt(
        "per-channel standard deviation the input is divided by (torchvision: [0.229, 0.224, 0.225]).",
        ANY,
        POSITIVE,
    )
    # -- R-CNN: region proposal network
    rpn_pre_nms_top_n_train: int | None = _opt(
        "proposals kept per level before the RPN's NMS, in training (torchvision: 2000).", RCNN, COUNT
    )
    rpn_pre_nms_top_n_test: int | None = _opt(
        "proposals kept per level before the RPN's NMS, at test time (torchvision: 1000).", RCNN, COUNT
    )
    rpn_post_nms_top_n_train: int | None = _opt(
        "proposals kept per image after the RPN's NMS, in training (torchvision: 2000).", RCNN, COUNT
    )
    rpn_post_nms_top_n_test: int | None = _opt(
        "proposals kept per image after the RPN's NMS, at test time (torchvision: 1000).", RCNN, COUNT
    )
    rpn_nms_thresh: float | None = _opt("IoU threshold of the RPN's NMS (torchvision: 0.7).", RCNN, UNIT)
    rpn_fg_iou_thresh: float | None = _opt(
        "anchors with at least this IoU with a box are RPN positives (torchvision: 0.7).", RCNN, UNIT
    )
    rpn_bg_iou_thresh: float | None = _opt(
        "anchors with less than this IoU with every box are RPN negatives (torchvision: 0.3); at most "
        "rpn_fg_iou_thresh.",
        RCNN,
        UNIT,
    )
    rpn_batch_size_per_image: int | None = _opt(
        "anchors sampled per image for the RPN loss (torchvision: 256).", RCNN, COUNT
    )
    rpn_positive_fraction: float | None = _opt(
        "largest fraction of positives among the sampled anchors (torchvision: 0.5).", RCNN, UNIT
    )
    rpn_score_thresh: float | None = _opt(
        "proposals scoring below this are dropped at test time (torchvision: 0.0).", RCNN, UNIT
    )
    # -- R-CNN: box head
    box_score_thresh: float | None = _opt(
        "detections scoring below this are dropped at test time (torchvision: 0.05).", RCNN, UNIT
    )
    box_nms_thresh: float | None = _opt(
        "IoU threshold of the per-class NMS on detections (torchvision: 0.5).", RCNN, UNIT
    )
    box_detections_per_img: int | None = _opt(
        "most detections returned per image (torchvision: 100).", RCNN, COUNT
    )
    box_fg_iou_thresh: float | None = _opt(
        "proposals with at least this IoU with a box are box-head positives (torchvision: 0.5).", RCNN, UNIT
    )
    box_bg_iou_thresh: float | None = _opt(
        "proposals with less than this IoU with every box are box-head negatives (torchvision: 0.5); at "
        "most box_fg_iou_thresh.",
        RCNN,
        UNIT,
    )
    box_batch_size_per_image: int | None = _opt(
        "proposals sampled per image for the box-head loss (torchvision: 512).", RCNN, COUNT
    )
    box_positive_fraction: float | None = _opt(
        "largest fraction of positives among the sampled proposals (torchvision: 0.25).", RCNN, UNIT
    )
    bbox_reg_weights: tuple[float, float, float, float] | None = _opt(
        "weights (wx, wy, ww, wh) of the box-head's box encoding (torchvision: [10, 10, 5, 5]).",
        RCNN,
        POSITIVE,
    )
    box_head_dim: int | None = _opt(
        "width of the box head's fully connected layers (torchvision: 1024).", RCNN, COUNT
    )
    box_head_convs: tuple[int, ...] | None = _opt(
        "channels of the 3x3 conv + BN layers before the box head's fully connected layer, as in the v2 "
        "models (e.g. [256, 256, 256, 256]); null: none (v1), or the v2 models' four.",
        RCNN,
        COUNT,
    )
    roi_canonical_scale: float | None = _opt(
        "box side, in pixels, that the RoI poolers read from p4; a box of half that side is read from p3, "
        "and so on (torchvision: 224, for ~800 px images; small images with small objects want a smaller "
        "value, or every RoI lands on p2).",
        RCNN,
        POSITIVE,
    )
    # -- R-CNN: mask and keypoint heads
    mask_head_channels: tuple[int, ...] | None = _opt(
        "channels of each mask-head conv (torchvision: [256, 256, 256, 256]).", MASKS, COUNT
    )
    num_keypoints: int | None = _opt("keypoints per instance (torchvision: 17, COCO's).", KEYPOINTS, COUNT)
    # -- one-stage: RetinaNet and FCOS
    score_thresh: float | None = _opt(
        "detections scoring below this are dropped at test time (torchvision: 0.05 RetinaNet, 0.2 FCOS).",
        ONE_STAGE,
        UNIT,
    )
    nms_thresh: float | None = _opt(
        "IoU threshold of the per-class NMS on detections (torchvision: 0.5 RetinaNet, 0.6 FCOS).",
        ONE_STAGE,
        UNIT,
    )
    detections_per_img: int | None = _opt(
        "most detections returned per image (torchvision: 300 RetinaNet, 100 FCOS).", ONE_STAGE, COUNT
    )
    topk_candidates: int | None = _opt(
        "highest-scoring candidates kept per level before NMS (torchvision: 1000).", ONE_STAGE, COUNT
    )
    fg_iou_thresh: float | None = _opt(
        "anchors with at least this IoU with a box are positives (torchvision: 0.5).", RETINANET, UNIT
    )
    bg_iou_thresh: float | None = _opt(
        "anchors with less than this IoU with every box are negatives (torchvision: 0.4); at most "
        "fg_iou_thresh.",
        RETINANET,
        UNIT,
    )
    center_sampling_radius: float | None = _opt(
        "locations within this many strides of a box centre are positives (torchvision: 1.5).", FCOS, POSITIVE
    )

    def validate(self) -> None:
        """Check each option's range, and that no negative threshold lies above its positive one."""
        super().validate()
        for prefix in ("rpn_", "box_", ""):
            fg, bg = getattr(self, f"{prefix}fg_iou_thresh"), getattr(self, f"{prefix}bg_iou_thresh")
            if fg is not None and bg is not None and bg > fg:
                raise FieldError(f"{prefix}bg_iou_thresh", f"({bg}) must be <= {prefix}fg_iou_thresh ({fg})")

    def check_arch(self, arch: str) -> None:
        """Raise :class:`FieldError` for the first option that is set but does not apply to ``arch``."""
        spec = arch_spec(arch)
        for f in dataclasses.fields(self):
            needs: Needs = f.metadata[NEEDS]
            if getattr(self, f.name) is not None and not needs.test(spec):
                raise FieldError(
                    f.name, f"applies to {needs}, not to arch {arch!r}; remove it or change the arch"
                )

    def to_kwargs(self) -> dict[str, Any]:
        """The options that are set, as keyword arguments of ``build_detector``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
