"""Parameters and FLOPs of a detector, per module group, counted by ``torch.utils.flop_counter``.

:func:`analyze_model` runs one eval-mode forward of a random image under
:class:`~torch.utils.flop_counter.FlopCounterMode` and splits its per-module counts
(``get_flop_counts()``) into groups found through module references:

* ``backbone.stem``, ``backbone.c2`` .. ``backbone.c5``: the ResNet body (ours or torchvision's);
* ``fpn``: the feature pyramid, extra levels included;
* ``rpn`` (two-stage) or ``head.classification`` / ``head.regression`` (RetinaNet, FCOS);
* ``roi_heads.box_head``, ``roi_heads.box_predictor``, ``roi_heads.mask_head``, ...;
* ``other``: whatever no group holds (the model's transform, pooling), so the groups add up to the total.

Conventions:

* FLOPs are ``FlopCounterMode``'s: 2 per multiply-add of convolutions and matrix products
  (``aten.convolution``, ``addmm``, ``mm``, ``bmm``). Bias, BN, activations, interpolation, RoIAlign
  and NMS count nothing. torchvision's weights metadata ``_ops`` ("GFLOPS") counts multiply-adds,
  so it is half of these FLOPs: ``analysis.macs`` is the comparable number.
* Parameters are ``model.parameters()``: ``FrozenBatchNorm2d`` holds its affine constants as
  buffers, so they count nothing (as in torchvision's ``num_params``).
* The R-CNN heads' cost follows the number of proposals and of detections, which depend on the
  weights and the image. The count fixes both at what the config allows, whatever the weights:
  the RPN's NMS is lifted (IoU 1), so the box head gets ``rpn_post_nms_top_n_test`` proposals
  (1000 by default); ``detections="max"`` also lets every box through the score threshold and
  NMS, so each image brings ``box_detections_per_img`` boxes to the mask or keypoint head (the most
  the model does per image), and ``"none"`` brings none, as in torchvision's published figures.
  These thresholds, and the eval mode, are set only during the count.

Example:
    >>> model = build_detector("mask_rcnn", "resnet18", num_classes=5)  # doctest: +SKIP
    >>> analysis = analyze_model(model, (256, 256))  # doctest: +SKIP
    >>> analysis.group("backbone").flops, analysis.flops  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from backbone.resnet import ResNetBody

from .archs import arch_spec
from .config import ExperimentConfig

__all__ = [
    "DETECTION_MODES",
    "GroupCount",
    "ModelAnalysis",
    "analyze_config",
    "analyze_model",
    "analysis_model",
    "analysis_num_classes",
    "format_analysis",
    "module_groups",
]

#: Box score thresholds of the ``detections`` modes: every candidate through, or none (scores are probabilities).
_SCORE_THRESH = {"max": 0.0, "none": 1.0}
#: ``detections`` of :func:`analyze_model`: how many boxes reach the mask / keypoint heads.
DETECTION_MODES: tuple[str, ...] = tuple(_SCORE_THRESH)
DetectionMode = Literal["max", "none"]
#: The group that holds what no other group does; it makes the groups add up to the total.
OTHER = "other"
#: The R-CNN head parts, in the order the model runs them.
_ROI_PARTS = ("box_head", "box_predictor", "mask_head", "mask_predictor", "keypoint_head", "keypoint_predictor")


@dataclass(frozen=True)
class GroupCount:
    """One group's counts: parameters, trainable parameters and FLOPs (2 per multiply-add)."""

    name: str
    params: int
    trainable_params: int
    flops: int

    @property
    def macs(self) -> int:
        """Multiply-adds: half the FLOPs (the convention of torchvision's ``_ops``)."""
        return self.flops // 2


