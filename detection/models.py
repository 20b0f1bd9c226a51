"""``build_detector``: torchvision's detectors on our backbone, with anchors and poolers derived and checked.

Every level-dependent number comes from the backbone's ``feature_info``:

* anchors, one size tuple per level: ``8 x stride`` for the R-CNNs (torchvision's 32..512 over
  strides 4..64), ``4 x stride x (1, 2^(1/3), 2^(2/3))`` for RetinaNet, ``1 x stride`` for FCOS;
* RoI poolers over the levels with stride <= 32 (``p2``..``p5``): 7x7 for boxes, 14x14 for masks
  and keypoints, sampling ratio 2.

Names are checked when the model is built: a pooler naming a level the backbone does not produce,
or an anchor generator with the wrong number of levels, raises a ``ValueError`` that lists what
exists, instead of torchvision's ``IndexError`` deep inside the RoI heads during the first forward.

Conventions (the same as torchvision's): ``num_classes`` includes the background class 0; the model
takes float images in [0, 1] and resizes and normalises them itself (``GeneralizedRCNNTransform``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    RPNHead,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from backbone import BackboneConfig, FeatureInfo, FeatureSpec, FPNConfig, build_backbone

from .amp import Float32AnchorGenerator, decode_in_float32

__all__ = ["ARCHS", "build_detector", "derive_anchor_sizes", "feature_info_of"]


@dataclass(frozen=True)
class _Arch:
    cls: type[nn.Module]
    family: str  # "rcnn" | "retinanet" | "fcos"
    out_features: tuple[str, ...]
    extra: str
    default_num_classes: int = 91
    v2: bool = False


ARCHS: dict[str, _Arch] = {
    "faster_rcnn": _Arch(FasterRCNN, "rcnn", ("c2", "c3", "c4", "c5"), "maxpool"),
    "faster_rcnn_v2": _Arch(FasterRCNN, "rcnn", ("c2", "c3", "c4", "c5"), "maxpool", v2=True),
    "mask_rcnn": _Arch(MaskRCNN, "rcnn", ("c2", "c3", "c4", "c5"), "maxpool"),
    "mask_rcnn_v2": _Arch(MaskRCNN, "rcnn", ("c2", "c3", "c4", "c5"), "maxpool", v2=True),
    "keypoint_rcnn": _Arch(KeypointRCNN, "rcnn", ("c2", "c3", "c4", "c5"), "maxpool", default_num_classes=2),
    "retinanet": _Arch(RetinaNet, "retinanet", ("c3", "c4", "c5"), "p6p7_p5"),
    "retinanet_v2": _Arch(RetinaNet, "retinanet", ("c3", "c4", "c5"), "p6p7_c5", v2=True),
    "fcos": _Arch(FCOS, "fcos", ("c3", "c4", "c5"), "p6p7_p5"),
}

#: Keyword options that ``build_detector`` handles itself (the rest go to torchvision's class).
OWN_OPTIONS = (
    "anchor_sizes", "aspect_ratios", "box_head_dim", "box_head_convs", "mask_head_channels", "roi_canonical_scale",
)


def _arch(name: str) -> _Arch:
    if name not in ARCHS:
        close = difflib.get_close_matches(name, list(ARCHS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown detector arch {name!r}; choose one of {list(ARCHS)}.{hint}")
    return ARCHS[name]


def _backbone_for_arch(arch: _Arch, spec: str | BackboneConfig | Mapping[str, Any]) -> nn.Module:
    """Build our backbone, filling options left unset (``None``) with the arch's torchvision defaults."""
    if isinstance(spec, str):
        cfg = BackboneConfig(name=spec)
    elif isinstance(spec, BackboneConfig):
        cfg = spec
    else:
        fields = dict(spec)
        fpn = fields.pop("fpn", {})
        if isinstance(fpn, bool):
            fpn = {"enabled": fpn}
        cfg = BackboneConfig(**fields, fpn=fpn if isinstance(fpn, FPNConfig) else FPNConfig(**fpn))
    fpn = cfg.fpn
    if fpn.extra is None:
        fpn = dataclasses.replace(fpn, extra=arch.extra)
    if arch.v2 and arch.family == "rcnn" and fpn.norm is None:
        fpn = dataclasses.replace(fpn, norm="bn")
    changes: dict[str, Any] = {"fpn": fpn}
    if cfg.out_features is None:
        changes["out_features"] = arch.out_features
    if arch.v2 and cfg.norm is None:
        changes["norm"] = "bn"  # torchvision's v2 detectors train BN in the body even with pretrained weights
    return build_backbone(dataclasses.replace(cfg, **changes))


