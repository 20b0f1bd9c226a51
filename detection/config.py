"""Experiment configuration: the typed schema and the strict YAML loader.

The schema is a tree of frozen, keyword-only dataclasses whose field defaults *are* the defaults::

    ExperimentConfig
      model: ModelConfig        (model.backbone is backbone.BackboneConfig, model.backbone.fpn is FPNConfig)
      data:  DataConfig         (data.train / data.val: DatasetConfig, data.shapes: ShapesConfig)
      train: TrainConfig        (train.optimizer, train.schedule, train.amp)
      eval:  EvalConfig
      output_dir: str

YAML files hold only differences from those defaults. A file may inherit from others through the
reserved top-level key ``base:`` (a path or a list of paths, relative to the file): bases are resolved
depth-first in order, then the file is deep-merged on top. Mappings merge; lists and scalars replace.
Command-line overrides (``--set train.optimizer.lr=0.01``) are applied after the file merge and go
through the same strict converter, so a typo on the command line fails exactly like a typo in a file.

Example::

    cfg = load_config("configs/mask_rcnn_r50_fpn_1x_coco.yaml", ["train.batch_size=4"])
    cfg.model.backbone.name        # "resnet50"
    dump_config(cfg, "output/config.yaml")   # load_config("output/config.yaml") == cfg

Every user error raises :class:`ConfigError` with the file (or ``--set``), the full dotted key, what
was expected and what was received.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import os
import re
import textwrap
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints, overload

import yaml

from backbone.config import BackboneConfig

__all__ = [
    "ARCH_NAMES",
    "AmpConfig",
    "ArchName",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DataConfig",
    "DatasetConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "ShapesConfig",
    "TrainConfig",
    "config_reference",
    "config_to_dict",
    "default_iou_types",
    "diff_configs",
    "dump_config",
    "field_descriptions",
    "format_config",
    "from_dict",
    "load_config",
    "load_config_with_origins",
    "parse_overrides",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ArchName = Literal[
    "faster_rcnn",
    "faster_rcnn_v2",
    "mask_rcnn",
    "mask_rcnn_v2",
    "keypoint_rcnn",
    "retinanet",
    "retinanet_v2",
    "fcos",
]
#: Every accepted ``model.arch``, in the order of :data:`ArchName`.
ARCH_NAMES: tuple[str, ...] = get_args(ArchName)

#: Source label of values that no file and no override set.
DEFAULT_SOURCE = "default"
#: Source label of command-line overrides.
OVERRIDE_SOURCE = "--set"
_BASE_KEY = "base"
_BOOL_HINT = "YAML reads unquoted on/off/yes/no as booleans; quote it"


class ConfigError(ValueError):
    """A configuration file, override or value is invalid; the message names the source and dotted key."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The requested config file does not exist (both a :class:`ConfigError` and a ``FileNotFoundError``)."""


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Keyword arguments of torchvision's detector classes that dedicated fields already own.
_HEAD_RESERVED = {
    "backbone": "model.backbone",
    "num_classes": "model.num_classes",
    "min_size": "model.min_size",
    "max_size": "model.max_size",
    "rpn_anchor_generator": "model.anchor_sizes / model.aspect_ratios",
    "anchor_generator": "model.anchor_sizes / model.aspect_ratios",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The detector: torchvision architecture, backbone, input resizing and anchors.

    Attributes:
        arch: torchvision detector class to build: ``faster_rcnn``, ``faster_rcnn_v2``, ``mask_rcnn``,
            ``mask_rcnn_v2``, ``keypoint_rcnn``, ``retinanet``, ``retinanet_v2`` or ``fcos``.
        num_classes: number of classes *including background*, as torchvision counts them (COCO: 91
            with the original ids, 81 with contiguous labels). ``None`` uses the dataset's categories + 1.
        backbone: the ResNet + FPN backbone (:class:`backbone.BackboneConfig`).
        min_size: shorter image side after resizing inside the model (GeneralizedRCNNTransform), in
            pixels; a list gives multi-scale training (one size drawn per batch, the last one at test time).
        max_size: upper bound on the longer image side after resizing, in pixels.
        anchor_sizes: anchor sizes in pixels, one list per pyramid level (e.g. ``[[32], [64], [128],
            [256], [512]]``). ``None`` derives them from the level strides (the architecture's default).
        aspect_ratios: anchor height/width ratios, shared by every level. ``None`` uses the
            architecture's default (``[0.5, 1.0, 2.0]`` for the R-CNNs).
        head: extra keyword arguments for torchvision's detector class (e.g.
            ``box_detections_per_img``, ``rpn_post_nms_top_n_train``, ``box_score_thresh``); checked
            against the class signature when the detector is built.
    """

    arch: ArchName = "mask_rcnn"
    num_classes: int | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    anchor_sizes: tuple[tuple[int, ...], ...] | None = None
    aspect_ratios: tuple[float, ...] | None = None
    head: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raises ValueError/TypeError naming the field."""
        if self.arch not in ARCH_NAMES:
            raise ValueError(f"arch must be one of {list(ARCH_NAMES)}; got {self.arch!r}")
        if self.num_classes is not None:
            _require(
                _is_int(self.num_classes) and self.num_classes >= 2,
                "num_classes must be null (dataset categories + 1) or an int >= 2 (it counts the background "
                f"class, as in torchvision); got {self.num_classes!r}",
            )
        if not isinstance(self.backbone, BackboneConfig):
            raise TypeError(f"backbone must be a BackboneConfig, got {type(self.backbone).__name__}")
        sizes = (self.min_size,) if _is_int(self.min_size) else tuple(self.min_size)
        _require(
            len(sizes) > 0 and all(_is_int(s) and s > 0 for s in sizes),
            f"min_size must be a positive int or a non-empty list of positive ints; got {self.min_size!r}",
        )
        _require(
            _is_int(self.max_size) and self.max_size > 0,
            f"max_size must be a positive int; got {self.max_size!r}",
        )
        if self.anchor_sizes is not None:
            _require(
                len(self.anchor_sizes) > 0
                and all(
                    len(level) > 0 and all(_is_int(s) and s > 0 for s in level) for level in self.anchor_sizes
                ),
                "anchor_sizes must be a non-empty list with one non-empty list of positive ints per pyramid level, "
                f"e.g. [[32], [64], [128], [256], [512]]; got {self.anchor_sizes!r}",
            )
        if self.aspect_ratios is not None:
            _require(
                len(self.aspect_ratios) > 0 and all(r > 0 for r in self.aspect_ratios),
                f"aspect_ratios must be a non-empty list of positive numbers; got {self.aspect_ratios!r}",
            )
        for key, owner in _HEAD_RESERVED.items():
            if key in self.head:
                raise ValueError(f"head.{key} is set by {owner}; set that key instead of head.{key}")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One split of a COCO-format dataset.

    Attributes:
        ann_file: COCO instances JSON file (``instances_train2017.json``). Set together with ``img_dir``.
        img_dir: folder holding the images named by the JSON's ``file_name``.
        filter_empty: training split only: drop images without usable annotations (instead of
            keeping them as negatives). Evaluation always keeps every image.
        augment: training augmentations, applied in order; each item is ``{name: <transform>,
            <param>: <value>, ...}``, e.g. ``[{name: horizontal_flip, p: 0.5}]``. Names and
            parameters are checked by ``detection.data``. Ignored for evaluation.
    """

    ann_file: str | None = None
    img_dir: str | None = None
    filter_empty: bool = True
    augment: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that the paths come in pairs and that every augmentation has a name."""
        for name in ("ann_file", "img_dir"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value.strip() != ""),
                f"{name} must be a non-empty path or null; got {value!r}",
            )
        if (self.ann_file is None) != (self.img_dir is None):
            given, missing = ("ann_file", "img_dir") if self.img_dir is None else ("img_dir", "ann_file")
            raise ValueError(
                f"{missing} is not set but {given} is; a COCO split needs both ann_file and img_dir"
            )
        for i, spec in enumerate(self.augment):
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                raise ValueError(
                    f"augment[{i}] must be a mapping with a 'name', e.g. {{name: horizontal_flip, p: 0.5}}; "
                    f"got {spec!r}"
                )