@dataclass(frozen=True)
class ModelAnalysis:
    """The counts of one forward, per group and in total.

    Attributes:
        groups: disjoint groups in the order the model runs them, ending with ``other``;
            their params and FLOPs add up to ``params`` and ``flops``.
        params, trainable_params, flops: totals of the model (FLOPs of the whole forward).
        flops_by_op: FLOPs per aten operator (``"aten.convolution"``, ``"aten.addmm"``, ...).
        image_size: (height, width) of the random image given to the model.
        input_size: (height, width) after the model's own resize, or ``None`` if it has no transform.
        padded_size: (height, width) of the batch the backbone ran on (padded to the size divisibility).
        detections: boxes the model returned (those the mask / keypoint heads ran on).
    """

    groups: tuple[GroupCount, ...]
    params: int
    trainable_params: int
    flops: int
    flops_by_op: dict[str, int]
    image_size: tuple[int, int]
    input_size: tuple[int, int] | None
    padded_size: tuple[int, int] | None
    detections: int

    @property
    def macs(self) -> int:
        """Multiply-adds of the whole forward: compare with torchvision's ``_ops`` x 1e9."""
        return self.flops // 2

    def group(self, name: str) -> GroupCount:
        """A group by name, or the sum of the groups under a prefix (``"backbone"``, ``"roi_heads"``)."""
        members = [g for g in self.groups if g.name == name or g.name.startswith(name + ".")]
        if not members:
            raise KeyError(f"no group {name!r}; the groups are {[g.name for g in self.groups]}")
        return GroupCount(name, *(sum(getattr(g, f) for g in members) for f in ("params", "trainable_params", "flops")))

    def rows(self) -> list[tuple[int, GroupCount]]:
        """(depth, counts) in table order: each prefix (``backbone``) is followed by its members."""
        rows: list[tuple[int, GroupCount]] = []
        for g in self.groups:
            parent = g.name.split(".")[0]
            if parent != g.name and not any(r.name == parent for _, r in rows):
                rows.append((0, self.group(parent)))
            rows.append((1 if parent != g.name else 0, g))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: totals, groups by name, operators, sizes."""
        counts = ("params", "trainable_params", "flops", "macs")
        return {
            "total": {f: getattr(self, f) for f in counts},
            "groups": {g.name: {f: getattr(g, f) for f in counts} for g in self.groups},
            "flops_by_op": dict(self.flops_by_op),
            "image_size": list(self.image_size),
            "input_size": None if self.input_size is None else list(self.input_size),
            "padded_size": None if self.padded_size is None else list(self.padded_size),
            "detections": self.detections,
        }


def _body_parts(body: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The stem and the stages c2..c5 of a ResNet body: ours declares them, torchvision's keeps ResNet's names."""
    if isinstance(body, ResNetBody):
        return body.stages()
    stages = [(f"c{i + 1}", [m]) for i in range(1, 5) if isinstance(m := getattr(body, f"layer{i}", None), nn.Module)]
    if not stages:
        return [("body", [body])]
    staged = {id(m) for _, modules in stages for m in modules}
    stem = [m for m in body.children() if id(m) not in staged]
    return [("stem", stem), *stages]


