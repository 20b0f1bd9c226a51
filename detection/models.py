"""``build_detector``: torchvision's detectors on our backbone, with anchors and poolers derived and checked.

Everything arch-dependent comes from :data:`detection.archs.ARCHS`, and every level-dependent
number from the backbone's ``feature_info``:

* anchors, one size tuple per level: :meth:`ArchSpec.anchor_sizes` of the level strides
  (torchvision's 32..512 over strides 4..64 for the R-CNNs, ``4 x stride x (1, 2^(1/3), 2^(2/3))``
  for RetinaNet, ``1 x stride`` for FCOS) with the arch's aspect ratios;
* RoI poolers over the levels with stride <= 32 (``p2``..``p5``): 7x7 for boxes, 14x14 for masks
  and keypoints, sampling ratio 2.

Names are checked when the model is built: a pooler naming a level the backbone does not produce,
or an anchor generator with the wrong number of levels, raises a ``ValueError`` that lists what
exists, instead of torchvision's ``IndexError`` deep inside the RoI heads during the first forward.

Conventions (the same as torchvision's): ``num_classes`` includes the background class 0; the model
takes float images in [0, 1] and resizes and normalises them itself (``GeneralizedRCNNTransform``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import MultiScaleRoIAlign

from backbone import BackboneConfig, FeatureInfo, FeatureSpec, build_backbone

from .archs import ARCHS, ArchSpec, arch_spec
from .heads import (
    Float32AnchorGenerator,
    Float32FastRCNNPredictor,
    Float32FCOSHead,
    Float32KeypointRCNNPredictor,
    Float32MaskRCNNPredictor,
    Float32RetinaNetHead,
    Float32RPNHead,
)
from .roi_align import SparseMultiScaleRoIAlign

__all__ = ["ARCHS", "build_detector", "detector_class", "feature_info_of", "to_channels_last"]

#: Keyword options that ``build_detector`` handles itself (the rest go to torchvision's class).
OWN_OPTIONS = (
    "anchor_sizes", "aspect_ratios", "box_head_dim", "box_head_convs", "mask_head_channels", "roi_canonical_scale",
)

#: torchvision's width of the box head's fully connected layers and of each mask-head conv.
_BOX_HEAD_DIM = 1024
_MASK_HEAD_CHANNELS = (256, 256, 256, 256)
_V2_BOX_CONVS = (256, 256, 256, 256)


def detector_class(spec: ArchSpec) -> type[nn.Module]:
    """torchvision's detector class for an :class:`~detection.archs.ArchSpec`."""
    if spec.family == "rcnn":
        return MaskRCNN if spec.masks else KeypointRCNN if spec.keypoints else FasterRCNN
    if spec.family == "retinanet":
        return RetinaNet
    if spec.family == "fcos":
        return FCOS
    raise ValueError(f"unknown detector family {spec.family!r}; expected 'rcnn', 'retinanet' or 'fcos'")


def _backbone_config(spec: str | BackboneConfig | Mapping[str, Any]) -> BackboneConfig:
    if isinstance(spec, str):
        return BackboneConfig(name=spec)
    return BackboneConfig.from_mapping(spec)


def _backbone_for_arch(arch: ArchSpec, spec: str | BackboneConfig | Mapping[str, Any]) -> nn.Module:
    """Build our backbone, filling options left unset (``None``) with the arch's torchvision defaults."""
    return build_backbone(arch.backbone_config(_backbone_config(spec)))


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


def _backbone_module(arch: ArchSpec, backbone: str | BackboneConfig | Mapping[str, Any] | nn.Module) -> tuple[nn.Module, FeatureInfo]:
    """The backbone module and its outputs, checked for what torchvision's heads need."""
    module = backbone if isinstance(backbone, nn.Module) else _backbone_for_arch(arch, backbone)
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
    return module, info


