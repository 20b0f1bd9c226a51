"""Simple Copy-Paste (Ghiasi et al., 2021): objects of a second training image pasted onto each image.

Each training sample ``(index, seed)`` is loaded as usual (decoded, augmented by ``data.train.augment``,
e.g. large-scale jitter and a flip); then, with probability ``p``, a partner image is drawn from the whole
dataset and loaded the same way with its own seed, a random subset of its objects (1 to ``max_objects``,
never crowd regions) is cut out along their masks and pasted on top:

- image pixels under the pasted masks come from the partner (no blending: the paper found it made no
  difference, and mmdet does not blend either);
- every object of the target loses the pixels the paste covers; one left with fewer than
  ``min_visible_area_px`` visible pixels is dropped, a partly covered one gets the box of its visible mask
  (untouched objects keep their boxes); crowd regions of the target are cut like any other mask;
- the pasted objects follow with their boxes, labels, masks and areas (``iscrowd`` 0).

(``CocoDetection(train=True)`` already leaves crowd regions out of training targets; the crowd rules
matter for datasets that keep them.)

Images of different sizes (no fixed-size crop in the augment list) are handled by resizing the partner to
the target's size, as torchvision's ``SimpleCopyPaste`` does; with ``large_scale_jitter`` both are
already the same size. Images without objects work on either side: an empty partner pastes nothing, an
empty target simply receives objects.

All randomness (whether to paste, the partner, its seed, which objects) comes from the per-sample seed
that :class:`~detection.data.sampler.AspectRatioBatchSampler` yields, so a batch at a given (epoch,
position) is the same whatever the number of workers and after a resume.

Example::

    train_set = CocoDetection("instances.json", "images", train=True, transforms=augment)
    train_set = CopyPasteDataset(train_set, p=1.0, max_objects=100, min_visible_area_px=1)
    loader = build_dataloader(train_set, batch_size=2, train=True, seed=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.ops import masks_to_boxes
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .sampler import _mix_seed

if TYPE_CHECKING:
    from ..config.data import CopyPasteConfig

__all__ = ["CopyPasteDataset", "choose_objects", "paste_objects", "with_copy_paste"]

Target = dict[str, torch.Tensor]
# Mixed into the sample seed so that copy-paste draws never coincide with the augmentation's own stream.
_STREAM = 0xC0B1
_PER_OBJECT = ("boxes", "labels", "masks", "area", "iscrowd")


def choose_objects(rng: np.random.Generator, iscrowd: torch.Tensor, max_objects: int) -> torch.Tensor:
    """Indices (sorted, ``int64``) of the objects to paste: 1 to ``max_objects`` non-crowd ones, uniformly.

    Crowd regions are never pasted: they mark unlabelled groups, and pasted onto another image they would
    only hide its objects. No candidate gives an empty tensor (and consumes no draw).
    """
    candidates = np.flatnonzero(iscrowd.numpy() == 0)
    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.int64)
    count = int(rng.integers(1, min(len(candidates), max_objects) + 1))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    return torch.as_tensor(chosen, dtype=torch.int64)


def _resized_source(
    src_image: torch.Tensor, src_target: Target, size: tuple[int, int]
) -> tuple[torch.Tensor, Target]:
    """The partner resized to the target's ``(height, width)``; boxes follow the resized masks."""
    image = TF.resize(src_image, list(size), antialias=True)
    masks = TF.resize(src_target["masks"], list(size), interpolation=InterpolationMode.NEAREST)
    visible = masks.bool().flatten(1).any(1)  # a thin object can vanish when shrunk
    out = {k: src_target[k][visible] for k in _PER_OBJECT}
    out["masks"] = masks[visible]
    out["boxes"] = _mask_boxes(out["masks"])
    return image, out


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes around masks in pixel-edge coordinates (a pixel at column x spans x..x+1)."""
    boxes = masks_to_boxes(masks) if len(masks) else torch.zeros(0, 4)
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def paste_objects(
    image: torch.Tensor,
    target: Target,
    src_image: torch.Tensor,
    src_target: Target,
    chosen: torch.Tensor,
    *,
    min_visible_area_px: int,
) -> tuple[torch.Tensor, Target]:
    """Paste objects ``chosen`` of ``(src_image, src_target)`` onto ``(image, target)``.

    Args:
        image, src_image: ``float32 [3, H, W]`` (sizes may differ: the source is resized to the target's).
        target, src_target: dataset targets with ``boxes``, ``labels``, ``masks`` (``uint8 [N, H, W]``),
            ``area`` and ``iscrowd``; other keys of ``target`` pass through unchanged.
        chosen: ``int64`` indices into the source's objects (see :func:`choose_objects`).
        min_visible_area_px: a covered target object keeping fewer visible pixels is dropped.

    Returns:
        The new image and target: the target's surviving objects first, then the pasted ones.
    """
    if len(chosen) == 0:
        return image, target
    src = {k: src_target[k][chosen] for k in _PER_OBJECT}
    size = (image.shape[-2], image.shape[-1])
    if src_image.shape[-2:] != image.shape[-2:]:
        src_image, src = _resized_source(src_image, src, size)
    alpha = src["masks"].bool().any(0)
    new_image = torch.where(alpha, src_image, image)

    masks = target["masks"].bool()
    covered = (masks & alpha).flatten(1).any(1)
    masks = masks & ~alpha
    area = masks.flatten(1).sum(1)
    keep = (area > 0) & (~covered | (area >= min_visible_area_px))
    boxes = target["boxes"].clone()
    redo = covered & keep
    boxes[redo] = _mask_boxes(masks[redo])

    out = dict(target)
    out["boxes"] = torch.cat([boxes[keep], src["boxes"].to(boxes.dtype)])
    out["labels"] = torch.cat([target["labels"][keep], src["labels"]])
    out["masks"] = torch.cat([masks[keep].to(torch.uint8), src["masks"]])
    out["area"] = torch.cat([area[keep].float(), src["masks"].flatten(1).sum(1).float()])
    out["iscrowd"] = torch.cat([target["iscrowd"][keep], torch.zeros_like(src["iscrowd"])])
    return new_image, out


class CopyPasteDataset(torch.utils.data.Dataset):
    """A training dataset whose samples get objects of a partner sample pasted onto them.

    Wraps a map-style dataset taking ``(index, seed)`` and returning ``(image, target)`` with masks (or a
    skip marker), such as ``CocoDetection(..., train=True, with_masks=True)``; see the module docstring.

    The partner is drawn from the whole dataset with the sample's seed, as mmdet's ``CopyPaste`` does,
    rather than taken from the same batch as torchvision's reference does in its collate step: a sample
    then depends only on its own ``(index, seed)``, not on the batch size or on which images aspect-ratio
    grouping put beside it, and batches of one image get pastes too. The price is a second image read.

    Args:
        dataset: the dataset to wrap; it must yield masks (``with_masks=True``).
        p: probability that a sample gets a paste.
        max_objects: most objects pasted onto one image.
        min_visible_area_px: covered objects keeping fewer visible pixels are dropped.

    Raises:
        ValueError: a dataset without masks, or a parameter out of range.
    """

    def __init__(self, dataset: Any, *, p: float, max_objects: int, min_visible_area_px: int) -> None:
        if not getattr(dataset, "with_masks", True):
            raise ValueError(
                "copy-paste pastes objects along their instance masks, but the dataset loads none "
                "(with_masks=False); use a mask architecture or turn copy-paste off"
            )
        if not 0.0 <= p <= 1.0 or max_objects < 1 or min_visible_area_px < 1:
            raise ValueError(
                f"copy-paste needs 0 <= p <= 1, max_objects >= 1 and min_visible_area_px >= 1; got p={p}, "
                f"max_objects={max_objects}, min_visible_area_px={min_visible_area_px}"
            )
        self.dataset = dataset
        self.p = p
        self.max_objects = max_objects
        self.min_visible_area_px = min_visible_area_px

    def __len__(self) -> int:
        return len(self.dataset)

    def image_sizes(self) -> list[tuple[int, int]]:
        """The wrapped dataset's ``(height, width)`` per index (for aspect-ratio grouping)."""
        return self.dataset.image_sizes()

    @property
    def transforms(self) -> Any:
        """The wrapped dataset's augmentation (the data loader reseeds it per worker)."""
        return self.dataset.transforms

    @property
    def categories(self) -> Any:
        """The wrapped dataset's category mapping."""
        return self.dataset.categories

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        """Sample ``index`` (a position, or ``(position, seed)``) with a paste drawn from its seed.

        A plain position draws its seed from NumPy's global generator (seeded per worker by the loader).
        """
        index, seed = index if isinstance(index, tuple) else (index, int(np.random.randint(0, 2**32, dtype=np.int64)))
        item = self.dataset[(index, seed)]
        rng = np.random.default_rng(_mix_seed([seed, _STREAM]))
        if _is_skipped(item) or rng.random() >= self.p:
            return item
        partner = _partner(rng, index, len(self.dataset))
        source = self.dataset[(partner, int(rng.integers(2**32)))]
        if _is_skipped(source):  # an unreadable partner (on_bad_image: skip) just means no paste
            return item
        chosen = choose_objects(rng, source[1]["iscrowd"], self.max_objects)
        return paste_objects(*item, *source, chosen, min_visible_area_px=self.min_visible_area_px)

    def __repr__(self) -> str:
        return (
            f"CopyPasteDataset({self.dataset!r}, p={self.p}, max_objects={self.max_objects}, "
            f"min_visible_area_px={self.min_visible_area_px})"
        )


def _partner(rng: np.random.Generator, index: int, n: int) -> int:
    """A uniformly drawn index other than ``index`` (``index`` itself when it is the only one)."""
    if n < 2:
        return index
    other = int(rng.integers(n - 1))
    return other + 1 if other >= index else other


def _is_skipped(item: Any) -> bool:
    return hasattr(item, "path") and hasattr(item, "reason")


def with_copy_paste(dataset: Any, config: CopyPasteConfig) -> Any:
    """``dataset`` wrapped in :class:`CopyPasteDataset` as ``data.train.copy_paste`` says (unchanged when off)."""
    if not config.enabled:
        return dataset
    return CopyPasteDataset(
        dataset, p=config.p, max_objects=config.max_objects, min_visible_area_px=config.min_visible_area_px
    )