def module_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each group of a torchvision-style detector, in the order the model runs them.

    Found through attributes (``backbone.body`` / ``backbone.fpn``, ``rpn``, ``head``, ``roi_heads``);
    parts a model lacks are left out, and a backbone without ``body`` and ``fpn`` is one group.
    """
    groups: dict[str, list[nn.Module]] = {}
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        body, fpn = getattr(backbone, "body", None), getattr(backbone, "fpn", None)
        if isinstance(body, nn.Module) and isinstance(fpn, nn.Module):
            groups.update((f"backbone.{name}", modules) for name, modules in _body_parts(body))
            groups["fpn"] = [fpn]
        else:
            groups["backbone"] = [backbone]
    if isinstance(rpn := getattr(model, "rpn", None), nn.Module):
        groups["rpn"] = [rpn]
    if isinstance(head := getattr(model, "head", None), nn.Module):
        parts = {n: getattr(head, f"{n}_head", None) for n in ("classification", "regression")}
        if all(isinstance(m, nn.Module) for m in parts.values()):
            groups.update((f"head.{n}", [m]) for n, m in parts.items())
        else:
            groups["head"] = [head]
    roi_heads = getattr(model, "roi_heads", None)
    for part in _ROI_PARTS:
        if isinstance(m := getattr(roi_heads, part, None), nn.Module):
            groups[f"roi_heads.{part}"] = [m]
    return groups


def _param_counts(modules: Sequence[nn.Module]) -> tuple[int, int]:
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values()), sum(p.numel() for p in params.values() if p.requires_grad)


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"image_size must be (height, width) in positive whole pixels; got {image_size!r}")
    return size  # type: ignore[return-value]


def _load_settings(model: nn.Module, detections: DetectionMode) -> list[tuple[Any, str, float]]:
    """(module, attribute, value) that fix the R-CNN load: all proposals kept, and the detections asked for."""
    if detections not in _SCORE_THRESH:
        raise ValueError(f"detections must be one of {list(DETECTION_MODES)}; got {detections!r}")
    settings: list[tuple[Any, str, float]] = []
    rpn, roi_heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    if hasattr(rpn, "nms_thresh"):
        settings.append((rpn, "nms_thresh", 1.0))  # NMS at IoU 1 drops nothing: rpn_post_nms_top_n_test proposals
    if hasattr(roi_heads, "score_thresh"):
        settings.append((roi_heads, "score_thresh", _SCORE_THRESH[detections]))
        if detections == "max":
            settings.append((roi_heads, "nms_thresh", 1.0))
    return settings


def _counting_copy(model: nn.Module, detections: DetectionMode) -> nn.Module:
    """A copy of ``model`` in eval mode with :func:`_load_settings` applied; ``model`` itself is never changed."""
    settings = _load_settings(model, detections)
    work = copy.deepcopy(model).eval()
    copies = dict(zip(model.modules(), work.modules()))
    for obj, name, value in settings:
        setattr(copies[obj], name, value)
    return work


def _sizes(model: nn.Module, image: torch.Tensor) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(resized, padded) sizes of ``image`` through the model's own transform, if it has one."""
    transform = getattr(model, "transform", None)
    if not isinstance(transform, nn.Module):
        return None, None
    batch, _ = transform([image])
    return tuple(batch.image_sizes[0]), tuple(batch.tensors.shape[-2:])  # type: ignore[return-value]


def analyze_model(
    model: nn.Module, image_size: Sequence[int], *, detections: DetectionMode = "max", seed: int = 0
) -> ModelAnalysis:
    """Count parameters and FLOPs of one eval-mode forward of ``model`` on one random image.

    Args:
        model: a torchvision-style detector taking a list of [3, H, W] float images in [0, 1]
            (ours from :func:`~detection.build_detector`, or torchvision's own).
        image_size: (height, width) of the image, in pixels. The model's transform still resizes it
            as ``min_size`` / ``max_size`` say (``input_size`` of the result tells the size it ran at).
        detections: ``"max"`` or ``"none"``: the boxes the mask / keypoint heads get (module docstring).
        seed: seed of the random image.

    Returns:
        A :class:`ModelAnalysis`; its groups add up to its totals. The count runs on a copy of
        ``model`` (eval mode, the thresholds set for the count), so ``model`` is left as it was.
    """
    size = _check_size(image_size)
    param = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, *size, generator=generator).to(param.device if param is not None else "cpu")
    model = _counting_copy(model, detections)
    with torch.no_grad():
        input_size, padded_size = _sizes(model, image)
        with FlopCounterMode(display=False) as counter:
            outputs = model([image])
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    names = {m: f"{root}.{n}" if n else root for n, m in model.named_modules()}
    groups = []
    for name, modules in module_groups(model).items():
        params, trainable = _param_counts(modules)
        groups.append(GroupCount(name, params, trainable, sum(counts.get(names[m], 0) for m in modules)))
    total_params, total_trainable = _param_counts([model])
    total_flops = counter.get_total_flops()
    rest = [total_params - sum(g.params for g in groups), total_trainable - sum(g.trainable_params for g in groups),
            total_flops - sum(g.flops for g in groups)]
    assert min(rest) >= 0, f"overlapping groups: {rest}"
    groups.append(GroupCount(OTHER, *rest))
    first = outputs[0] if isinstance(outputs, (list, tuple)) and outputs else {}
    boxes = first.get("boxes") if isinstance(first, dict) else None
    return ModelAnalysis(
        groups=tuple(groups), params=total_params, trainable_params=total_trainable, flops=total_flops,
        flops_by_op={str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()},
        image_size=size, input_size=input_size, padded_size=padded_size,
        detections=0 if boxes is None else len(boxes),
    )


