"""The detector architectures: one table that the config, ``build_detector`` and evaluation all read.

Each entry says what a ``model.arch`` name builds (family, masks, keypoints, the v2 variant), which
backbone levels and FPN extra levels it uses by default, and how its default anchors follow from the
level strides. The evaluation vocabularies that configs are checked against (:data:`IOU_TYPES`,
:data:`EVAL_BACKENDS`) live here too. Nothing here imports torch, so configs are checked against it before any model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from backbone.config import BackboneConfig

__all__ = ["ARCHS", "EVAL_BACKENDS", "IOU_TYPES", "ArchSpec", "arch_spec"]

#: COCO evaluation types, in the order metrics are reported.
IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")
#: COCO evaluators (``eval.backend``): the same metrics; faster-coco-eval is an optional, faster install.
EVAL_BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")


@dataclass(frozen=True)
class ArchSpec:
    """What one ``model.arch`` name builds.

    Attributes:
        family: ``"rcnn"`` (two-stage, RoI heads), ``"retinanet"`` or ``"fcos"``.
        out_features: backbone levels fed to the FPN by default.
        fpn_extra: FPN extra levels by default (see ``backbone.FPN_EXTRAS``).
        masks: predicts instance masks (Mask R-CNN).
        keypoints: predicts keypoints (Keypoint R-CNN).
        v2: torchvision's improved recipe (BN in FPN and heads, conv box head, GIoU for RetinaNet).
        default_num_classes: torchvision's default ``num_classes`` (background included).
        anchor_base: default anchor size per level is ``anchor_base * stride``...
        anchor_octaves: ...times ``2 ** (i / anchor_octaves)`` for ``i`` in ``range(anchor_octaves)``.
        aspect_ratios: default anchor aspect ratios (height / width), shared by every level.
    """

    family: str
    out_features: tuple[str, ...]
    fpn_extra: str
    masks: bool = False
    keypoints: bool = False
    v2: bool = False
    default_num_classes: int = 91
    anchor_base: int = 8
    anchor_octaves: int = 1
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def iou_types(self) -> tuple[str, ...]:
        """The COCO evaluation types this architecture produces."""
        return ("bbox",) + (("segm",) if self.masks else ()) + (("keypoints",) if self.keypoints else ())

    def backbone_config(self, cfg: BackboneConfig) -> BackboneConfig:
        """``cfg`` with the options it leaves unset (``None``) filled with this arch's torchvision defaults:
        body levels, FPN extra levels and, for the R-CNN v2 models, BN in the FPN (and in the body)."""
        fpn = cfg.fpn
        if fpn.extra is None:
            fpn = dataclasses.replace(fpn, extra=self.fpn_extra)
        if self.v2 and self.family == "rcnn" and fpn.norm is None:
            fpn = dataclasses.replace(fpn, norm="bn")
        changes: dict = {"fpn": fpn}
        if cfg.out_features is None:
            changes["out_features"] = self.out_features
        if self.v2 and cfg.norm is None:
            changes["norm"] = "bn"  # torchvision's v2 detectors train BN in the body even with pretrained weights
        return dataclasses.replace(cfg, **changes)

    def anchor_sizes(self, strides: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """Default anchor sizes, one tuple per level, as torchvision's builders write them."""
        sizes = []
        for stride in strides:
            base = self.anchor_base * int(stride)
            sizes.append(tuple(int(base * 2 ** (i / self.anchor_octaves)) for i in range(self.anchor_octaves)))
        return tuple(sizes)


_RCNN_LEVELS = ("c2", "c3", "c4", "c5")
_ONE_STAGE_LEVELS = ("c3", "c4", "c5")

#: Every accepted ``model.arch``. torchvision's ``*_resnet50_fpn`` builders use exactly these defaults.
ARCHS: dict[str, ArchSpec] = {
    "faster_rcnn": ArchSpec("rcnn", _RCNN_LEVELS, "maxpool"),
    "faster_rcnn_v2": ArchSpec("rcnn", _RCNN_LEVELS, "maxpool", v2=True),
    "mask_rcnn": ArchSpec("rcnn", _RCNN_LEVELS, "maxpool", masks=True),
    "mask_rcnn_v2": ArchSpec("rcnn", _RCNN_LEVELS, "maxpool", masks=True, v2=True),
    "keypoint_rcnn": ArchSpec("rcnn", _RCNN_LEVELS, "maxpool", keypoints=True, default_num_classes=2),
    "retinanet": ArchSpec("retinanet", _ONE_STAGE_LEVELS, "p6p7_p5", anchor_base=4, anchor_octaves=3),
    "retinanet_v2": ArchSpec("retinanet", _ONE_STAGE_LEVELS, "p6p7_c5", v2=True, anchor_base=4, anchor_octaves=3),
    "fcos": ArchSpec("fcos", _ONE_STAGE_LEVELS, "p6p7_p5", anchor_base=1, aspect_ratios=(1.0,)),
}


def arch_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``name``; an unknown name raises ``ValueError`` with the closest valid one."""
    if name not in ARCHS:
        close = difflib.get_close_matches(str(name), list(ARCHS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown detector arch {name!r}; choose one of {list(ARCHS)}.{hint}")
    return ARCHS[name]