def feature_info_of(backbone: nn.Module, probe_size: int = 256) -> FeatureInfo:
    """The backbone's outputs as a :class:`FeatureInfo`.

    Our modules declare it. For any other module with ``out_channels`` (a torchvision backbone, say),
    it is measured once by running a ``probe_size`` square zero image through it in eval mode.
    """
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, FeatureInfo):
        return info
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters(), None)
        x = torch.zeros(1, 3, probe_size, probe_size, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            out = backbone(x)
    finally:
        backbone.train(was_training)
    if isinstance(out, torch.Tensor):
        out = {"0": out}
    if not isinstance(out, Mapping):
        raise TypeError(
            f"the backbone must return a tensor or a mapping name -> tensor (torchvision's convention); "
            f"{type(backbone).__name__} returned {type(out).__name__}"
        )
    specs = []
    for name, t in out.items():
        stride = probe_size / t.shape[-1]
        stride = 2 ** round(torch.log2(torch.tensor(stride)).item())
        specs.append(FeatureSpec(str(name), int(t.shape[1]), int(stride)))
    return FeatureInfo(specs)


def derive_anchor_sizes(family: str, strides: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level from the strides, reproducing torchvision's defaults for each family."""
    if family == "rcnn":
        return tuple((8 * s,) for s in strides)
    if family == "retinanet":
        return tuple((4 * s, int(4 * s * 2 ** (1.0 / 3)), int(4 * s * 2 ** (2.0 / 3))) for s in strides)
    if family == "fcos":
        return tuple((s,) for s in strides)
    raise ValueError(f"unknown detector family {family!r}")


def _check_pooler(option: str, pooler: Any, info: FeatureInfo) -> None:
    names = list(getattr(pooler, "featmap_names", []))
    missing = [n for n in names if n not in info]
    if missing:
        raise ValueError(
            f"{option} pools feature(s) {missing}, which the backbone does not produce; "
            f"it produces {list(info.names())}. Pass featmap_names from that list."
        )


def _check_anchors(option: str, generator: AnchorGenerator, info: FeatureInfo) -> None:
    if len(generator.sizes) != len(info) or len(generator.aspect_ratios) != len(info):
        raise ValueError(
            f"{option} has {len(generator.sizes)} size tuple(s) and {len(generator.aspect_ratios)} aspect-ratio "
            f"tuple(s), but the backbone produces {len(info)} levels {list(info.names())}; give one per level"
        )


def _check_head_options(cls: type[nn.Module], options: Mapping[str, Any]) -> None:
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "backbone", "num_classes", "kwargs")]
    valid += list(OWN_OPTIONS)
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {key!r} for {cls.__name__}{hint}; valid options: {', '.join(sorted(valid))}")


