"""Batching for detection: aspect-ratio grouped, distributed-aware batch sampler, collate and worker seeding.

- :class:`AspectRatioBatchSampler` shards indices across ranks, shuffles per epoch and groups images whose
  aspect ratio falls on the same side of 1 (landscape vs portrait, detectron2's two groups), so a batch pads
  less. It reads image sizes only (``dataset.image_sizes()``, from the annotation file).
- Each batch is a list of plain ``(index, seed)`` tuples, the seed derived from ``(seed, epoch, rank,
  position in the epoch)``. ``CocoDetection`` seeds its augmentation with it, so a run's augmentation
  depends only on the seed, the epoch and the rank, not on the number of workers, on which worker loads
  which batch, or on where a resumed epoch starts.
- :func:`collate_fn` builds a :class:`Batch` ``(images, targets, skipped)``.
- :func:`worker_init_fn` seeds ``random``, ``numpy`` and ``torch`` in each worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["AspectRatioBatchSampler", "Batch", "collate_fn", "worker_init_fn"]

#: One sample of a batch: ``(dataset index, augmentation seed)``.
Sample = tuple[int, int]


def _mix_seed(values: Sequence[int]) -> int:
    """A well-spread non-negative 63-bit integer from a few ints (seed, epoch, rank, ...)."""
    words = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


class AspectRatioBatchSampler(torch.utils.data.Sampler[list[Sample]]):
    """Batch sampler that groups landscape and portrait images and shards across ranks.

    Per epoch:

    1. the index list ``0..N-1`` is permuted with ``(seed, epoch)`` (or kept in order with
       ``shuffle=False``);
    2. with ``pad_shards`` (default) it is padded by repeating its head to a multiple of ``num_replicas``, as
       ``DistributedSampler`` does, and rank ``r`` takes every ``num_replicas``-th entry starting at ``r``:
       shards are disjoint apart from the padding and all have the same length. Without ``pad_shards``
       nothing is repeated and shard lengths may differ by one (for evaluation);
    3. walking the shard in order, an index joins the buffer of its group (``w / h >= 1`` or ``< 1``); a
       full buffer becomes a batch. Leftovers of both groups are concatenated at the end (the larger first)
       and cut into batches, so at most one batch per epoch mixes groups and every index of the shard is
       used once. The last batch is smaller than ``batch_size`` unless ``drop_last``.

    :attr:`batches_per_epoch` is exactly ``ceil(shard / batch_size)`` (``floor`` with ``drop_last``), the
    same on every rank, so distributed training steps stay in lock-step. Call :meth:`set_epoch` before each
    epoch; ``set_epoch(epoch, start_batch=k)`` resumes an epoch after its first ``k`` batches without
    reading their images, yielding exactly the batches and seeds an uninterrupted epoch yields from there.

    Args:
        image_sizes: ``(height, width)`` per dataset index, e.g. ``dataset.image_sizes()``.
        batch_size: images per batch (per rank).
        shuffle: permute per epoch; ``False`` keeps index order (evaluation).
        seed: base seed of the permutation and of the per-sample augmentation seeds.
        num_replicas: number of ranks (distributed world size).
        rank: this process's rank in ``0..num_replicas-1``.
        drop_last: drop the final incomplete batch.
        group_by_aspect_ratio: group as described; ``False`` cuts the shard into batches in order.
        pad_shards: repeat indices so every rank gets the same number (training). ``False`` gives each index
            to exactly one rank (evaluation).

    Example::

        sampler = AspectRatioBatchSampler(ds.image_sizes(), 4, seed=0, num_replicas=2, rank=0)
        sampler.set_epoch(3)
        for batch in sampler: ...          # [(index, seed), ...]
    """

    def __init__(
        self,
        image_sizes: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        group_by_aspect_ratio: bool = True,
        pad_shards: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(
                f"rank must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}, got {rank}"
            )
        if len(image_sizes) == 0:
            raise ValueError("image_sizes is empty: the dataset has no images to sample")
        self.groups = np.array([0 if w >= h else 1 for h, w in image_sizes], dtype=np.int8)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.group_by_aspect_ratio = group_by_aspect_ratio
        self.pad_shards = pad_shards
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the permutation and seeds of ``epoch``; iteration starts after its first ``start_batch``.

        Raises:
            ValueError: ``start_batch`` is negative or more than :attr:`batches_per_epoch`.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be in [0, {self.batches_per_epoch}] (the batches per epoch), got {start_batch}"
            )
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "start_batch"}`` as last set (the loader prefetches, so batches consumed are the
        caller's to count: save ``start_batch`` = batches consumed in the epoch)."""
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a :meth:`state_dict`: the same as ``set_epoch(state["epoch"], state["start_batch"])``."""
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    def _shard_size(self) -> int:
        n = len(self.groups)
        if self.pad_shards:
            return math.ceil(n / self.num_replicas)
        return len(range(self.rank, n, self.num_replicas))

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (the same on every rank when shards are padded)."""
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def __len__(self) -> int:
        """Batches the next iteration yields: the epoch's batches after ``start_batch``."""
        return self.batches_per_epoch - self.start_batch

    def shard_indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, in visiting order (before grouping)."""
        n = len(self.groups)
        if self.shuffle:
            order = np.random.default_rng(_mix_seed([self.seed, self.epoch])).permutation(n)
        else:
            order = np.arange(n)
        if self.pad_shards:
            total = math.ceil(n / self.num_replicas) * self.num_replicas
            order = np.resize(order, total)  # repeats from the start, like DistributedSampler
        return order[self.rank :: self.num_replicas]

    def _batches(self) -> list[list[int]]:
        shard = self.shard_indices().tolist()
        bs = self.batch_size
        if not self.group_by_aspect_ratio:
            batches = [shard[i : i + bs] for i in range(0, len(shard), bs)]
        else:
            batches = []
            buffers: list[list[int]] = [[], []]
            for idx in shard:
                buf = buffers[self.groups[idx]]
                buf.append(idx)
                if len(buf) == bs:
                    batches.append(buf[:])
                    buf.clear()
            leftovers = sorted(buffers, key=len, reverse=True)
            rest = leftovers[0] + leftovers[1]
            batches.extend(rest[i : i + bs] for i in range(0, len(rest), bs))
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[Sample]]:
        # The whole epoch's order and seeds are computed (from image sizes only), then the skipped head is
        # dropped, so a resumed epoch continues with the batches and seeds of the uninterrupted one.
        batches = self._batches()
        assert len(batches) == self.batches_per_epoch, (len(batches), self.batches_per_epoch)
        rng = np.random.default_rng(_mix_seed([self.seed, self.epoch, self.rank, 0x5EED]))
        seeds = iter(rng.integers(0, 2**32, size=sum(len(b) for b in batches), dtype=np.uint64).tolist())
        samples = [[(i, next(seeds)) for i in batch] for batch in batches]
        yield from samples[self.start_batch :]


class Batch(NamedTuple):
    """One collated batch: ``for images, targets, skipped in loader``.

    Attributes:
        images: ``float32 [3, H_i, W_i]`` tensors in ``[0, 1]`` (sizes differ; the model batches them).
        targets: per-image target dicts (see ``CocoDetection``).
        skipped: paths of images skipped in this batch with ``on_bad_image="skip"``; sum their counts over
            an epoch to report how many were skipped (works with worker processes, since the paths travel
            with the batch). A batch can hold zero images when all were skipped.
    """

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    skipped: list[str]


def collate_fn(batch: Sequence[Any]) -> Batch:
    """Collate ``(image, target)`` pairs into a :class:`Batch`, dropping ``SkippedImage`` markers.

    Args:
        batch: items from ``CocoDetection.__getitem__``: ``(image, target)`` tuples or ``SkippedImage``
            markers (recognised by their ``path`` and ``reason`` fields).

    Returns:
        ``Batch(images, targets, skipped)``.
    """
    images: list[torch.Tensor] = []
    targets: list[dict[str, torch.Tensor]] = []
    skipped: list[str] = []
    for item in batch:
        if hasattr(item, "path") and hasattr(item, "reason"):
            skipped.append(str(item.path))
            continue
        image, target = item
        images.append(image)
        targets.append(target)
    return Batch(images, targets, skipped)


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` in a data-loader worker from ``torch.initial_seed()``.

    The data loader sets each worker's torch seed to ``base_seed + worker_id``, its ``base_seed`` coming
    from the loader's ``generator`` (``build_dataloader`` seeds it from ``(seed, rank)``). Augmentation
    pipelines with a ``set_random_seed`` method (``DetectionTransform``) are seeded too, as a fallback for
    plain indices that carry no per-sample seed.

    Args:
        worker_id: the worker's number (unused; the torch seed already includes it).
    """
    del worker_id
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    info = torch.utils.data.get_worker_info()
    transforms = getattr(info.dataset, "transforms", None) if info is not None else None
    if hasattr(transforms, "set_random_seed"):
        transforms.set_random_seed(seed)