def _anchor_generator(arch: ArchSpec, info: FeatureInfo, options: dict[str, Any]) -> AnchorGenerator:
    """The given anchor generator, or one from ``anchor_sizes`` / ``aspect_ratios`` (popped) or the arch's defaults."""
    key = "rpn_anchor_generator" if arch.family == "rcnn" else "anchor_generator"
    sizes = options.pop("anchor_sizes", None)
    ratios = options.pop("aspect_ratios", None)
    generator = options.get(key)
    if generator is not None and (sizes is not None or ratios is not None):
        raise ValueError(f"pass either {key} or anchor_sizes/aspect_ratios, not both")
    if generator is None:
        sizes = arch.anchor_sizes(info.strides()) if sizes is None else sizes
        sizes = tuple(tuple(int(v) for v in level) for level in sizes)
        if len(sizes) != len(info):
            raise ValueError(
                f"anchor_sizes has {len(sizes)} entries but the backbone produces {len(info)} levels "
                f"{list(info.names())}; give one tuple of sizes per level"
            )
        ratios = tuple(float(r) for r in (arch.aspect_ratios if ratios is None else ratios))
        generator = options[key] = Float32AnchorGenerator(sizes, (ratios,) * len(sizes))
    _check_anchors(key, generator, info)
    return generator


def _check_family_options(name: str, arch: ArchSpec, options: Mapping[str, Any]) -> None:
    """Our own options that only some archs take."""
    if arch.family != "rcnn" and any(options.get(k) is not None for k in ("box_head_dim", "box_head_convs", "mask_head_channels")):
        raise ValueError(f"box_head_dim, box_head_convs and mask_head_channels apply to the R-CNN detectors, not {name}")
    if options.get("mask_head_channels") is not None and not arch.masks:
        raise ValueError(f"mask_head_channels needs a Mask R-CNN arch, got {name}")
    canonical = options.get("roi_canonical_scale")
    if canonical is not None and (arch.family != "rcnn" or not float(canonical) > 0):
        raise ValueError(f"roi_canonical_scale must be a positive box side in pixels for an R-CNN arch; "
                         f"got {canonical!r} for {name}")


def _poolers(arch: ArchSpec, info: FeatureInfo, canonical: Any) -> dict[str, MultiScaleRoIAlign]:
    """RoIAlign poolers over the levels with stride <= 32 (all of a single-level backbone): torchvision's,
    pooling on CPU as sparse matrix products (:class:`~detection.roi_align.SparseMultiScaleRoIAlign`)."""
    names = [s.name for s in info if s.stride <= 32] or [info[0].name]
    scale = {} if canonical is None else {"canonical_scale": int(canonical)}
    pooler = partial(SparseMultiScaleRoIAlign, names, sampling_ratio=2, **scale)
    poolers = {"box_roi_pool": pooler(output_size=7)}
    if arch.masks:
        poolers["mask_roi_pool"] = pooler(output_size=14)
    if arch.keypoints:
        poolers["keypoint_roi_pool"] = pooler(output_size=14)
    return poolers


def _put(options: dict[str, Any], key: str, make: Callable[[], nn.Module]) -> None:
    """``options[key] = make()`` unless the caller gave that module (``make`` runs only when needed)."""
    if options.get(key) is None:
        options[key] = make()


def _box_head(arch: ArchSpec, channels: int, resolution: int, dim: Any, convs: Any) -> nn.Module:
    """Two FC layers; conv + FC layers in the v2 models or with ``box_head_convs``."""
    convs = _V2_BOX_CONVS if convs is None and arch.v2 else convs
    if convs is None:
        return TwoMLPHead(channels * resolution**2, int(dim or _BOX_HEAD_DIM))
    return FastRCNNConvFCHead((channels, resolution, resolution), [int(c) for c in convs], [int(dim or _BOX_HEAD_DIM)],
                              norm_layer=nn.BatchNorm2d)


def _mask_head(arch: ArchSpec, channels: int, layers: Sequence[int]) -> nn.Module:
    """Four 3x3 convs (or ``mask_head_channels``), with BN in the v2 model."""
    return MaskRCNNHeads(channels, [int(c) for c in layers], 1, norm_layer=nn.BatchNorm2d if arch.v2 else None)


