"""The experiment schema: frozen, keyword-only dataclasses whose field defaults *are* the defaults.

::

    ExperimentConfig
      model: ModelConfig        (model.backbone: backbone.BackboneConfig, model.head: HeadConfig)
      data:  DataConfig         (data.train: TrainDatasetConfig, data.val: DatasetConfig, data.shapes: ShapesConfig)
      train: TrainConfig        (train.optimizer, train.schedule, train.amp, train.ema)
      eval:  EvalConfig
      output_dir: str

Each field carries its description and range (:func:`~detection.config.fields.option`); each section
checks itself when built and raises :class:`~detection.config.errors.FieldError` naming the field.
Architecture names and evaluation types come from :mod:`detection.archs`, autocast dtypes from
:mod:`detection.precision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from backbone.config import BackboneConfig

from ..archs import ARCHS, EVAL_BACKENDS, IOU_TYPES, arch_spec
from ..precision import AUTOCAST_DTYPES
from .data import DataConfig
from .errors import FieldError
from .fields import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_FRACTION, UNIT, Bound, Section, option
from .head import HeadConfig

__all__ = [
    "AmpConfig",
    "ArchName",
    "EmaConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TTAConfig",
    "TrainConfig",
]

#: Every accepted ``model.arch``: the names of :data:`detection.archs.ARCHS`.
ArchName = Literal[tuple(ARCHS)]  # type: ignore[valid-type]
IouType = Literal[IOU_TYPES]  # type: ignore[valid-type]
AmpDtype = Literal[AUTOCAST_DTYPES]  # type: ignore[valid-type]
EvalBackend = Literal[EVAL_BACKENDS]  # type: ignore[valid-type]

_BELOW_1 = Bound(0, 1, high_open=True)
_OPEN_UNIT = Bound(0, 1, low_open=True, high_open=True)


def _fpn_extra_levels(extra: str) -> int:
    """Levels that ``model.backbone.fpn.extra`` adds on top of the FPN's inputs."""
    from backbone.config import FPN_EXTRA_LEVELS

    return FPN_EXTRA_LEVELS[extra]


def _levels_source(model: ModelConfig) -> str:
    spec = arch_spec(model.arch)
    body = model.backbone.out_features or spec.out_features
    text = f"model.arch={model.arch!r} with backbone.out_features={list(body)}"
    if model.backbone.fpn.enabled:
        text += f" and backbone.fpn.extra={model.backbone.fpn.extra or spec.fpn_extra!r}"
    return text