def build_detector(
    arch: str,
    backbone: str | BackboneConfig | Mapping[str, Any] | nn.Module = "resnet50",
    num_classes: int | None = None,
    **head_options: Any,
) -> nn.Module:
    """Build a torchvision detector on a ResNet-FPN backbone.

    Args:
        arch: ``faster_rcnn``, ``faster_rcnn_v2``, ``mask_rcnn``, ``mask_rcnn_v2``, ``keypoint_rcnn``,
            ``retinanet``, ``retinanet_v2`` or ``fcos``.
        backbone: a backbone name (``"resnet50"``), a :class:`~backbone.BackboneConfig` or mapping of its
            fields, or a ready module with ``out_channels`` (ours, torchvision's, or your own). Given a
            name or config, options left unset follow the arch as torchvision's builders do: P2-P6
            with max-pool for the R-CNNs, P3-P7 for RetinaNet and FCOS, BN in body and FPN for the
            R-CNN v2 models. So ``build_detector("retinanet", "resnet50", 91)`` has exactly the
            architecture of ``torchvision.models.detection.retinanet_resnet50_fpn``.
        num_classes: number of classes **including background**; defaults to torchvision's (91, or
            2 for keypoint_rcnn).
        **head_options: keyword arguments of torchvision's detector class (``min_size``,
            ``box_score_thresh``, ``rpn_anchor_generator``, ...), plus ``anchor_sizes`` (one tuple of
            sizes per level) and ``aspect_ratios`` (one tuple, used at every level), which replace the
            derived anchors, and for the R-CNNs ``box_head_dim`` (width of the box head's fully
            connected layers, torchvision: 1024), ``box_head_convs`` (channels of 3x3 conv + BN layers
            before them, as in the v2 models: ``(256, 256, 256, 256)``; default none) and
            ``mask_head_channels`` (channels of each mask-head conv, torchvision:
            ``(256, 256, 256, 256)``): small heads for small images and CPUs; and ``roi_canonical_scale``
            (the box side, in pixels, that the RoI poolers read from ``p4``; a box of half that side is
            read from ``p3``, and so on. torchvision: 224, made for ~800 px images; small images with
            small objects want a proportionally smaller value, or every RoI lands on ``p2``).

    Returns:
        The torchvision detector (``FasterRCNN``, ``MaskRCNN``, ``KeypointRCNN``, ``RetinaNet`` or
        ``FCOS``), with anchors generated and boxes decoded in float32 even under autocast (see
        :mod:`detection.amp`). In eval mode it returns per image ``boxes`` [N, 4] float32 xyxy in input pixels,
        ``scores`` [N], ``labels`` [N] int64 and, where the arch has them, ``masks`` [N, 1, H, W]
        float32 in [0, 1] or ``keypoints`` [N, K, 3].

    Raises:
        ValueError: unknown arch, pooler names the backbone lacks, anchors for the wrong number of
            levels, or levels with different channel counts.
        TypeError: an option the detector class does not take (the closest valid one is suggested).

    Example:
        >>> model = build_detector("mask_rcnn", backbone="resnet18", num_classes=4, min_size=256)
        >>> model.eval()(torch.rand(1, 3, 200, 300).unbind(0))[0].keys()  # doctest: +SKIP
        dict_keys(['boxes', 'labels', 'scores', 'masks'])
    """
    spec = _arch(arch)
    options = dict(head_options)
    _check_head_options(spec.cls, options)
    if num_classes is None:
        num_classes = spec.default_num_classes
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be >= 2; got {num_classes}")

    module = backbone if isinstance(backbone, nn.Module) else _backbone_for_arch(spec, backbone)
    if not hasattr(module, "out_channels"):
        raise TypeError(
            f"the backbone module {type(module).__name__} has no 'out_channels' attribute, which torchvision's "
            "heads need; set it to the channel count shared by all output levels"
        )
    info = feature_info_of(module)
    uneven = [s for s in info if s.channels != module.out_channels]
    if uneven:
        raise ValueError(
            f"the detector heads need every level to have out_channels={module.out_channels} channels, but "
            f"{[(s.name, s.channels) for s in uneven]} differ; add an FPN (fpn.enabled: true) or return one level"
        )
    channels = module.out_channels

    box_head_dim = options.pop("box_head_dim", None)
    box_convs = options.pop("box_head_convs", None)
    mask_channels = options.pop("mask_head_channels", None)
    if spec.family != "rcnn" and (box_head_dim is not None or box_convs is not None or mask_channels is not None):
        raise ValueError(f"box_head_dim, box_head_convs and mask_head_channels apply to the R-CNN detectors, not {arch}")
    if mask_channels is not None and spec.cls is not MaskRCNN:
        raise ValueError(f"mask_head_channels needs a Mask R-CNN arch, got {arch}")
    sizes = options.pop("anchor_sizes", None)
    ratios = options.pop("aspect_ratios", None)
    default_ratios = (1.0,) if spec.family == "fcos" else (0.5, 1.0, 2.0)
    anchor_key = "rpn_anchor_generator" if spec.family == "rcnn" else "anchor_generator"
    if options.get(anchor_key) is None:
        if sizes is None:
            sizes = derive_anchor_sizes(spec.family, info.strides())
        sizes = tuple(tuple(int(v) for v in level) for level in sizes)
        if len(sizes) != len(info):
            raise ValueError(
                f"anchor_sizes has {len(sizes)} entries but the backbone produces {len(info)} levels "
                f"{list(info.names())}; give one tuple of sizes per level"
            )
        ratios = tuple(float(r) for r in (ratios if ratios is not None else default_ratios))
        options[anchor_key] = Float32AnchorGenerator(sizes, (ratios,) * len(sizes))
    elif sizes is not None or ratios is not None:
        raise ValueError(f"pass either {anchor_key} or anchor_sizes/aspect_ratios, not both")
    _check_anchors(anchor_key, options[anchor_key], info)
    num_anchors = options[anchor_key].num_anchors_per_location()[0]

    canonical = options.pop("roi_canonical_scale", None)
    if canonical is not None and (spec.family != "rcnn" or not float(canonical) > 0):
        raise ValueError(f"roi_canonical_scale must be a positive box side in pixels for an R-CNN arch; "
                         f"got {canonical!r} for {arch}")
    if spec.family == "rcnn":
        pooled = [s.name for s in info if s.stride <= 32] or [info[0].name]

        def pooler(size: int) -> MultiScaleRoIAlign:
            return MultiScaleRoIAlign(pooled, output_size=size, sampling_ratio=2, canonical_scale=int(canonical or 224))

        options.setdefault("box_roi_pool", pooler(7))
        if spec.cls is MaskRCNN:
            options.setdefault("mask_roi_pool", pooler(14))
        if spec.cls is KeypointRCNN:
            options.setdefault("keypoint_roi_pool", pooler(14))
        for key in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
            if options.get(key) is not None:
                _check_pooler(key, options[key], info)
        if box_convs is not None or box_head_dim is not None:
            dim = int(box_head_dim or 1024)
            if box_convs is not None:
                head = FastRCNNConvFCHead((channels, 7, 7), [int(c) for c in box_convs], [dim], norm_layer=nn.BatchNorm2d)
            else:
                head = TwoMLPHead(channels * 7 * 7, dim)
            options.setdefault("box_head", head)
            options.setdefault("box_predictor", FastRCNNPredictor(dim, num_classes))
        if mask_channels is not None:
            mask_channels = [int(c) for c in mask_channels]
            options.setdefault("mask_head", MaskRCNNHeads(channels, mask_channels, 1))
            options.setdefault("mask_predictor", MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_classes))
        if spec.v2:
            options.setdefault("rpn_head", RPNHead(channels, num_anchors, conv_depth=2))
            options.setdefault(
                "box_head", FastRCNNConvFCHead((channels, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
            )
            if spec.cls is MaskRCNN:
                options.setdefault("mask_head", MaskRCNNHeads(channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d))
    elif spec.v2 and spec.family == "retinanet" and options.get("head") is None:
        head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        options["head"] = head

    # torchvision refuses num_classes next to a ready-made predictor (the predictor fixes it).
    has_predictor = options.get("box_predictor") is not None or options.get("mask_predictor") is not None
    return decode_in_float32(spec.cls(module, num_classes=None if has_predictor else num_classes, **options))