@dataclass(frozen=True, kw_only=True)
class ShapesConfig:
    """The built-in synthetic dataset (coloured shapes with masks), generated on first use.

    Attributes:
        num_train: number of training images.
        num_val: number of validation images (0 disables evaluation).
        image_size: side of the square images, in pixels.
        min_objects: fewest objects per image.
        max_objects: most objects per image.
        size_range: object size (circle diameter, square / triangle side) as a fraction of the image side,
            drawn uniformly in ``[low, high]``.
        distractors: ``[fewest, most]`` irregular unannotated blobs painted into each background.
        min_visible: every annotated object keeps at least this fraction of its pixels visible when later
            objects overlap it.
        seed: generator seed; the same seed gives byte-identical images and annotations.
        cache_dir: folder the generated dataset is written to and reused from (``~`` is expanded at
            use time); one sub-folder per setting of the fields above.
    """

    num_train: int = 500
    num_val: int = 100
    image_size: int = 256
    min_objects: int = 1
    max_objects: int = 6
    size_range: tuple[float, float] = (0.10, 0.45)
    distractors: tuple[int, int] = (1, 3)
    min_visible: float = 0.3
    seed: int = 0
    cache_dir: str = "~/.cache/resnet_fpn_det/shapes"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check counts, sizes and the object range."""
        _require(self.num_train >= 1, f"num_train must be >= 1; got {self.num_train}")
        _require(self.num_val >= 0, f"num_val must be >= 0; got {self.num_val}")
        _require(self.image_size >= 16, f"image_size must be >= 16 pixels; got {self.image_size}")
        _require(self.max_objects >= 1, f"max_objects must be >= 1; got {self.max_objects}")
        _require(
            0 <= self.min_objects <= self.max_objects,
            f"min_objects must be in 0..max_objects ({self.max_objects}); got {self.min_objects}",
        )
        _require(
            0 < self.size_range[0] <= self.size_range[1] <= 1,
            f"size_range must be [low, high] with 0 < low <= high <= 1; got {list(self.size_range)}",
        )
        _require(
            0 <= self.distractors[0] <= self.distractors[1],
            f"distractors must be [fewest, most] with 0 <= fewest <= most; got {list(self.distractors)}",
        )
        _require(0 < self.min_visible <= 1, f"min_visible must be in (0, 1]; got {self.min_visible}")
        _require(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _require(self.cache_dir.strip() != "", "cache_dir must be a non-empty path")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are loaded.

    Attributes:
        source: ``"coco"`` reads ``train`` / ``val`` (COCO-format files); ``"shapes"`` uses the
            built-in synthetic dataset configured by ``shapes`` and ignores the ``train`` / ``val`` paths.
        train: the training split. Needed for training with ``source: coco`` (checked when a run starts).
        val: the validation split. Optional: a run without it skips evaluation.
        shapes: the synthetic dataset, used when ``source`` is ``"shapes"``.
        num_workers: DataLoader worker processes per training process (0 loads in the main process).
        aspect_ratio_grouping: batch images of similar aspect ratio together (less padding), as
            torchvision's references do.
        on_bad_image: what a missing or unreadable image does: ``"error"`` stops with the file name,
            ``"skip"`` skips it with a warning.
    """

    source: Literal["coco", "shapes"] = "coco"
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    on_bad_image: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ranges. Whether the files exist is checked at run time, not here."""
        _require(self.num_workers >= 0, f"num_workers must be >= 0; got {self.num_workers}")

    def validate_for_training(self) -> None:
        """Raise :class:`ConfigError` unless a training split is configured.

        Kept out of :meth:`validate` so that a defaults-only config (and evaluation-only configs)
        stay valid; the trainer calls it before building the data pipeline.
        """
        if self.source == "coco" and self.train.ann_file is None:
            raise ConfigError(
                "data.source is 'coco' but data.train.ann_file and data.train.img_dir are not set; set both "
                "(e.g. in a base file such as configs/base/coco_instances.yaml) or use data.source: shapes"
            )


@dataclass(frozen=True, kw_only=True)
class AmpConfig:
    """Automatic mixed precision (``torch.amp.autocast``; a GradScaler only for float16).

    Attributes:
        enabled: run the forward pass under autocast: ``true``, ``false``, or ``"auto"``: on CUDA, and on CPUs
            with native bfloat16 kernels (AVX512-BF16 or AMX); float32 elsewhere, where reduced-precision
            convolutions fall back to slow reference kernels.
        dtype: autocast dtype, ``"bfloat16"`` (no loss scaling needed) or ``"float16"`` (uses a GradScaler).
    """

    enabled: bool | Literal["auto"] = False
    dtype: Literal["float16", "bfloat16"] = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer (key ``train.optimizer``).

    Attributes:
        name: ``"sgd"`` (with momentum) or ``"adamw"``.
        lr: base learning rate, > 0 (before warm-up, schedule and optional batch scaling).
        momentum: SGD momentum in [0, 1); unused by AdamW.
        weight_decay: L2 weight decay (decoupled for AdamW), >= 0.
        no_decay_norm_and_bias: apply no weight decay to normalisation parameters and biases.
        betas: AdamW's two moment coefficients, each in [0, 1); unused by SGD.
        scale_lr_by_world_size: linear scaling rule: use ``lr * batch_size * world_size / base_batch_size``.
        base_batch_size: total batch size that ``lr`` was tuned for (used only when scaling).
        fused: AdamW only: update all parameters in one fused kernel (``torch.optim.AdamW(fused=True)``)
            where the parameters' device supports it (on CPU, torch's default is a slower per-tensor
            loop); the fused update computes the same rule (values differ by float rounding).
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_norm_and_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    scale_lr_by_world_size: bool = False
    base_batch_size: int = 16
    fused: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges."""
        _require(self.lr > 0, f"lr must be > 0; got {self.lr}")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1); got {self.momentum}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1); got {self.betas!r}",
        )
        _require(self.base_batch_size >= 1, f"base_batch_size must be >= 1; got {self.base_batch_size}")

    def scaled_lr(self, batch_size: int, world_size: int) -> float:
        """The learning rate actually used for ``batch_size`` images per process on ``world_size`` processes."""
        if not self.scale_lr_by_world_size:
            return self.lr
        return self.lr * batch_size * world_size / self.base_batch_size


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule (key ``train.schedule``), after a linear warm-up.

    Attributes:
        name: ``"multistep"`` (multiply by ``gamma`` at each milestone), ``"cosine"`` (decay to
            ``min_lr_factor * lr``) or ``"constant"``.
        unit: unit of ``milestones`` and of the cosine period: ``"iter"`` or ``"epoch"``.
        milestones: strictly increasing steps (in ``unit``) where ``multistep`` decays the rate.
        gamma: decay factor of ``multistep``, in (0, 1].
        min_lr_factor: final learning rate of ``cosine`` as a fraction of ``lr``, in [0, 1].
        warmup_iters: length of the linear warm-up, always in iterations (0 disables it).
        warmup_factor: learning-rate fraction at the first warm-up iteration, in (0, 1].
    """

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    unit: Literal["iter", "epoch"] = "iter"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_factor: float = 0.0
    warmup_iters: int = 1000
    warmup_factor: float = 0.001

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges and the milestone order."""
        _require(
            all(m > 0 for m in self.milestones)
            and all(a < b for a, b in zip(self.milestones[:-1], self.milestones[1:], strict=True)),
            f"milestones must be positive and strictly increasing; got {list(self.milestones)}",
        )
        _require(0 < self.gamma <= 1, f"gamma must be in (0, 1]; got {self.gamma}")
        _require(0 <= self.min_lr_factor <= 1, f"min_lr_factor must be in [0, 1]; got {self.min_lr_factor}")
        _require(self.warmup_iters >= 0, f"warmup_iters must be >= 0; got {self.warmup_iters}")
        _require(0 < self.warmup_factor <= 1, f"warmup_factor must be in (0, 1]; got {self.warmup_factor}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    Attributes:
        max_iters: training length in iterations. Exactly one of ``max_iters`` and ``epochs`` is set;
            set ``max_iters: null`` when using ``epochs``.
        epochs: training length in epochs (alternative to ``max_iters``).
        batch_size: images per process and iteration.
        optimizer: the optimizer (:class:`OptimizerConfig`).
        schedule: the learning-rate schedule (:class:`ScheduleConfig`).
        clip_grad_norm: clip the global gradient norm to this value (after unscaling); ``null`` disables it.
        accumulate_grad_steps: iterations whose gradients are summed before each optimizer step.
        amp: mixed precision for training (:class:`AmpConfig`).
        max_bad_steps: consecutive steps with a non-finite loss that are skipped before training stops
            with an error.
        checkpoint_period: save a checkpoint every this many iterations; 0 saves only at the end.
        keep_last: number of numbered checkpoints kept (the ``last`` one is always kept).
        eval_period: evaluate every this many iterations; 0 evaluates only at the end.
        log_period: log losses and learning rate every this many iterations.
        seed: base random seed (each data worker and process derives its own from it).
        deterministic: request deterministic algorithms (``torch.use_deterministic_algorithms``); slower.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        sync_bn: convert BatchNorm layers to SyncBatchNorm in distributed runs.
        channels_last: use the channels-last memory format (faster convolutions with AMP on recent GPUs).
        num_threads: ``torch.set_num_threads`` value for CPU runs; ``null`` keeps torch's default.
    """

    max_iters: int | None = 90000
    epochs: int | None = None
    batch_size: int = 2
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clip_grad_norm: float | None = None
    accumulate_grad_steps: int = 1
    amp: AmpConfig = field(default_factory=AmpConfig)
    max_bad_steps: int = 5
    checkpoint_period: int = 5000
    keep_last: int = 3
    eval_period: int = 0
    log_period: int = 20
    seed: int = 42
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_bn: bool = False
    channels_last: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges and that exactly one training length is given."""
        if self.max_iters is not None and self.epochs is not None:
            raise ValueError(
                f"max_iters ({self.max_iters}) and epochs ({self.epochs}) are both set; training length is one of "
                "them: set max_iters: null to train by epochs (max_iters defaults to 90000), or epochs: null"
            )
        if self.max_iters is None and self.epochs is None:
            raise ValueError("max_iters and epochs are both null; set one of them")
        _require(
            self.max_iters is None or self.max_iters >= 1, f"max_iters must be >= 1; got {self.max_iters}"
        )
        _require(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}")
        _require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            f"clip_grad_norm must be > 0 or null; got {self.clip_grad_norm}",
        )
        _require(
            self.accumulate_grad_steps >= 1,
            f"accumulate_grad_steps must be >= 1; got {self.accumulate_grad_steps}",
        )
        _require(self.max_bad_steps >= 1, f"max_bad_steps must be >= 1; got {self.max_bad_steps}")
        _require(
            self.checkpoint_period >= 0,
            f"checkpoint_period must be >= 0 (0 = only at the end); got {self.checkpoint_period}",
        )
        _require(self.keep_last >= 1, f"keep_last must be >= 1; got {self.keep_last}")
        _require(
            self.eval_period >= 0, f"eval_period must be >= 0 (0 = only at the end); got {self.eval_period}"
        )
        _require(self.log_period >= 1, f"log_period must be >= 1; got {self.log_period}")
        _require(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _require(
            self.num_threads is None or self.num_threads >= 1,
            f"num_threads must be >= 1 or null; got {self.num_threads}",
        )


_IOU_TYPES = ("bbox", "segm", "keypoints")


def default_iou_types(arch: str) -> tuple[str, ...]:
    """COCO evaluation types an architecture produces: ``bbox``, plus ``segm`` (Mask R-CNN) or ``keypoints``."""
    if arch.startswith("mask_rcnn"):
        return ("bbox", "segm")
    if arch == "keypoint_rcnn":
        return ("bbox", "keypoints")
    return ("bbox",)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """COCO evaluation.

    Attributes:
        amp: mixed precision for evaluation; off by default so that boxes are decoded in float32.
        batch_size: images per evaluation batch.
        backend: COCO evaluator, ``"pycocotools"`` or ``"faster_coco_eval"`` (same metrics, faster).
        iou_types: subset of ``bbox``, ``segm``, ``keypoints`` to evaluate; ``null`` follows the
            architecture (``bbox``, + ``segm`` for Mask R-CNN, + ``keypoints`` for Keypoint R-CNN).
        score_threshold: detections scoring below this, in [0, 1], are dropped before evaluation and
            visualisation.
        num_vis_images: number of validation images drawn into ``predictions.png`` (0 disables it).
        max_images: evaluate only the first N validation images (smoke runs); ``null`` uses all.
    """

    amp: AmpConfig = field(default_factory=lambda: AmpConfig(enabled=False))
    batch_size: int = 1
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    iou_types: tuple[str, ...] | None = None
    score_threshold: float = 0.0
    num_vis_images: int = 8
    max_images: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges and the IoU type names."""
        _require(self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}")
        if self.iou_types is not None:
            unknown = [t for t in self.iou_types if t not in _IOU_TYPES]
            _require(not unknown, f"iou_types has unknown entries {unknown}; choose from {list(_IOU_TYPES)}")
            _require(
                len(self.iou_types) > 0 and len(set(self.iou_types)) == len(self.iou_types),
                f"iou_types must be a non-empty list without repeats, or null; got {list(self.iou_types)}",
            )
        _require(
            0 <= self.score_threshold <= 1, f"score_threshold must be in [0, 1]; got {self.score_threshold}"
        )
        _require(self.num_vis_images >= 0, f"num_vis_images must be >= 0; got {self.num_vis_images}")
        _require(
            self.max_images is None or self.max_images >= 1,
            f"max_images must be >= 1 or null; got {self.max_images}",
        )

    def resolved_iou_types(self, arch: str) -> tuple[str, ...]:
        """``iou_types``, or the architecture's default when it is ``None``."""
        return default_iou_types(arch) if self.iou_types is None else tuple(self.iou_types)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """A whole experiment: what ``tools/train_det.py`` reads and saves as ``config.yaml``.

    Attributes:
        model: the detector (:class:`ModelConfig`).
        data: the datasets and loading (:class:`DataConfig`).
        train: the training loop (:class:`TrainConfig`).
        eval: the evaluation (:class:`EvalConfig`).
        output_dir: folder for checkpoints, logs, metrics and the resolved config
            (``tools/train_det.py --output-dir`` overrides it).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "output"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the rules that span sections (evaluation types against the architecture)."""
        _require(self.output_dir.strip() != "", "output_dir must be a non-empty path")
        if self.eval.iou_types is not None:
            produced = set(default_iou_types(self.model.arch))
            missing = [t for t in self.eval.iou_types if t not in produced]
            _require(
                not missing,
                f"eval.iou_types asks for {missing}, which model.arch={self.model.arch!r} does not predict; "
                f"it produces {list(default_iou_types(self.model.arch))}",
            )


# --------------------------------------------------------------------------------------------------
# Strict conversion: plain data -> dataclasses
# --------------------------------------------------------------------------------------------------


class _Mismatch(ConfigError):
    """A value whose type does not fit its annotation; ``path`` and ``hint`` let unions re-describe it."""

    def __init__(self, message: str, path: str, hint: str) -> None:
        super().__init__(message)
        self.path = path
        self.hint = hint


@dataclass
class _Context:
    source: str
    origins: Mapping[str, str] | None
    root: type
    root_prefix: str = ""


_HINTS: dict[type, dict[str, Any]] = {}
_NUMBER_RE = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    """Human-readable form of an annotation: ``int``, ``one of 'a', 'b'``, ``list of float or null``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if _is_union(tp):
        parts = [_describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            inner = {_describe(a) for a in args}
            return (
                f"list of {len(args)} {inner.pop()}"
                if len(inner) == 1
                else f"list [{', '.join(map(_describe, args))}]"
            )
        return f"list of {_describe(args[0]) if args else 'any value'}"
    if origin in (dict, Mapping) or tp is dict:
        value_type = args[1] if len(args) == 2 else Any
        return "mapping" if value_type is Any else f"mapping of str to {_describe(value_type)}"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _source_of(ctx: _Context, path: str) -> str:
    """The file (or ``--set``) that set ``path``, or its nearest recorded ancestor."""
    if ctx.origins:
        candidate = path
        while candidate:
            if candidate in ctx.origins:
                return ctx.origins[candidate]
            candidate = re.sub(r"(\[\d+\]|\.[^.\[]*|^[^.\[]*)$", "", candidate)
    return ctx.source


def _field_sources(cls: type, path: str, ctx: _Context) -> str:
    """Sources that set any non-section field of ``cls`` at ``path``: the inputs of a cross-field rule."""
    found: list[str] = []
    if ctx.origins:
        hints = _hints(cls)
        fields_here = [
            _join(path, f.name)
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(hints[f.name])
        ]
        for key, origin in ctx.origins.items():
            if origin not in found and any(_is_under(key, f) for f in fields_here):
                found.append(origin)
    return ", ".join(found) if found else ctx.source


def _mismatch(tp: Any, value: Any, path: str, ctx: _Context, hint: str = "") -> _Mismatch:
    where = f"{_source_of(ctx, path)}: {path or '<top level>'}"
    text = f"{where}: expected {_describe(tp)}, got {value!r} ({_type_name(value)})"
    return _Mismatch(text + (f"; {hint}" if hint else ""), path, hint)


def _shape_matches(tp: Any, value: Any) -> bool:
    """Whether ``value``'s container shape fits ``tp`` (used to pick a member of a union)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if isinstance(value, (list, tuple)):
        return origin in (tuple, list)
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(tp) or origin in (dict, Mapping) or tp is dict
    return not (dataclasses.is_dataclass(tp) or origin in (tuple, list, dict, Mapping) or tp is dict)


def _convert(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _mismatch(
                tp, value, path, ctx, f"valid keys: {', '.join(f.name for f in dataclasses.fields(tp))}"
            )
        return _convert_dataclass(tp, value, path, ctx)
    if _is_union(tp):
        return _convert_union(tp, value, path, ctx)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        hint = ""
        if isinstance(value, bool):
            hint = _BOOL_HINT
        elif isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in args if isinstance(c, str)], n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
        raise _mismatch(tp, value, path, ctx, hint)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value, path, ctx, "write true or false")
    if tp is int:
        if _is_int(value):
            return value
        hint = "true/false is not a number" if isinstance(value, bool) else ""
        raise _mismatch(tp, value, path, ctx, hint)
    if tp is float:
        if isinstance(value, float):
            return value
        if _is_int(value):
            return float(value)
        if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; accept it where a float is expected.
            logger.debug("%s: %s: reading the string %r as a float", _source_of(ctx, path), path, value)
            return float(value)
        hint = "true/false is not a number" if isinstance(value, bool) else ""
        raise _mismatch(tp, value, path, ctx, hint)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(
            tp, value, path, ctx, _BOOL_HINT if isinstance(value, bool) else "quote it to pass text"
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, path, ctx)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _mismatch(tp, value, path, ctx, f"it has {len(value)} items")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [
            _convert(t, v, f"{path}[{i}]", ctx)
            for i, (t, v) in enumerate(zip(item_types, value, strict=True))
        ]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path, ctx)
        value_type = args[1] if len(args) == 2 else Any
        out: dict[str, Any] = {}
        for key, item in value.items():
            _check_key(key, path, ctx)
            out[key] = _convert(value_type, item, _join(path, key), ctx)
        return out
    raise TypeError(f"{path}: the annotation {tp!r} is not supported by the config converter")