def _rcnn_heads(arch: ArchSpec, channels: int, num_anchors: int, num_classes: int, info: FeatureInfo,
                options: dict[str, Any]) -> None:
    """Fill ``options`` with the R-CNN modules not given: poolers, RPN head, box / mask / keypoint heads.

    Parameter initialisation draws from the global random stream, so the modules are made in one fixed
    order: the heads sized by our own options, then the v2 heads, then the rest in the order
    torchvision's constructors make them (mask or keypoint head and predictor, RPN head, box head and
    predictor). Seeded models, and the results of the recipes, stay reproducible, and a default head
    gets exactly the initial values torchvision's class would give it on the same backbone.
    """
    box_dim, box_convs = options.pop("box_head_dim", None), options.pop("box_head_convs", None)
    custom_mask = options.pop("mask_head_channels", None)
    mask_layers = [int(c) for c in custom_mask or _MASK_HEAD_CHANNELS]
    for key, pooler in _poolers(arch, info, options.pop("roi_canonical_scale", None)).items():
        _put(options, key, lambda pooler=pooler: pooler)
    for key in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
        if options.get(key) is not None:
            _check_pooler(key, options[key], info)
    res = options["box_roi_pool"].output_size[0]
    box_dim_out = int(box_dim or _BOX_HEAD_DIM)
    if box_dim is not None or box_convs is not None:
        _put(options, "box_head", lambda: _box_head(arch, channels, res, box_dim, box_convs))
        _put(options, "box_predictor", lambda: Float32FastRCNNPredictor(box_dim_out, num_classes))
    if custom_mask is not None:
        _put(options, "mask_head", lambda: _mask_head(arch, channels, mask_layers))
        _put(options, "mask_predictor", lambda: Float32MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes))
    if arch.v2:
        _put(options, "rpn_head", lambda: Float32RPNHead(channels, num_anchors, conv_depth=2))
        _put(options, "box_head", lambda: _box_head(arch, channels, res, None, None))
        if arch.masks:
            _put(options, "mask_head", lambda: _mask_head(arch, channels, mask_layers))
    if arch.masks:
        _put(options, "mask_head", lambda: _mask_head(arch, channels, mask_layers))
        _put(options, "mask_predictor", lambda: Float32MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes))
    if arch.keypoints:
        # torchvision's keypoint head: eight 3x3 convs of 512 channels; 17 (COCO) keypoints by default.
        _put(options, "keypoint_head", lambda: KeypointRCNNHeads(channels, tuple(512 for _ in range(8))))
        num_keypoints = options.pop("num_keypoints", None) or 17
        _put(options, "keypoint_predictor", lambda: Float32KeypointRCNNPredictor(512, num_keypoints))
    _put(options, "rpn_head", lambda: Float32RPNHead(channels, num_anchors))
    _put(options, "box_head", lambda: _box_head(arch, channels, res, None, None))
    _put(options, "box_predictor", lambda: Float32FastRCNNPredictor(box_dim_out, num_classes))


def _one_stage_head(arch: ArchSpec, channels: int, num_anchors: int, num_classes: int) -> nn.Module:
    if arch.family == "fcos":
        return Float32FCOSHead(channels, num_anchors, num_classes)
    if not arch.v2:
        return Float32RetinaNetHead(channels, num_anchors, num_classes)
    head = Float32RetinaNetHead(channels, num_anchors, num_classes, norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"  # as torchvision's retinanet_resnet50_fpn_v2 sets it
    return head


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
        ``FCOS``, see :func:`detector_class`) with the anchor generator and prediction heads of
        :mod:`detection.heads`: anchors generated and boxes decoded in float32 even under autocast,
        in float64 after ``model.double()``. Modules passed in ``head_options`` replace these. In eval mode it returns per image ``boxes`` [N, 4] float32 xyxy in input pixels,
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
    spec = arch_spec(arch)
    cls = detector_class(spec)
    options = dict(head_options)
    _check_head_options(cls, options)
    if num_classes is None:
        num_classes = spec.default_num_classes
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too, so it must be >= 2; got {num_classes}")
    _check_family_options(arch, spec, options)
    module, info = _backbone_module(spec, backbone)
    num_anchors = _anchor_generator(spec, info, options).num_anchors_per_location()[0]
    if spec.family == "rcnn":
        _rcnn_heads(spec, module.out_channels, num_anchors, num_classes, info, options)
        # torchvision refuses num_classes next to a ready-made predictor (the predictor fixes it).
        return cls(module, num_classes=None, **options)
    if options.get("head") is None:
        options["head"] = _one_stage_head(spec, module.out_channels, num_anchors, num_classes)
    return cls(module, num_classes=num_classes, **options)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` (in place) in the channels-last memory format for training, what ``train.channels_last``
    gives: every convolution's weight channels-last, and the backbone converting the batched images."""
    model.to(memory_format=torch.channels_last)
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "set_channels_last"):
        backbone.set_channels_last()
    return model