def _fit_anchor_sizes(sizes: tuple[tuple[int, ...], ...], n: int) -> list[list[int]]:
    """``sizes`` cut or extended to ``n`` levels; each added level doubles the one below (the stride does)."""
    fitted = [list(level) for level in sizes[:n]]
    while len(fitted) < n:
        fitted.append([2 * s for s in fitted[-1]])
    return fitted


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """The detector: torchvision architecture, backbone, input resizing, anchors and head options."""

    arch: ArchName = option(
        "mask_rcnn", doc="torchvision detector to build; the names are the entries of detection.archs.ARCHS."
    )
    num_classes: int | None = option(
        None,
        bound=Bound(2),
        doc="number of classes including background, as torchvision counts them (COCO: 91 with the original "
        "ids, 81 with contiguous labels); null uses the dataset's categories + 1.",
    )
    backbone: BackboneConfig = option(factory=BackboneConfig, doc="the ResNet + FPN backbone.")
    min_size: int | tuple[int, ...] = option(
        800,
        bound=COUNT,
        doc="shorter image side after resizing inside the model, in pixels; a list gives multi-scale "
        "training (one size drawn per batch, the last one at test time).",
    )
    max_size: int = option(
        1333, bound=COUNT, doc="upper bound on the longer image side after resizing, in pixels."
    )
    anchor_sizes: tuple[tuple[int, ...], ...] | None = option(
        None,
        doc="anchor sizes in pixels, one list per pyramid level (e.g. [[32], [64], [128], [256], [512]]); "
        "null derives them from the level strides (the architecture's default).",
    )
    aspect_ratios: tuple[float, ...] | None = option(
        None,
        bound=POSITIVE,
        doc="anchor height/width ratios, shared by every level; null uses the architecture's default "
        "([0.5, 1.0, 2.0] for the R-CNNs and RetinaNet, [1.0] for FCOS).",
    )
    head: HeadConfig = option(
        factory=HeadConfig,
        doc="options of torchvision's detector class and of build_detector's heads; null keeps torchvision's "
        "default, and each applies only to the archs it names.",
    )

    def validate(self) -> None:
        """Check ranges, the anchors, and that every head option set applies to ``arch``."""
        super().validate()
        if self.arch not in ARCHS:
            raise FieldError("arch", f"must be one of {list(ARCHS)}; got {self.arch!r}")
        if not isinstance(self.backbone, BackboneConfig):
            raise FieldError("backbone", f"must be a BackboneConfig, got {type(self.backbone).__name__}")
        if not isinstance(self.head, HeadConfig):
            raise FieldError("head", f"must be a HeadConfig, got {type(self.head).__name__}")
        if self.anchor_sizes is not None and not (
            self.anchor_sizes and all(level and all(s >= 1 for s in level) for level in self.anchor_sizes)
        ):
            raise FieldError(
                "anchor_sizes",
                "must be a non-empty list with one non-empty list of positive ints per pyramid level, "
                f"e.g. [[32], [64], [128], [256], [512]]; got {self.anchor_sizes!r}",
            )
        self._check_anchor_levels()
        try:
            self.head.check_arch(self.arch)
        except FieldError as exc:
            raise FieldError(f"head.{exc.field}", exc.problem) from None

    def pyramid_levels(self) -> tuple[str, ...]:
        """Names of the feature levels the detector's backbone produces, e.g. ``("p2", ..., "p6")``.

        The backbone's ``out_features`` (the arch's default when null) feed the FPN, which adds
        ``fpn.extra``'s levels (the arch's default when null) on top; without the FPN the body levels
        themselves (``"c3"``, ...) are the outputs. Anchors need one size list per level.
        """
        backbone = arch_spec(self.arch).backbone_config(self.backbone)
        body = backbone.resolved_out_features()
        if not backbone.fpn.enabled:
            return tuple(body)
        extra = backbone.fpn.resolved_extra()
        top = int(body[-1][1:])
        return tuple(f"p{name[1:]}" for name in body) + tuple(
            f"p{top + k}" for k in range(1, _fpn_extra_levels(extra) + 1)
        )

    def _check_anchor_levels(self) -> None:
        if self.anchor_sizes is None:
            return
        levels = self.pyramid_levels()
        if len(self.anchor_sizes) != len(levels):
            raise FieldError(
                "anchor_sizes",
                f"has {len(self.anchor_sizes)} size list(s) but {_levels_source(self)} gives {len(levels)} "
                f"pyramid levels ({', '.join(levels)}); give one list per level, e.g. "
                f"{_fit_anchor_sizes(self.anchor_sizes, len(levels))}, or null for the architecture's default",
            )


