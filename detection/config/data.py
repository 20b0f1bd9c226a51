"""The data sections of the schema: ``data`` (:class:`DataConfig`), its splits and the synthetic dataset.

:class:`ShapesConfig` holds the built-in dataset's defaults; its generator and ``tools/make_shapes.py``
read them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError, FieldError
from .fields import COUNT, NON_NEGATIVE, POSITIVE_FRACTION, UNIT, Bound, Section, option

__all__ = [
    "CopyPasteConfig",
    "DataConfig",
    "DatasetConfig",
    "ShapesConfig",
    "TrainDatasetConfig",
    "check_source_conflict",
]

_SPLITS = ("train", "val")
_PATH_KEYS = ("ann_file", "img_dir")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig(Section):
    """One split of a COCO-format dataset: its annotation file and image folder (``data.val``)."""

    ann_file: str | None = option(
        None,
        doc="COCO instances JSON file of this split (for COCO itself instances_train2017.json or "
        "instances_val2017.json). Set together with img_dir; setting it selects data.source: coco.",
    )
    img_dir: str | None = option(None, doc="folder holding the images named by the JSON's file_name.")

    def validate(self) -> None:
        """Check that the paths come in pairs."""
        super().validate()
        for name in _PATH_KEYS:
            value = getattr(self, name)
            if not (value is None or (isinstance(value, str) and value.strip() != "")):
                raise FieldError(name, f"must be a non-empty path or null; got {value!r}")
        if (self.ann_file is None) != (self.img_dir is None):
            given, missing = ("ann_file", "img_dir") if self.img_dir is None else ("img_dir", "ann_file")
            raise FieldError(
                missing, f"is not set but {given} is; a COCO split needs both ann_file and img_dir"
            )


@dataclass(frozen=True, kw_only=True)
class CopyPasteConfig(Section):
    """Simple Copy-Paste (Ghiasi et al. 2021) on the training split (``data.train.copy_paste``).

    Read by :func:`detection.data.copy_paste.with_copy_paste`; the architecture must predict masks.
    """

    enabled: bool = option(
        False,
        doc="paste objects (with their masks) of a second training image, augmented on its own, onto each "
        "training image; objects they hide are dropped, those they cover in part get the visible part of "
        "their mask and its box. Needs a model.arch with masks. Crowd objects are never pasted.",
    )
    p: float = option(1.0, bound=UNIT, doc="probability that an image gets objects pasted onto it.")
    max_objects: int = option(
        100,
        bound=COUNT,
        doc="most objects pasted onto one image; the number is drawn uniformly in 1..min(this, objects of "
        "the partner image).",
    )
    min_visible_area_px: int = option(
        1,
        bound=COUNT,
        doc="an object covered in part by pasted ones is dropped when fewer pixels than this stay visible "
        "(1 drops only fully hidden objects, as in the paper).",
    )


@dataclass(frozen=True, kw_only=True)
class TrainDatasetConfig(DatasetConfig):
    """The training split (``data.train``): the paths plus what only training uses."""

    filter_empty: bool = option(
        True,
        doc="drop images without usable annotations (instead of keeping them as negatives). Evaluation "
        "always keeps every image.",
    )
    augment: tuple[dict[str, Any], ...] = option(
        (),
        doc="augmentations, applied in order; each item is {name: <transform>, <param>: <value>, ...}, e.g. "
        "[{name: horizontal_flip, p: 0.5}]. Names and parameters are checked by detection.data. "
        "Evaluation runs without augmentation.",
    )
    copy_paste: CopyPasteConfig = option(
        factory=CopyPasteConfig,
        doc="Simple Copy-Paste, applied after the augment list (each image of a pair goes through it first).",
    )

    def validate(self) -> None:
        """Check the paths, and that every augmentation has a name."""
        super().validate()
        for i, spec in enumerate(self.augment):
            if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
                raise FieldError(
                    f"augment[{i}]",
                    f"must be a mapping with a 'name', e.g. {{name: horizontal_flip, p: 0.5}}; got {spec!r}",
                )


@dataclass(frozen=True, kw_only=True)
class ShapesConfig(Section):
    """The built-in synthetic dataset (coloured shapes with masks), generated on first use."""

    num_train: int = option(500, bound=COUNT, doc="number of training images.")
    num_val: int = option(100, bound=NON_NEGATIVE, doc="number of validation images (0 disables evaluation).")
    image_size: int = option(256, bound=Bound(16), doc="side of the square images, in pixels.")
    min_objects: int = option(1, doc="fewest objects per image, in 0..max_objects.")
    max_objects: int = option(6, bound=COUNT, doc="most objects per image.")
    size_range: tuple[float, float] = option(
        (0.10, 0.45),
        doc="object size (circle diameter, square / triangle side) as a fraction of the image side, drawn "
        "uniformly in [low, high], with 0 < low <= high <= 1.",
    )
    distractors: tuple[int, int] = option(
        (1, 3), doc="[fewest, most] irregular unannotated blobs painted into each background."
    )
    min_visible: float = option(
        0.3,
        bound=POSITIVE_FRACTION,
        doc="every annotated object keeps at least this fraction of its pixels visible when later objects "
        "overlap it.",
    )
    seed: int = option(
        0,
        bound=NON_NEGATIVE,
        doc="generator seed; the same seed gives byte-identical images and annotations.",
    )
    cache_dir: str = option(
        "~/.cache/resnet_fpn_det/shapes",
        doc="folder the generated dataset is written to and reused from (~ is expanded at use time); one "
        "sub-folder per setting of the fields above.",
    )

    def validate(self) -> None:
        """Check counts, sizes and the object range."""
        super().validate()
        if not 0 <= self.min_objects <= self.max_objects:
            raise FieldError(
                "min_objects", f"must be in 0..max_objects ({self.max_objects}); got {self.min_objects}"
            )
        if not 0 < self.size_range[0] <= self.size_range[1] <= 1:
            raise FieldError(
                "size_range", f"must be [low, high] with 0 < low <= high <= 1; got {list(self.size_range)}"
            )
        if not 0 <= self.distractors[0] <= self.distractors[1]:
            raise FieldError(
                "distractors",
                f"must be [fewest, most] with 0 <= fewest <= most; got {list(self.distractors)}",
            )
        if self.cache_dir.strip() == "":
            raise FieldError("cache_dir", "must be a non-empty path")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Where the images come from and how they are loaded."""

    source: Literal["coco", "shapes"] = option(
        "coco",
        doc="coco reads train / val (COCO-format files); shapes uses the built-in synthetic dataset "
        "configured by shapes. Setting a train or val path (ann_file / img_dir) selects coco, whatever a "
        "base file says; source: shapes set in the same file (or --set) as such a path is an error.",
    )
    train: TrainDatasetConfig = option(
        factory=TrainDatasetConfig,
        doc="the training split. Needed for training with source: coco (checked when a run starts).",
    )
    val: DatasetConfig = option(
        factory=DatasetConfig,
        doc="the validation split (evaluated without augmentation, every image kept). Optional: a run "
        "without it skips evaluation.",
    )
    shapes: ShapesConfig = option(
        factory=ShapesConfig, doc="the synthetic dataset, used when source is shapes."
    )
    num_workers: int | Literal["auto"] = option(
        "auto",
        doc="DataLoader worker processes per training process (0 loads in the main process). auto: up to 4, "
        "never more than the CPUs this process may use; a larger number is lowered to that, with one warning.",
    )
    aspect_ratio_grouping: bool = option(
        True,
        doc="batch images of similar aspect ratio together (less padding), as torchvision's references do.",
    )
    on_bad_image: Literal["error", "skip"] = option(
        "error",
        doc="what a missing or unreadable image does: error stops with the file name, skip leaves it out "
        "with a warning. Every file's existence is checked when the dataset is built; a dataset left with "
        "no image is always an error.",
    )
    on_bad_annotation: Literal["error", "skip"] = option(
        "error",
        doc="what an invalid mask does (an RLE whose counts do not decode or do not sum to height x width, a "
        "polygon with fewer than 3 points, an odd length or a non-finite coordinate): error stops naming the "
        "file, annotation and image; skip drops the annotation, listed in one warning.",
    )
    allow_paths_outside_img_dir: bool = option(
        False,
        doc="accept image file_names that resolve outside img_dir (../x.jpg, absolute paths); refused "
        "otherwise.",
    )

    def validate(self) -> None:
        """Check num_workers; switch to COCO data when a split path is set (see :func:`check_source_conflict`)."""
        super().validate()
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise FieldError("num_workers", f"must be >= 0 or auto; got {self.num_workers}")
        if self.source == "shapes" and _coco_path_keys(self):
            object.__setattr__(self, "source", "coco")  # frozen: set once, while the section is built

    def validate_for_training(self) -> None:
        """Raise :class:`ConfigError` unless a training split is configured.

        Kept out of :meth:`validate` so that a defaults-only config (and evaluation-only configs)
        stay valid; the trainer calls it before building the data pipeline.
        """
        if self.source == "coco" and self.train.ann_file is None and self.val.ann_file is not None:
            raise ConfigError(
                "data.val.ann_file is set, which selects COCO data, but data.train.ann_file and "
                "data.train.img_dir are not; set both for training"
            )
        if self.source == "coco" and self.train.ann_file is None:
            raise ConfigError(
                "data.source is 'coco' but data.train.ann_file and data.train.img_dir are not set; set both "
                "(e.g. in a base file such as configs/base/coco_instances.yaml) or use data.source: shapes"
            )