def analysis_model(cfg: ExperimentConfig, image_size: Sequence[int] | None = None) -> tuple[nn.Module, tuple[int, int]]:
    """The detector ``cfg`` builds, without loading weights, and the image size to count it at.

    The backbone's weights are dropped (nothing is read or downloaded); the norm and trainable
    stages they imply are kept, so parameter counts match a training run. ``num_classes`` is
    :func:`analysis_num_classes`. With ``image_size``
    (height, width) the model's resize is set to it (``min_size`` = the shorter side,
    ``max_size`` = the longer), so the network runs at exactly that size; without it the image is a
    square of the test ``min_size`` (the last one of a list).
    """
    from .trainer import build_model

    m = cfg.model
    # Built without weights at full trainability, then frozen as the weights would have it (frozen
    # random stages would warn at build time).
    bb = dataclasses.replace(m.backbone, weights=None, norm=m.backbone.resolved_norm(), trainable_stages=None)
    changes: dict[str, Any] = {"backbone": bb}
    if image_size is not None:
        size = _check_size(image_size)
        changes.update(min_size=min(size), max_size=max(size))
    else:
        side = m.min_size[-1] if isinstance(m.min_size, tuple) else m.min_size
        size = (side, side)
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(m, **changes)), analysis_num_classes(cfg))
    body = getattr(model.backbone, "body", None)
    if isinstance(body, ResNetBody):
        body.freeze(m.backbone.resolved_trainable_stages())
    return model, size


def analysis_num_classes(cfg: ExperimentConfig) -> int:
    """``model.num_classes``, or without it the arch's default (the dataset is not read)."""
    return cfg.model.num_classes or arch_spec(cfg.model.arch).default_num_classes


def analyze_config(
    cfg: ExperimentConfig, image_size: Sequence[int] | None = None, *, detections: DetectionMode = "max"
) -> ModelAnalysis:
    """:func:`analyze_model` of the detector ``cfg`` describes (see :func:`analysis_model` for the size)."""
    model, size = analysis_model(cfg, image_size)
    return analyze_model(model, size, detections=detections)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def format_analysis(analysis: ModelAnalysis, title: Sequence[str] = ()) -> str:
    """A readable table: params, trainable params, GFLOPs and share of the FLOPs per group, then the total."""
    a = analysis
    lines = list(title)
    sized = f"image {a.image_size[0]}x{a.image_size[1]}"
    if a.input_size is not None and a.padded_size is not None:
        sized += f", resized to {a.input_size[0]}x{a.input_size[1]}, padded to {a.padded_size[0]}x{a.padded_size[1]}"
    lines.append(f"{sized}; eval mode, {a.detections} detection(s) into the RoI heads")
    header = f"{'group':<26}{'params':>12}{'trainable':>12}{'GFLOPs':>11}{'share':>8}"
    lines += [header, "-" * len(header)]
    total = GroupCount("total", a.params, a.trainable_params, a.flops)
    for depth, g in [*a.rows(), (0, total)]:
        if g is total:
            lines.append("-" * len(header))
        share = f"{100 * g.flops / a.flops:.1f}%" if a.flops else "-"
        label = ("  " * depth) + (g.name.split(".", 1)[1] if depth else g.name)
        lines.append(f"{label:<26}{_si(g.params):>12}{_si(g.trainable_params):>12}{g.flops / 1e9:>11.3f}{share:>8}")
    lines.append(f"= {a.macs / 1e9:.3f} GMACs (multiply-adds: the unit of torchvision's weights meta '_ops')")
    lines.append("FLOPs: 2 per multiply-add of conv / linear / matmul (torch.utils.flop_counter); RoIAlign, NMS, "
                 "norms, activations and interpolation count none.")
    return "\n".join(lines) + "\n"
