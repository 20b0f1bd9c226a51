"""COCO instances dataset in torchvision's detection format.

``CocoDetection`` reads a COCO ``instances_*.json`` file through pycocotools and yields
``(image, target)`` pairs that torchvision's Faster/Mask R-CNN accept directly:

- ``image``: ``float32`` tensor ``[3, H, W]``, RGB, values in ``[0, 1]`` (not normalised: the model's
  ``GeneralizedRCNNTransform`` resizes and normalises).
- ``target``: dict with ``boxes`` (``float32 [N, 4]``, xyxy pixels), ``labels`` (``int64 [N]``, contiguous
  ``1..K``), ``masks`` (``uint8 [N, H, W]``, only with ``with_masks=True``), ``area`` (``float32 [N]``),
  ``iscrowd`` (``int64 [N]``), ``image_id`` (``int64`` scalar) and ``orig_size`` (``int64 [2]``, ``(h, w)``
  of the decoded image before augmentation).

The category-id <-> label mapping (:class:`CategoryMapping`) is computed from the file's ``categories``
sorted by id, is plain-JSON serialisable (saved with checkpoints) and can be forced for a validation set so
that labels line up with the training set.

The category mapping lives in :mod:`.categories`, annotation parsing in :mod:`.annotations` and image decoding
in :mod:`.images`; pycocotools is imported lazily, inside the functions that need it.

Example::

    ds = CocoDetection("annotations/instances_train2017.json", "train2017", train=True)
    image, target = ds[0]
    ds.categories.to_cat_id(int(target["labels"][0]))   # back to the COCO category id
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .annotations import (
    ImageRecord,
    build_records,
    check_entries,
    decode_segmentation,
    listed,
    load_annotation_file,
    make_coco,
)
from .categories import CategoryMapping
from .errors import DatasetError
from .files import locate_images
from .images import BadImage, read_dataset_image, read_rgb_image

__all__ = [
    "CategoryMapping",
    "CocoDetection",
    "DatasetError",
    "SkippedImage",
    "decode_segmentation",
    "read_rgb_image",
]


class SkippedImage(NamedTuple):
    """Marker returned by ``CocoDetection.__getitem__`` for an unreadable image with ``on_bad_image="skip"``.

    ``collate_fn`` drops it from the batch and reports ``path`` in ``Batch.skipped``.
    """

    path: str
    reason: str


NumpyTarget = dict[str, Any]
Transforms = Callable[[np.ndarray, NumpyTarget], tuple[np.ndarray, NumpyTarget]]


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances dataset yielding ``(image, target)`` in torchvision's detection format.

    Args:
        ann_file: COCO instances JSON.
        img_dir: folder holding the images named by each image's ``file_name``.
        train: training mode. Drops crowd annotations from targets and, with ``filter_empty``, images left
            without annotations. With ``train=False`` every image is kept and crowd regions stay in the
            target with ``iscrowd=1`` (COCOeval ignores detections on them).
        transforms: optional ``transforms(image, target) -> (image, target)`` applied to numpy data before
            conversion to tensors: ``image`` is ``uint8 [H, W, 3]`` RGB and ``target`` holds ``boxes``
            (``float32 [N, 4]`` xyxy), ``labels`` (``int64 [N]``), ``masks`` (``uint8 [N, H, W]``, when
            ``with_masks``), ``area`` (``float32 [N]``), ``iscrowd`` (``int64 [N]``), ``image_id`` (int) and
            ``orig_size`` (``(h, w)``). See ``detection.data.transforms.build_transforms``. If the callable
            has a ``set_random_seed(seed)`` method, it is called with the per-sample seed that
            ``AspectRatioBatchSampler`` yields with each index, which makes augmentation independent of the
            number of data-loader workers.
        filter_empty: with ``train=True``, drop images that have no usable annotation (only crowd or
            degenerate ones, or none). ``False`` keeps them as negatives with empty targets. Ignored (all
            images kept) when ``train=False``.
        with_masks: decode instance masks into ``target["masks"]`` (Mask R-CNN); ``False`` for Faster R-CNN.
        check_masks: check every segmentation when the dataset is built (see ``on_bad_annotation``);
            ``None`` follows ``with_masks``. ``True`` with ``with_masks=False`` suits a validation set whose
            masks are scored (segm evaluation reads them from :attr:`coco`) but not decoded into targets.
        on_bad_image: every image file's existence is checked when the dataset is built (one folder listing):
            ``"error"`` raises ``DatasetError`` listing the missing files, ``"skip"`` leaves their images out
            with one warning. A file that exists but cannot be decoded is met when loaded: ``"error"``
            raises naming it and the annotation file, ``"skip"`` warns once per file (per process) and
            returns a :class:`SkippedImage` marker that ``collate_fn`` drops and counts in ``Batch.skipped``.
            A dataset left with no image raises ``DatasetError``.
        category_mapping: force this label mapping (give val the training set's mapping); the file's
            categories must be identical, else ``DatasetError`` lists the difference.
        on_bad_annotation: ``"error"`` (default) raises ``DatasetError`` for an invalid segmentation (an RLE
            whose counts do not decode or do not sum to H×W, a polygon with fewer than 3 points, an odd
            length or a non-finite coordinate), naming the file, annotation and image; ``"skip"`` drops such
            annotations (from the targets and from :attr:`coco`) and lists them in one warning. Checked
            only with ``check_masks``.
        allow_paths_outside_img_dir: accept ``file_name`` values that resolve outside ``img_dir``
            (``../x.jpg``, absolute paths); by default they are refused.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` ground truth built from the file, less the annotations that
            ``on_bad_annotation="skip"`` dropped.
        categories: the :class:`CategoryMapping`.
        ids: image ids in index order (sorted by id).

    Boxes are converted from COCO xywh to xyxy and clipped to the image; boxes narrower or shorter than
    1 px after clipping are dropped (with their masks) and counted in one warning at construction.

    Example::

        ds = CocoDetection("instances.json", "images", train=False)
        image, target = ds[0]     # image float32 [3, H, W] in [0, 1]; target["boxes"] float32 [N, 4]
    """

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        *,
        train: bool,
        transforms: Transforms | None = None,
        filter_empty: bool = True,
        with_masks: bool = True,
        check_masks: bool | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        category_mapping: CategoryMapping | None = None,
        on_bad_annotation: Literal["error", "skip"] = "error",
        allow_paths_outside_img_dir: bool = False,
    ) -> None:
        for name, value in (("on_bad_image", on_bad_image), ("on_bad_annotation", on_bad_annotation)):
            if value not in ("error", "skip"):
                raise ValueError(f"{name} must be 'error' or 'skip', got {value!r}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.train = train
        self.transforms = transforms
        self.filter_empty = filter_empty
        self.with_masks = with_masks
        self.on_bad_image = on_bad_image

        data = load_annotation_file(self.ann_file)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.img_dir} (images of {self.ann_file} are read from it)"
            )
        check_masks = with_masks if check_masks is None else check_masks
        check_entries(self.ann_file, data, check_masks)
        self.categories: CategoryMapping = self._category_mapping(data, category_mapping)
        self._records, dropped_reports, invalid = build_records(
            self.ann_file,
            data,
            self.categories,
            train=train,
            filter_empty=filter_empty,
            with_masks=check_masks,
            on_bad_annotation=on_bad_annotation,
        )
        if invalid:  # skipped: gone from the ground truth too, where segm evaluation would decode them
            data = {**data, "annotations": [a for a in data["annotations"] if a["id"] not in invalid]}
        self.coco = make_coco(data)
        if not self._records:
            raise DatasetError(f"{self.ann_file}: no usable images{_why_empty(train, filter_empty)}")
        self._records = self._with_image_files(self._records, allow_paths_outside_img_dir, dropped_reports)
        if not self._records:
            raise DatasetError(
                f"{self.ann_file}: no usable images: none of the image files is in {self.img_dir} "
                "(data.on_bad_image: skip left every one out)"
            )
        self.ids: list[int] = [r.image_id for r in self._records]
        # Paths already reported by this process under on_bad_image="skip".
        self._warned_bad_images: set[str] = set()
        for report in dropped_reports:
            warnings.warn(report, UserWarning, stacklevel=2)

    def _with_image_files(
        self, records: list[ImageRecord], allow_outside: bool, reports: list[str]
    ) -> list[ImageRecord]:
        """``records`` whose image file exists (all of them, or ``DatasetError``, under on_bad_image="error")."""
        found = locate_images(self.img_dir, [r.file_name for r in records], allow_outside=allow_outside)
        if found.outside:
            first = records[found.outside[0]]
            raise DatasetError(
                f"{self.ann_file}: {len(found.outside)} image file_name(s) resolve outside the image folder "
                f"{self.img_dir}, first: image {first.image_id} {first.file_name!r}; fix them, or set "
                "data.allow_paths_outside_img_dir: true if that is intended"
            )
        if not found.missing:
            return records
        names = listed([records[i].file_name for i in found.missing])
        what = f"{len(found.missing)} of {len(records)} image file(s) not found in {self.img_dir}: {names}"
        if self.on_bad_image == "error":
            raise DatasetError(
                f"{self.ann_file}: {what}; fix the paths, or set data.on_bad_image: skip to leave them out"
            )
        reports.append(f"{self.ann_file}: skipping {what} (data.on_bad_image: skip)")
        gone = set(found.missing)
        return [r for i, r in enumerate(records) if i not in gone]

    def _category_mapping(self, data: dict[str, Any], forced: CategoryMapping | None) -> CategoryMapping:
        file_mapping = CategoryMapping(data["categories"])
        if forced is None:
            return file_mapping
        diff = forced.diff(file_mapping, "the given category_mapping", str(self.ann_file))
        if diff:
            raise DatasetError(
                f"{self.ann_file}: categories differ from the given category_mapping (usually the training "
                f"set's): {diff}. Train and val must list the same categories."
            )
        return forced

    # -- public accessors ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image in index order, read from the JSON (no image is opened)."""
        return [(r.height, r.width) for r in self._records]

    # -- item loading --------------------------------------------------------------------------------------

    def __getitem__(
        self, index: int | tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | SkippedImage:
        """Load one sample.

        Args:
            index: position in ``ids``, or ``(position, seed)`` as ``AspectRatioBatchSampler`` yields it:
                the seed is given to ``transforms.set_random_seed`` before augmenting.

        Returns:
            ``(image, target)`` as described in the class docstring, or a :class:`SkippedImage` marker for an
            unreadable image with ``on_bad_image="skip"``.
        """
        index, seed = index if isinstance(index, tuple) else (index, None)
        record = self._records[index]
        path = self.img_dir / record.file_name
        try:
            image = read_dataset_image(path, self.ann_file, record.width, record.height)
        except BadImage as e:
            return self._bad_image(path, e)

        target: NumpyTarget = {
            "boxes": record.boxes.copy(),
            "labels": record.labels.copy(),
            "area": record.areas.copy(),
            "iscrowd": record.iscrowd.copy(),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        if self.with_masks:
            target["masks"] = self._masks(record)
        if self.transforms is not None:
            if seed is not None and hasattr(self.transforms, "set_random_seed"):
                self.transforms.set_random_seed(int(seed))
            image, target = self.transforms(image, target)
        return _to_tensors(image, target)

    def _bad_image(self, path: Path, error: BadImage) -> SkippedImage:
        if self.on_bad_image == "error":
            raise error.to_user_error(path, self.ann_file) from error.__cause__
        key = str(path)
        if key not in self._warned_bad_images:
            self._warned_bad_images.add(key)
            warnings.warn(
                f"skipping unreadable image {path} (listed in {self.ann_file}): {error.reason}",
                UserWarning,
                stacklevel=3,
            )
        return SkippedImage(key, error.reason)

    def _masks(self, record: ImageRecord) -> np.ndarray:
        names = [f"{self.ann_file}: annotation {i} (image {record.image_id})" for i in record.ann_ids]
        return decode_segmentation(record.segmentations, record.height, record.width, names=names)


def _why_empty(train: bool, filter_empty: bool) -> str:
    if train and filter_empty:
        return ": no image has a usable annotation (images without one are dropped for training: filter_empty)"
    return ": the file lists no image"


def _to_tensors(image: np.ndarray, target: NumpyTarget) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Numpy ``(uint8 HWC image, target)`` -> ``(float32 CHW in [0, 1], tensor target)``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(
            f"transforms must return a uint8 [H, W, 3] image, got dtype {image.dtype} shape {image.shape}"
        )
    # numpy does the HWC -> CHW copy and the scaling in one single-threaded pass: torch's multi-threaded
    # kernels are several times slower for this inside busy data-loader processes.
    chw = np.empty((3, image.shape[0], image.shape[1]), dtype=np.float32)
    np.divide(image.transpose(2, 0, 1), np.float32(255.0), out=chw)
    out: dict[str, torch.Tensor] = {
        "boxes": torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(target["labels"], dtype=np.int64).reshape(-1)),
        "area": torch.as_tensor(np.asarray(target["area"], dtype=np.float32).reshape(-1)),
        "iscrowd": torch.as_tensor(np.asarray(target["iscrowd"], dtype=np.int64).reshape(-1)),
        "image_id": torch.tensor(int(target["image_id"]), dtype=torch.int64),
        "orig_size": torch.tensor(tuple(target["orig_size"]), dtype=torch.int64),
    }
    if "masks" in target:
        masks = np.asarray(target["masks"], dtype=np.uint8)
        out["masks"] = torch.from_numpy(
            np.ascontiguousarray(masks.reshape(-1, image.shape[0], image.shape[1]))
        )
    return torch.from_numpy(chw), out
