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

pycocotools is imported lazily, inside the functions that need it.

Example::

    ds = CocoDetection("annotations/instances_train2017.json", "train2017", train=True)
    image, target = ds[0]
    ds.categories.to_cat_id(int(target["labels"][0]))   # back to the COCO category id
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "CategoryMapping",
    "CocoDetection",
    "DatasetError",
    "SkippedImage",
    "check_same_categories",
    "decode_segmentation",
]

_REQUIRED_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
_REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
# How many offending ids an error message shows before "...".
_SHOW_FIRST = 5
_EXIF_ORIENTATION_TAG = 0x0112


class DatasetError(ValueError):
    """A dataset file (annotation JSON or image) is malformed or inconsistent."""


class SkippedImage(NamedTuple):
    """Marker returned by ``CocoDetection.__getitem__`` for an unreadable image with ``on_bad_image="skip"``.

    ``collate_fn`` drops it from the batch and reports ``path`` in ``Batch.skipped``.
    """

    path: str
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Category mapping
# ---------------------------------------------------------------------------------------------------------


class CategoryMapping:
    """Bijection between COCO category ids and contiguous training labels ``1..K`` (0 is background).

    Categories are sorted by id, so label ``k`` is the k-th smallest category id. Ids need not be
    contiguous (COCO uses 1..90 with gaps for its 80 classes).

    Args:
        categories: COCO ``categories`` entries, each a mapping with at least ``id`` (int) and ``name`` (str).

    Example::

        m = CategoryMapping([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}])
        m.num_classes            # 3 (torchvision counts background)
        m.to_label(3), m.to_cat_id(2), m.names   # 2, 3, ['__background__', 'person', 'car']
    """

    BACKGROUND = "__background__"

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        pairs: list[tuple[int, str]] = []
        for i, cat in enumerate(categories):
            if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
                raise DatasetError(f"category entry #{i} must be a mapping with 'id' and 'name', got {cat!r}")
            cat_id, name = cat["id"], cat["name"]
            if isinstance(cat_id, bool) or not isinstance(cat_id, int):
                raise DatasetError(f"category entry #{i} has a non-integer id {cat_id!r} (name {name!r})")
            pairs.append((cat_id, str(name)))
        ids = [p[0] for p in pairs]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise DatasetError(f"category ids must be unique; duplicated ids: {duplicates}")
        pairs.sort()
        self._cat_ids: tuple[int, ...] = tuple(p[0] for p in pairs)
        self._names: tuple[str, ...] = tuple(p[1] for p in pairs)
        self._label_of: dict[int, int] = {cat_id: k + 1 for k, cat_id in enumerate(self._cat_ids)}

    @property
    def cat_ids(self) -> tuple[int, ...]:
        """COCO category ids in label order (``cat_ids[k - 1]`` is the id of label ``k``)."""
        return self._cat_ids

    @property
    def names(self) -> list[str]:
        """Label-indexed names; ``names[0]`` is ``"__background__"``."""
        return [self.BACKGROUND, *self._names]

    @property
    def num_classes(self) -> int:
        """``K + 1``: the number of categories plus background (torchvision's ``num_classes``)."""
        return len(self._cat_ids) + 1

    def to_label(self, cat_id: int) -> int:
        """COCO category id -> contiguous label in ``1..K``."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            raise KeyError(f"unknown category id {cat_id}; known ids: {list(self._cat_ids)}") from None

    def to_cat_id(self, label: int) -> int:
        """Contiguous label in ``1..K`` -> COCO category id (label 0, background, has no id)."""
        label = int(label)
        if not 1 <= label <= len(self._cat_ids):
            raise KeyError(f"label {label} is outside 1..{len(self._cat_ids)} (0 is background)")
        return self._cat_ids[label - 1]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: ``{"categories": [{"id": int, "name": str}, ...]}`` in label order."""
        return {"categories": [{"id": i, "name": n} for i, n in zip(self._cat_ids, self._names)]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CategoryMapping:
        """Rebuild a mapping saved with :meth:`state_dict` (e.g. from a checkpoint)."""
        if not isinstance(state, Mapping) or "categories" not in state:
            raise DatasetError(
                f"a CategoryMapping state must be a mapping with a 'categories' list, got {state!r:.200}"
            )
        return cls(state["categories"])

    def diff(self, other: CategoryMapping, self_name: str = "first", other_name: str = "second") -> str:
        """Human-readable difference with ``other``; empty string when both are equal."""
        mine = dict(zip(self._cat_ids, self._names))
        theirs = dict(zip(other._cat_ids, other._names))
        parts = []
        only_mine = [f"{i} {mine[i]!r}" for i in sorted(mine.keys() - theirs.keys())]
        only_theirs = [f"{i} {theirs[i]!r}" for i in sorted(theirs.keys() - mine.keys())]
        renamed = [
            f"{i} {mine[i]!r} vs {theirs[i]!r}"
            for i in sorted(mine.keys() & theirs.keys())
            if mine[i] != theirs[i]
        ]
        if only_mine:
            parts.append(f"only in {self_name}: " + ", ".join(only_mine))
        if only_theirs:
            parts.append(f"only in {other_name}: " + ", ".join(only_theirs))
        if renamed:
            parts.append("same id, different name: " + ", ".join(renamed))
        return "; ".join(parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMapping):
            return NotImplemented
        return self._cat_ids == other._cat_ids and self._names == other._names

    def __hash__(self) -> int:
        return hash((self._cat_ids, self._names))

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{n}" for i, n in zip(self._cat_ids[:6], self._names[:6]))
        more = ", ..." if len(self._cat_ids) > 6 else ""
        return f"CategoryMapping(K={len(self._cat_ids)}, {{{shown}{more}}})"


def check_same_categories(
    train_mapping: CategoryMapping,
    val_mapping: CategoryMapping,
    train_file: str | Path,
    val_file: str | Path,
) -> None:
    """Raise ``DatasetError`` listing the difference when train and val category sets differ.

    Args:
        train_mapping: mapping of the training annotation file.
        val_mapping: mapping of the validation annotation file.
        train_file: training annotation file, named in the message.
        val_file: validation annotation file, named in the message.
    """
    diff = train_mapping.diff(val_mapping, f"train ({train_file})", f"val ({val_file})")
    if diff:
        raise DatasetError(
            f"train and val category sets differ: {diff}. Labels are assigned from sorted category ids, so "
            "both annotation files must list the same categories (same ids and names); fix the files or "
            "use a val file made from the same category list."
        )


# ---------------------------------------------------------------------------------------------------------
# Segmentation decoding
# ---------------------------------------------------------------------------------------------------------


def _segmentation_to_rle(segmentation: Any, height: int, width: int) -> Any | None:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE, or None."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        # Polygons with fewer than 3 points cannot be rasterised (pycocotools would reject them).
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": list(segmentation["size"]), "counts": counts}
    return None


def decode_segmentation(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Decode COCO segmentations into binary masks, exactly as ``COCO.annToMask`` does.

    Args:
        segmentations: per-object COCO ``segmentation`` values: a list of polygons ``[[x0, y0, x1, ...], ...]``
            (merged into one mask), an uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` or a
            compressed RLE ``{"size": [h, w], "counts": str | bytes}``.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``uint8`` array ``[N, height, width]`` with values in ``{0, 1}``. An object without a usable
        segmentation gets an all-zero mask.
    """
    from pycocotools import mask as mask_utils

    try:
        import cv2
    except ImportError:  # optional: only speeds up the copy below
        cv2 = None

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, seg in enumerate(segmentations):
        rle = _segmentation_to_rle(seg, height, width)
        if rle is None:
            continue
        decoded = mask_utils.decode(rle)  # column-major (Fortran) [height, width]
        if decoded.shape != (height, width):
            raise DatasetError(
                f"RLE size {list(decoded.shape)} differs from the image size [{height}, {width}]"
            )
        if cv2 is not None:
            # OpenCV's transpose of the row-major view is a much faster Fortran -> C copy than numpy's.
            cv2.transpose(decoded.T, dst=masks[i])
        else:
            masks[i] = decoded
    return masks


# ---------------------------------------------------------------------------------------------------------
# JSON loading and validation
# ---------------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object with keys {list(_REQUIRED_TOP_LEVEL_KEYS)}, "
            f"got a {type(data).__name__}"
        )
    for key in _REQUIRED_TOP_LEVEL_KEYS:
        if key not in data:
            raise DatasetError(
                f"{path}: missing top-level key '{key}' (a COCO instances file needs "
                f"{', '.join(repr(k) for k in _REQUIRED_TOP_LEVEL_KEYS)}; present: {sorted(data)})"
            )
        if not isinstance(data[key], list):
            raise DatasetError(
                f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}"
            )
    return data


def _check_entries(path: Path, data: dict[str, Any], with_masks: bool) -> None:
    """Required keys, unique ids and references; each problem raises with the first few offenders."""
    for key, required in (("images", _REQUIRED_IMAGE_KEYS), ("annotations", _REQUIRED_ANNOTATION_KEYS)):
        if with_masks and key == "annotations":
            required = (*required, "segmentation")
        for i, entry in enumerate(data[key]):
            missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
            if missing:
                ident = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
                raise DatasetError(
                    f"{path}: {key} entry {ident} is missing key(s) {missing}; each entry of '{key}' needs "
                    f"{list(required)}"
                )
    for key in ("images", "annotations"):
        ids = [entry["id"] for entry in data[key]]
        if len(set(ids)) != len(ids):
            dups = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise DatasetError(
                f"{path}: {len(dups)} duplicated id(s) in '{key}', first: {dups[:_SHOW_FIRST]}; ids must be unique"
            )

    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat.get("id") for cat in data["categories"] if isinstance(cat, dict)}
    for field, known, what in (("image_id", image_ids, "images"), ("category_id", cat_ids, "categories")):
        bad = [(a["id"], a[field]) for a in data["annotations"] if a[field] not in known]
        if bad:
            shown = ", ".join(f"annotation {aid} -> {field} {ref}" for aid, ref in bad[:_SHOW_FIRST])
            more = f" (first {_SHOW_FIRST} shown)" if len(bad) > _SHOW_FIRST else ""
            raise DatasetError(
                f"{path}: {len(bad)} annotation(s) reference a {field} that is not in '{what}': {shown}{more}"
            )


def _xywh_to_clipped_xyxy(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO xywh -> xyxy clipped to the image; None when malformed."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x1 = min(max(x, 0.0), width)
    y1 = min(max(y, 0.0), height)
    x2 = min(max(x + w, 0.0), width)
    y2 = min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


class _ImageRecord(NamedTuple):
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, clipped
    labels: np.ndarray  # int64 [N]
    areas: np.ndarray  # float32 [N]
    iscrowd: np.ndarray  # int64 [N]
    segmentations: tuple[Any, ...]


# ---------------------------------------------------------------------------------------------------------
# Image decoding
# ---------------------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> ``uint8 [H, W, 3]`` RGB."""
    if img.mode == "RGB":
        return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> RGB conversion clips at 255 instead of rescaling 0..65535.
        grey = np.asarray(img).astype(np.float32) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA") and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about palette transparency; alpha is then dropped.
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read any image file as ``uint8 [H, W, 3]`` RGB with its EXIF orientation applied (for inference).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb_array(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------

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
            ``AspectRatioBatchSampler`` attaches to each index, which makes augmentation independent of the
            number of data-loader workers.
        filter_empty: with ``train=True``, drop images that have no usable annotation (only crowd or
            degenerate ones, or none). ``False`` keeps them as negatives with empty targets. Ignored (all
            images kept) when ``train=False``.
        with_masks: decode instance masks into ``target["masks"]`` (Mask R-CNN); ``False`` for Faster R-CNN.
        on_bad_image: ``"error"`` raises on a missing or corrupt image, naming it and the annotation file.
            ``"skip"`` warns once per file (per process) and returns a :class:`SkippedImage` marker that
            ``collate_fn`` drops and counts in ``Batch.skipped``.
        category_mapping: force this label mapping (give val the training set's mapping); the file's
            categories must be identical, else ``DatasetError`` lists the difference.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` ground truth built from the file (not modified).
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
        on_bad_image: Literal["error", "skip"] = "error",
        category_mapping: CategoryMapping | None = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.train = train
        self.transforms = transforms
        self.filter_empty = filter_empty
        self.with_masks = with_masks
        self.on_bad_image = on_bad_image

        data = _load_json(self.ann_file)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.img_dir} (images of {self.ann_file} are read from it)"
            )
        _check_entries(self.ann_file, data, with_masks)

        file_mapping = CategoryMapping(data["categories"])
        if category_mapping is not None:
            diff = category_mapping.diff(file_mapping, "the given category_mapping", str(self.ann_file))
            if diff:
                raise DatasetError(
                    f"{self.ann_file}: categories differ from the given category_mapping (usually the training "
                    f"set's): {diff}. Train and val must list the same categories."
                )
            file_mapping = category_mapping
        self.categories: CategoryMapping = file_mapping

        self.coco = self._build_coco(data)
        self._records, self._dropped_report = self._build_records(data)
        self.ids: list[int] = [r.image_id for r in self._records]
        # Paths already reported by this process under on_bad_image="skip".
        self._warned_bad_images: set[str] = set()
        if self._dropped_report:
            warnings.warn(self._dropped_report, UserWarning, stacklevel=2)

    # -- construction helpers ------------------------------------------------------------------------------

    @staticmethod
    def _build_coco(data: dict[str, Any]) -> Any:
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        # pycocotools prints progress lines; keep the console for the training log.
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _build_records(self, data: dict[str, Any]) -> tuple[list[_ImageRecord], str]:
        anns_by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            anns_by_image[ann["image_id"]].append(ann)

        records = []
        n_dropped, images_touched = 0, 0
        for img in sorted(data["images"], key=lambda im: im["id"]):
            height, width = int(img["height"]), int(img["width"])
            boxes, labels, areas, crowd, segs = [], [], [], [], []
            dropped_here = 0
            for ann in anns_by_image[img["id"]]:
                is_crowd = int(bool(ann.get("iscrowd", 0)))
                if is_crowd and self.train:
                    continue
                box = _xywh_to_clipped_xyxy(ann["bbox"], width, height)
                if box is None:
                    raise DatasetError(
                        f"{self.ann_file}: annotation {ann['id']} has a malformed bbox {ann['bbox']!r}; expected "
                        "[x, y, width, height] with 4 finite numbers"
                    )
                if box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0:
                    dropped_here += 1
                    continue
                if self.with_masks:
                    self._check_segmentation(ann, height, width)
                boxes.append(box)
                labels.append(self.categories.to_label(ann["category_id"]))
                areas.append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
                crowd.append(is_crowd)
                segs.append(ann.get("segmentation"))
            if dropped_here:
                n_dropped += dropped_here
                images_touched += 1
            if self.train and self.filter_empty and not boxes:
                continue
            records.append(
                _ImageRecord(
                    image_id=int(img["id"]),
                    file_name=str(img["file_name"]),
                    height=height,
                    width=width,
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                    areas=np.asarray(areas, dtype=np.float32),
                    iscrowd=np.asarray(crowd, dtype=np.int64),
                    segmentations=tuple(segs),
                )
            )
        report = ""
        if n_dropped:
            report = (
                f"{self.ann_file}: dropped {n_dropped} annotation(s) in {images_touched} image(s) whose box is "
                "narrower or shorter than 1 px after clipping to the image"
            )
        return records, report

    def _check_segmentation(self, ann: dict[str, Any], height: int, width: int) -> None:
        seg = ann["segmentation"]
        if isinstance(seg, list):
            if all(isinstance(p, list) for p in seg):
                return
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) == [height, width]:
                return
            raise DatasetError(
                f"{self.ann_file}: annotation {ann['id']} has an RLE of size {list(seg['size'])} but its image "
                f"{ann['image_id']} is [{height}, {width}] (height, width)"
            )
        raise DatasetError(
            f"{self.ann_file}: annotation {ann['id']} has a malformed segmentation {str(seg)[:80]!r}; expected a "
            "list of polygons [[x0, y0, x1, y1, ...], ...] or an RLE {'size': [h, w], 'counts': ...}"
        )

    # -- public accessors ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def image_info(self, index: int) -> dict[str, Any]:
        """``{"id", "file_name", "height", "width"}`` of the image at ``index`` (from the JSON)."""
        r = self._records[index]
        return {"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width}

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image in index order, read from the JSON (no image is opened)."""
        return [(r.height, r.width) for r in self._records]

    def image_path(self, index: int) -> Path:
        """Path of the image file at ``index``."""
        return self.img_dir / self._records[index].file_name

    # -- item loading --------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | SkippedImage:
        """Load one sample.

        Args:
            index: position in ``ids``. An index produced by ``AspectRatioBatchSampler`` also carries a
                ``seed`` attribute used to seed ``transforms``.

        Returns:
            ``(image, target)`` as described in the class docstring, or a :class:`SkippedImage` marker for an
            unreadable image with ``on_bad_image="skip"``.
        """
        record = self._records[index]
        path = self.img_dir / record.file_name
        try:
            image = self._read_image(path, record)
        except _BadImage as e:
            if self.on_bad_image == "error":
                raise e.to_user_error(path, self.ann_file) from e.__cause__
            key = str(path)
            if key not in self._warned_bad_images:
                self._warned_bad_images.add(key)
                warnings.warn(
                    f"skipping unreadable image {path} (listed in {self.ann_file}): {e.reason}",
                    UserWarning,
                    stacklevel=2,
                )
            return SkippedImage(key, e.reason)

        target: NumpyTarget = {
            "boxes": record.boxes.copy(),
            "labels": record.labels.copy(),
            "area": record.areas.copy(),
            "iscrowd": record.iscrowd.copy(),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        if self.with_masks:
            target["masks"] = decode_segmentation(record.segmentations, record.height, record.width)

        if self.transforms is not None:
            seed = getattr(index, "seed", None)
            if seed is not None and hasattr(self.transforms, "set_random_seed"):
                self.transforms.set_random_seed(int(seed))
            image, target = self.transforms(image, target)
        return _to_tensors(image, target)

    def _read_image(self, path: Path, record: _ImageRecord) -> np.ndarray:
        if not path.is_file():
            raise _BadImage("file not found", missing=True)
        try:
            with Image.open(path) as img:
                img.load()  # decode now so truncated files fail here, not later
                orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
                expected = (record.width, record.height)
                raw_size = img.size
                if orientation in range(2, 9):
                    transposed = ImageOps.exif_transpose(img)
                    if transposed.size == expected:
                        img = transposed
                    elif raw_size != expected:
                        raise DatasetError(
                            f"image {path} (in {self.ann_file}) is {raw_size[0]}x{raw_size[1]} (w x h) as stored "
                            f"and {transposed.size[0]}x{transposed.size[1]} after its EXIF orientation "
                            f"{orientation}, but the JSON says {expected[0]}x{expected[1]}; fix the image "
                            "entry's width/height"
                        )
                    # else: the JSON matches the stored pixels, so the annotation tool ignored EXIF: keep them.
                elif raw_size != expected:
                    raise DatasetError(
                        f"image {path} (in {self.ann_file}) is {raw_size[0]}x{raw_size[1]} (w x h) but the JSON "
                        f"says {expected[0]}x{expected[1]}; fix the image entry's width/height"
                    )
                return _to_rgb_array(img)
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _BadImage(f"{type(e).__name__}: {e}") from e


class _BadImage(Exception):
    """Internal: an image could not be read; turned into a user error or a skip marker."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing

    def to_user_error(self, path: Path, ann_file: Path) -> Exception:
        hint = "fix or remove the file, or set on_bad_image='skip' to skip unreadable images"
        if self.missing:
            return FileNotFoundError(f"image file not found: {path} (listed in {ann_file}); {hint}")
        return DatasetError(f"cannot read image {path} (listed in {ann_file}): {self.reason}; {hint}")


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