@dataclass(frozen=True, kw_only=True)
class AmpConfig(Section):
    """Automatic mixed precision (torch.autocast; a GradScaler only for float16)."""

    enabled: bool | Literal["auto"] = option(
        False,
        doc="run the forward pass under autocast: true, false, or auto: on CUDA, and on CPUs with native "
        "bfloat16 kernels (AVX512-BF16 or AMX); float32 elsewhere, where reduced-precision convolutions "
        "fall back to slow reference kernels.",
    )
    dtype: AmpDtype = option(
        "bfloat16", doc="autocast dtype: bfloat16 (no loss scaling needed) or float16 (uses a GradScaler)."
    )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig(Section):
    """The optimizer (key ``train.optimizer``)."""

    name: Literal["sgd", "adamw"] = option("sgd", doc="sgd (with momentum) or adamw.")
    lr: float = option(
        0.02, bound=POSITIVE, doc="base learning rate (before warm-up, schedule and optional batch scaling)."
    )
    momentum: float = option(0.9, bound=_BELOW_1, doc="SGD momentum; unused by AdamW.")
    weight_decay: float = option(1e-4, bound=NON_NEGATIVE, doc="L2 weight decay (decoupled for AdamW).")
    no_decay_norm_and_bias: bool = option(
        False, doc="apply no weight decay to normalisation parameters and biases."
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999), bound=_BELOW_1, doc="AdamW's two moment coefficients; unused by SGD."
    )
    scale_lr_by_world_size: bool = option(
        False, doc="linear scaling rule: use lr * batch_size * world_size / base_batch_size."
    )
    base_batch_size: int = option(
        16, bound=COUNT, doc="total batch size that lr was tuned for (used only when scaling)."
    )
    fused: bool = option(
        True,
        doc="AdamW only: update all parameters in one fused kernel (torch.optim.AdamW(fused=True)) where "
        "the parameters' device supports it (on CPU, torch's default is a slower per-tensor loop); the "
        "fused update computes the same rule (values differ by float rounding).",
    )

    def scaled_lr(self, batch_size: int, world_size: int) -> float:
        """The learning rate actually used for ``batch_size`` images per process on ``world_size`` processes."""
        if not self.scale_lr_by_world_size:
            return self.lr
        return self.lr * batch_size * world_size / self.base_batch_size


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(Section):
    """The learning-rate schedule (key ``train.schedule``), after a linear warm-up."""

    name: Literal["multistep", "cosine", "constant"] = option(
        "multistep",
        doc="multistep (multiply by gamma at each milestone), cosine (decay to min_lr_factor * lr) or constant.",
    )
    unit: Literal["iter", "epoch"] = option("iter", doc="unit of milestones and of the cosine period.")
    milestones: tuple[int, ...] = option(
        (),
        doc="positive, strictly increasing steps (in unit) where multistep decays the rate. When one lies "
        "at or beyond the training length, all are scaled by length / (9/8 x last milestone), keeping "
        "their ratios, with a warning.",
    )
    gamma: float = option(0.1, bound=POSITIVE_FRACTION, doc="decay factor of multistep.")
    min_lr_factor: float = option(0.0, bound=UNIT, doc="final learning rate of cosine as a fraction of lr.")
    warmup_iters: int = option(
        1000,
        bound=NON_NEGATIVE,
        doc="length of the linear warm-up, always in iterations (0 disables it). A warm-up of the whole "
        "training length or more is cut to a tenth of it, with a warning.",
    )
    warmup_factor: float = option(
        0.001, bound=POSITIVE_FRACTION, doc="learning-rate fraction at the first warm-up iteration."
    )

    def validate(self) -> None:
        """Check ranges and the milestone order."""
        super().validate()
        m = self.milestones
        if not (all(x > 0 for x in m) and all(a < b for a, b in zip(m[:-1], m[1:]))):
            raise FieldError("milestones", f"must be positive and strictly increasing; got {list(m)}")