def _coco_path_keys(data: DataConfig) -> list[str]:
    """The dotted keys (``train.ann_file``, ...) of the split paths that are set."""
    return [f"{split}.{key}" for split in _SPLITS for key in _PATH_KEYS
            if getattr(getattr(data, split), key) is not None]


def check_source_conflict(tree: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """Refuse ``data.source: shapes`` set by the same file (or ``--set``) as a split path.

    ``tree`` is the merged, unconverted config and ``origins`` maps dotted keys to the source that set
    them (as :func:`~detection.config.load_config_with_origins` records them). A path set elsewhere (on
    the command line over a shapes base file, say) simply selects COCO data (:meth:`DataConfig.validate`).

    Raises:
        ConfigError: naming the source and both keys.
    """
    data = tree.get("data")
    if not isinstance(data, Mapping) or data.get("source") != "shapes":
        return
    source = origins.get("data.source")
    for split in _SPLITS:
        section = data.get(split)
        for key in _PATH_KEYS:
            dotted = f"data.{split}.{key}"
            if isinstance(section, Mapping) and section.get(key) is not None and origins.get(dotted) == source:
                raise ConfigError(
                    f"{source}: data.source is 'shapes' but {dotted} is set in the same place; remove "
                    f"data.source (a split path selects COCO data) or remove {dotted} to use the shapes dataset"
                )