def _convert_union(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(tp, value, path, ctx)
    candidates = [a for a in args if a is not type(None) and _shape_matches(a, value)]
    if not candidates:
        raise _mismatch(tp, value, path, ctx, _BOOL_HINT if isinstance(value, bool) and str in args else "")
    if len(candidates) == 1:
        try:
            return _convert(candidates[0], value, path, ctx)
        except _Mismatch as exc:
            if exc.path != path:
                raise
            # Re-describe the expected type as the whole union ("int or null"), keeping the hint.
            raise _mismatch(tp, value, path, ctx, exc.hint) from None
    for candidate in candidates:
        try:
            return _convert(candidate, value, path, ctx)
        except _Mismatch:
            continue
    raise _mismatch(tp, value, path, ctx)


def _check_key(key: Any, path: str, ctx: _Context) -> None:
    if not isinstance(key, str):
        hint = f"; {_BOOL_HINT}" if isinstance(key, bool) else ""
        raise ConfigError(
            f"{_source_of(ctx, path)}: keys under '{path or '<top level>'}' must be strings; got {key!r} "
            f"({_type_name(key)}){hint}"
        )


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        paths.append(path)
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            paths.extend(_schema_paths(tp, path))
    return paths


def _unknown_key(cls: type, key: str, path: str, ctx: _Context) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    full = _join(path, key)
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        suggestion = f" (did you mean '{close[0]}'?)"
    else:
        # A right name at the wrong level (train.lr instead of train.optimizer.lr) is a common slip.
        elsewhere = [p for p in _schema_paths(ctx.root, ctx.root_prefix) if p.rsplit(".", 1)[-1] == key]
        suggestion = f" (did you mean {' or '.join(repr(p) for p in elsewhere[:3])}?)" if elsewhere else ""
    where = f"under '{path}'" if path else "at the top level"
    return ConfigError(
        f"{_source_of(ctx, full)}: unknown key '{full}'{suggestion}. Valid keys {where}: {', '.join(names)}"
    )


def _validation_message(cls: type, exc: Exception, path: str, ctx: _Context) -> str:
    """Prefix a ``validate()`` message with its source and turn its leading field name into a dotted key."""
    message = str(exc)
    names = {f.name for f in dataclasses.fields(cls)}
    token = re.match(r"[A-Za-z_][\w.]*", message)
    key = None
    if token:
        head, _, rest = token.group(0).partition(".")
        if head in names:
            key = _join(path, token.group(0))
        elif rest and head == path.rpartition(".")[2] and rest.split(".")[0] in names:
            # Nested classes name themselves ("fpn.out_channels must ...") when the path already ends in "fpn".
            key = _join(path, rest)
    if key is not None and ctx.origins and key in ctx.origins:
        source = ctx.origins[key]
    else:
        # The named field kept its default: blame whatever set the other fields of this section.
        source = _field_sources(cls, path, ctx)
    if key is not None and token is not None:
        return f"{source}: {key}{message[token.end() :]}"
    return f"{source}: {path or '<top level>'}: {message}"


def _convert_dataclass(cls: type[_T], data: Mapping[str, Any], path: str, ctx: _Context) -> _T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        _check_key(key, path, ctx)
        if key not in names:
            raise _unknown_key(cls, key, path, ctx)
    hints = _hints(cls)
    kwargs = {key: _convert(hints[key], value, _join(path, key), ctx) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(_validation_message(cls, exc, path, ctx)) from exc


def from_dict(
    cls: type[_T],
    data: Mapping[str, Any],
    *,
    source: str,
    prefix: str = "",
    origins: Mapping[str, str] | None = None,
) -> _T:
    """Build the dataclass ``cls`` from plain data (parsed YAML), strictly.

    Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`. The only coercions
    are int -> float and numeric strings -> float (PyYAML reads ``1e-4`` as a string).

    Args:
        cls: a dataclass whose fields are annotated with int, float, bool, str, ``Literal[...]``,
            ``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[str, X]``, ``Any`` or nested dataclasses.
        data: a mapping with string keys, e.g. from ``yaml.safe_load``.
        source: what to call the origin of ``data`` in messages (usually a file name).
        prefix: dotted path of ``data`` inside the whole config (``"model.backbone"``), for messages.
        origins: optional dotted path -> source map (from :func:`load_config_with_origins`); when given,
            each error names the file that set the offending key instead of ``source``.

    Returns:
        An instance of ``cls``.
    """
    ctx = _Context(source=source, origins=origins, root=cls, root_prefix=prefix)
    if not isinstance(data, Mapping):
        raise _mismatch(cls, data, prefix, ctx)
    return _convert_dataclass(cls, data, prefix, ctx)


# --------------------------------------------------------------------------------------------------
# YAML files, inheritance and overrides
# --------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return "invalid YAML: " + " ".join(str(exc).split())


def _parse_yaml(text: str, display: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{display}: {_yaml_error(exc)}") from None


def _mark(tree: Any, origin: str, prefix: str, origins: dict[str, str]) -> None:
    """Record ``origin`` for ``prefix`` and every mapping key below it (lists are leaves)."""
    origins[prefix] = origin
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _mark(value, origin, _join(prefix, str(key)), origins)


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _merge(
    dst: dict[Any, Any],
    dst_origins: dict[str, str],
    src: Mapping[Any, Any],
    src_origins: Mapping[str, str],
    prefix: str = "",
) -> None:
    """Deep-merge ``src`` into ``dst``: mappings merge, lists and scalars replace; origins follow the values."""
    for key, value in src.items():
        path = _join(prefix, str(key))
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            if path in src_origins:
                dst_origins[path] = src_origins[path]
            _merge(dst[key], dst_origins, value, src_origins, path)
            continue
        for stale in [p for p in dst_origins if _is_under(p, path)]:
            del dst_origins[stale]
        dst[key] = _plain_tree(value)
        dst_origins.update({p: o for p, o in src_origins.items() if _is_under(p, path)})


def _plain_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    return value


def _base_paths(raw: Any, display: str) -> list[str]:
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
        raise ConfigError(
            f"{display}: '{_BASE_KEY}' must be a path or a list of paths (relative to this file); got {raw!r}"
        )
    return items


def _read_file(path: Path, display: str) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileNotFoundError(f"config file '{display}' not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config path '{display}' is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{display}': {exc}") from None
    data = _parse_yaml(text, display)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{display}: the top level must be a mapping of keys (model:, train:, ...); got {_type_name(data)}"
        )
    return data


def _resolve_file(
    path: Path, display: str, chain: list[tuple[Path, str]]
) -> tuple[dict[Any, Any], dict[str, str]]:
    """Load ``path`` with its bases (depth-first, in order), merged; returns the tree and its origins."""
    resolved = path.resolve()
    for previous, _ in chain:
        if previous == resolved:
            names = [name for _, name in chain] + [display]
            raise ConfigError(f"{chain[-1][1]}: '{_BASE_KEY}' cycle: {' -> '.join(names)}")
    data = _read_file(path, display)
    bases = _base_paths(data.pop(_BASE_KEY, None), display)
    merged: dict[Any, Any] = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_display = os.path.normpath(os.path.join(os.path.dirname(display), os.path.expanduser(base)))
        base_path = path.parent / os.path.expanduser(base)
        if not base_path.is_file():
            raise ConfigError(
                f"{display}: base file '{base}' not found (looked for '{base_path}'); '{_BASE_KEY}' paths are "
                "relative to the file that names them"
            )
        tree, tree_origins = _resolve_file(base_path, base_display, [*chain, (resolved, display)])
        _merge(merged, origins, tree, tree_origins)
    own_origins: dict[str, str] = {}
    for key, value in data.items():
        _mark(value, display, str(key), own_origins)
    _merge(merged, origins, data, own_origins)
    return merged, origins


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``"a.b.c=value"`` strings into ``(dotted_key, value)``; values are read as YAML.

    Examples: ``train.optimizer.lr=0.01`` -> 0.01, ``model.min_size=[640,800]`` -> [640, 800],
    ``data.train.augment=[{name: horizontal_flip}]`` -> a list with one mapping, ``model.num_classes=null``
    -> None. Quote text that YAML would read otherwise (``'train.device="on"'``).
    """
    if isinstance(overrides, str):
        raise ConfigError(
            f"{OVERRIDE_SOURCE}: overrides must be a list of KEY=VALUE strings, got the string {overrides!r}"
        )
    parsed = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: malformed override {item!r}; expected KEY=VALUE with a dotted key, "
                "for example train.optimizer.lr=0.01 or model.backbone.name=resnet18"
            )
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: malformed key {key!r} in {item!r}; empty part between dots"
            )
        if not text.strip():
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: {key}: empty value in {item!r}; write {key}=null to set null"
            )
        parsed.append((key, _parse_yaml(text, f"{OVERRIDE_SOURCE} {key}")))
    return parsed


def _apply_overrides(merged: dict[Any, Any], origins: dict[str, str], overrides: Sequence[str]) -> None:
    for key, value in parse_overrides(overrides):
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part.strip(): nested}
        nested_origins: dict[str, str] = {}
        for name, sub in nested.items():
            _mark(sub, OVERRIDE_SOURCE, name, nested_origins)
        _merge(merged, origins, nested, nested_origins)


@overload
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ...
) -> tuple[ExperimentConfig, dict[str, str]]: ...
@overload
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ..., *, cls: type[_T]
) -> tuple[_T, dict[str, str]]: ...
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, cls: type[Any] = ExperimentConfig
) -> tuple[Any, dict[str, str]]:
    """Like :func:`load_config`, and also return where every value came from.

    Returns:
        ``(config, origins)``: ``origins`` maps each dotted key that a file or override set to that file
        (as displayed: the path given, bases joined to the including file's folder) or ``"--set"``.
        Sections appear too, with the last source that touched them. Keys absent from it hold their default.
    """
    merged: dict[Any, Any] = {}
    origins: dict[str, str] = {}
    source = DEFAULT_SOURCE
    if path is not None:
        source = os.fspath(path)
        merged, origins = _resolve_file(Path(os.path.expanduser(source)), source, [])
    _apply_overrides(merged, origins, overrides)
    if overrides and path is None:
        source = OVERRIDE_SOURCE
    return from_dict(cls, merged, source=source, origins=origins), origins


@overload
def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ...) -> ExperimentConfig: ...
@overload
def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ..., *, cls: type[_T]
) -> _T: ...
def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, cls: type[Any] = ExperimentConfig
) -> Any:
    """Load a YAML experiment config with its ``base:`` files and ``--set`` overrides, strictly.

    Args:
        path: the YAML file, or ``None`` for the defaults (plus ``overrides``).
        overrides: ``"dotted.key=value"`` strings, values read as YAML, applied after the file merge
            with the same rules (mappings merge, lists and scalars replace) and the same converter.
        cls: the root dataclass (``ExperimentConfig``).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist.
        ConfigError: invalid YAML, a missing base, a ``base:`` cycle, an unknown key, a wrong type or an
            out-of-range value; the message names the file (or ``--set``) and the dotted key.

    Example::

        cfg = load_config("configs/smoke/tiny_cpu.yaml", ["train.max_iters=4", "model.backbone.name=resnet34"])
    """
    return load_config_with_origins(path, overrides, cls=cls)[0]


# --------------------------------------------------------------------------------------------------
# Output: plain dicts, YAML, diffs and the reference
# --------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain, YAML-dumpable data (nested dicts; tuples become lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict expects a config dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML; ``load_config(path) == cfg`` holds for the written file."""
    Path(path).write_text(format_config(cfg), encoding="utf-8")


def _flow(value: Any) -> str:
    """One-line YAML for a value (``resnet18``, ``null``, ``[32, 64]``, ``{name: horizontal_flip}``)."""
    text = yaml.safe_dump(
        value, default_flow_style=True, width=2**31 - 1, allow_unicode=True, sort_keys=False
    )
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


def format_config(cfg: Any, origins: Mapping[str, str] | None = None) -> str:
    """The config as YAML text; with ``origins``, each leaf ends in ``# <file>``, ``# --set`` or ``# default``.

    Args:
        cfg: a config dataclass or the plain dict from :func:`config_to_dict`.
        origins: dotted key -> source, as returned by :func:`load_config_with_origins`.
    """
    data = cfg if isinstance(cfg, Mapping) else config_to_dict(cfg)
    if origins is None:
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    lines: list[str] = []

    def emit(tree: Mapping[str, Any], indent: int, prefix: str) -> None:
        for key, value in tree.items():
            path = _join(prefix, str(key))
            if isinstance(value, Mapping) and value:
                lines.append(f"{' ' * indent}{_flow(key)}:")
                emit(value, indent + 2, path)
            else:
                lines.append(
                    f"{' ' * indent}{_flow(key)}: {_flow(value)}  # {origins.get(path, DEFAULT_SOURCE)}"
                )

    emit(data, 0, "")
    return "\n".join(lines) + "\n"


_MISSING = object()


def _diff_value(value: Any) -> str:
    return "<missing>" if value is _MISSING else _flow(value)


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, as ``"key: <a value> != <b value>"``.

    Args:
        a: a plain config (or section) from :func:`config_to_dict`; config dataclasses are accepted too.
        b: the config to compare with.
        prefix: dotted path of ``a`` / ``b`` inside the whole config, prepended to each key.

    Returns:
        One line per differing leaf, in ``a``'s key order then keys only in ``b``, e.g.
        ``["model.backbone.name: resnet18 != resnet50"]``; empty when equal.
    """
    a = a if isinstance(a, Mapping) else config_to_dict(a)
    b = b if isinstance(b, Mapping) else config_to_dict(b)
    lines: list[str] = []
    for key in [*a, *(k for k in b if k not in a)]:
        path = _join(prefix, str(key))
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            lines.extend(diff_configs(left, right, path))
        elif left is _MISSING or right is _MISSING or _to_plain(left) != _to_plain(right):
            lines.append(f"{path}: {_diff_value(_to_plain(left))} != {_diff_value(_to_plain(right))}")
    return lines


def field_descriptions(cls: type) -> dict[str, str]:
    """Field name -> description, parsed from the ``Attributes:`` section of ``cls``'s docstring.

    Multi-line descriptions are joined into one line. Fields the docstring does not describe are absent.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    header_indent = len(lines[start]) - len(lines[start].lstrip())
    out: dict[str, list[str]] = {}
    entry_indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= header_indent:
            break
        if entry_indent is None:
            entry_indent = indent
        match = re.match(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line.strip())
        if indent == entry_indent and match:
            current = match.group(1)
            out[current] = [match.group(2)]
        elif current is not None:
            out[current].append(line.strip())
    return {name: " ".join(" ".join(parts).split()) for name, parts in out.items()}


def _plain_text(text: str) -> str:
    """Drop reStructuredText markup (``:class:`X``` -> X, double backticks -> single) for terminal output."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


def config_reference(cls: type = ExperimentConfig) -> str:
    """Render every dotted key with its type, default and description (from the class docstrings).

    This is the configuration reference printed by ``tools/print_config.py --reference``; since it is
    generated from the dataclasses, it cannot drift from the code.
    """
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")
    out = [
        f"Configuration reference ({cls.__name__}). YAML files hold only differences from these defaults.",
        "",
        f"{_BASE_KEY}  (path or list of paths; top level only)",
        *wrap.wrap(
            "Files this one inherits from, relative to it; loaded depth-first in order, then this file is merged "
            "on top (mappings merge, lists and scalars replace)."
        ),
        "",
    ]

    def walk(section: type, prefix: str) -> None:
        descriptions = field_descriptions(section)
        hints = _hints(section)
        for f in dataclasses.fields(section):
            path = _join(prefix, f.name)
            tp = hints[f.name]
            description = descriptions.get(f.name, "(no description)")
            if dataclasses.is_dataclass(tp):
                out.append(f"{path}  (section: {tp.__name__})")
                out.extend(wrap.wrap(_plain_text(description)))
                out.append("")
                walk(tp, path)
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = _MISSING
            shown = "required" if default is _MISSING else f"default: {_flow(_to_plain(default))}"
            out.append(f"{path}  ({_describe(tp)}; {shown})")
            out.extend(wrap.wrap(_plain_text(description)))
            out.append("")

    walk(cls, "")
    return "\n".join(out).rstrip() + "\n"