@dataclass(frozen=True, kw_only=True)
class EmaConfig(Section):
    """An exponential moving average of the weights (key ``train.ema``; :class:`detection.ema.ModelEma`)."""

    enabled: bool = option(
        False,
        doc="keep an exponential moving average of the weights, updated after every optimizer step that "
        "changed them; checkpoints store it beside the trained weights.",
    )
    decay: float = option(
        0.9998,
        bound=_OPEN_UNIT,
        doc="weight of the old average in each update once the warm-up is over (mmdet's momentum 0.0002); "
        "the average spans about 1 / (1 - decay) optimizer steps.",
    )
    warmup_steps: int = option(
        2000,
        bound=NON_NEGATIVE,
        doc="time constant of the decay warm-up, in optimizer steps (skipped steps and accumulation "
        "micro-steps do not count): update n uses decay * (1 - exp(-n / warmup_steps)), so early "
        "weights fade fast (mmdet's ExpMomentumEMA, as in YOLOX); 0 uses decay from the start.",
    )
    evaluate: Literal["ema", "raw"] = option(
        "ema",
        doc="the weights that periodic and final evaluation use and that checkpoints store as 'model' "
        "(what eval_det and detection.load_run load): ema (the average) or raw (the trained weights).",
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """The training loop."""

    max_iters: int | None = option(
        90000,
        bound=COUNT,
        doc="training length in iterations. Exactly one of max_iters and epochs is set; set max_iters: null "
        "when using epochs.",
    )
    epochs: int | None = option(
        None, bound=COUNT, doc="training length in epochs (alternative to max_iters)."
    )
    time_budget: float | None = option(
        None,
        bound=POSITIVE,
        doc="wall-clock seconds for the training iterations (evaluation not included); null trains for "
        "max_iters. With a budget, max_iters (or epochs) is the most iterations: the throughput is measured "
        "over iterations 401-600 and the length that fits the rest of the budget is logged; the lr schedule "
        "follows it, and checkpoints save it, so --resume continues it. One plan: iterations that later run "
        "slower than measured overrun the budget by as much.",
    )
    batch_size: int = option(2, bound=COUNT, doc="images per process and iteration.")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig, doc="the optimizer.")
    schedule: ScheduleConfig = option(factory=ScheduleConfig, doc="the learning-rate schedule.")
    clip_grad_norm: float | None = option(
        None,
        bound=POSITIVE,
        doc="clip the global gradient norm to this value (after unscaling); null disables it.",
    )
    accumulate_grad_steps: int = option(
        1, bound=COUNT, doc="iterations whose gradients are summed before each optimizer step."
    )
    amp: AmpConfig = option(factory=AmpConfig, doc="mixed precision for training.")
    ema: EmaConfig = option(factory=EmaConfig, doc="the moving average of the weights.")
    max_bad_steps: int = option(
        5,
        bound=COUNT,
        doc="consecutive steps with a non-finite loss that are skipped before training stops with an error.",
    )
    checkpoint_period: int = option(
        5000, bound=NON_NEGATIVE, doc="save a checkpoint every this many iterations; 0 saves only at the end."
    )
    keep_last: int = option(
        3, bound=COUNT, doc="number of numbered checkpoints kept (the last one is always kept)."
    )
    eval_period: int = option(
        0, bound=NON_NEGATIVE, doc="evaluate every this many iterations; 0 evaluates only at the end."
    )
    log_period: int = option(20, bound=COUNT, doc="log losses and learning rate every this many iterations.")
    seed: int = option(
        42, bound=NON_NEGATIVE, doc="base random seed (each data worker and process derives its own from it)."
    )
    deterministic: bool = option(
        False, doc="request deterministic algorithms (torch.use_deterministic_algorithms); slower."
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", doc="auto (CUDA when available), cpu or cuda.")
    sync_bn: bool = option(False, doc="convert BatchNorm layers to SyncBatchNorm in distributed runs.")
    channels_last: bool | Literal["auto"] = option(
        "auto",
        doc="channels-last memory format for the convolutions: true, false, or auto: on CPU (oneDNN's "
        "convolutions run faster in it, in float32 and bfloat16) and under CUDA autocast, not for float32 on CUDA.",
    )
    num_threads: int | None = option(
        None, bound=COUNT, doc="torch.set_num_threads value for CPU runs; null keeps torch's default."
    )
    dist_timeout: float = option(
        300.0,
        bound=POSITIVE,
        doc="seconds a distributed process waits for the others at any collective (gradient all-reduce "
        "included) before stopping with a message naming the ranks that did not arrive.",
    )

    def validate(self) -> None:
        """Check ranges and that exactly one training length is given."""
        super().validate()
        if self.max_iters is not None and self.epochs is not None:
            raise FieldError(
                "max_iters",
                f"({self.max_iters}) and epochs ({self.epochs}) are both set; training length is one of them: "
                "set max_iters: null to train by epochs (max_iters defaults to 90000), or epochs: null",
            )
        if self.max_iters is None and self.epochs is None:
            raise FieldError("max_iters", "and epochs are both null; set one of them")


@dataclass(frozen=True, kw_only=True)
class TTAConfig(Section):
    """Test-time augmentation (key ``eval.tta``): :class:`detection.tta.TTADetector` in ``tools/eval_det.py``."""

    flip: bool = option(
        False, doc="also run every view on the horizontally mirrored image (boxes and masks mirrored back)."
    )
    scales: tuple[int, ...] = option(
        (),
        doc="shorter image side of each view in pixels, as detectron2's TEST.AUG.MIN_SIZES (e.g. [160, 192, "
        "224]); each view's longer-side cap is model.max_size x scale / model.min_size. [] runs the model's "
        "own size alone. Detections of all views are merged by per-class NMS. Used by tools/eval_det.py; "
        "evaluations during training stay plain, so model_best compares like with like.",
    )

    def validate(self) -> None:
        """Check that the scales are positive pixel sizes without repeats."""
        super().validate()
        if not all(s >= 1 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise FieldError(
                "scales",
                f"must hold positive pixel sizes without repeats, e.g. [160, 192, 224], or [] for the model's "
                f"own size; got {list(self.scales)}",
            )

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is asked for (``flip`` or at least one scale)."""
        return self.flip or bool(self.scales)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Section):
    """COCO evaluation."""

    amp: AmpConfig = option(
        factory=AmpConfig,
        doc="mixed precision for evaluation; off by default so that boxes are decoded in float32.",
    )
    batch_size: int = option(1, bound=COUNT, doc="images per evaluation batch.")
    backend: EvalBackend = option(
        "pycocotools", doc="COCO evaluator: pycocotools or faster_coco_eval (same metrics, faster)."
    )
    iou_types: tuple[IouType, ...] | None = option(
        None,
        doc="evaluation types, without repeats; null follows the architecture (bbox, + segm for Mask R-CNN, "
        "+ keypoints for Keypoint R-CNN).",
    )
    score_threshold: float = option(
        0.0, bound=UNIT, doc="detections scoring below this are dropped before evaluation and visualisation."
    )
    num_vis_images: int = option(
        8, bound=NON_NEGATIVE, doc="number of validation images drawn into predictions.png (0 disables it)."
    )
    vis_score_threshold: float = option(
        0.5,
        bound=UNIT,
        doc="detections scoring below this are not drawn in predictions.png; the threshold is written on "
        "the image, and so is 'no detections above' it where none is left.",
    )
    max_images: int | None = option(
        None, bound=COUNT, doc="evaluate only the first N validation images (smoke runs); null uses all."
    )
    tta: TTAConfig = option(factory=TTAConfig, doc="test-time augmentation: flipped and rescaled views, merged.")

    def validate(self) -> None:
        """Check ranges and that no IoU type repeats."""
        super().validate()
        if self.iou_types is not None and (
            not self.iou_types or len(set(self.iou_types)) != len(self.iou_types)
        ):
            raise FieldError(
                "iou_types", f"must be a non-empty list without repeats, or null; got {list(self.iou_types)}"
            )

    def resolved_iou_types(self, arch: str) -> tuple[str, ...]:
        """``iou_types``, or the architecture's evaluation types when it is ``None``."""
        return arch_spec(arch).iou_types() if self.iou_types is None else tuple(self.iou_types)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig(Section):
    """A whole experiment: what ``tools/train_det.py`` reads and saves as ``config.yaml``."""

    model: ModelConfig = option(factory=ModelConfig, doc="the detector.")
    data: DataConfig = option(factory=DataConfig, doc="the datasets and loading.")
    train: TrainConfig = option(factory=TrainConfig, doc="the training loop.")
    eval: EvalConfig = option(factory=EvalConfig, doc="the evaluation.")
    output_dir: str = option(
        "output",
        doc="folder for checkpoints, logs, metrics and the resolved config (tools/train_det.py --output-dir "
        "overrides it).",
    )

    def validate(self) -> None:
        """Check the rules that span sections (evaluation types and copy-paste against the architecture)."""
        super().validate()
        if self.output_dir.strip() == "":
            raise FieldError("output_dir", "must be a non-empty path")
        produced = arch_spec(self.model.arch).iou_types()
        missing = [t for t in self.eval.iou_types or () if t not in produced]
        if missing:
            raise FieldError(
                "eval.iou_types",
                f"asks for {missing}, which model.arch={self.model.arch!r} does not predict; it produces "
                f"{list(produced)}",
            )
        if self.data.train.copy_paste.enabled and not arch_spec(self.model.arch).masks:
            raise FieldError(
                "data.train.copy_paste.enabled",
                f"is true but model.arch={self.model.arch!r} predicts no masks, which copy-paste cuts objects "
                "along; set it to false or use a mask architecture",
            )
