"""``build_dataloader``: dataset + aspect-ratio batch sampler + collate + seeded workers in one call.

Training loaders shuffle per epoch and give every rank the same number of batches (indices are repeated
to pad, as ``DistributedSampler`` does). Evaluation loaders keep index order, never shuffle and do not pad
(each image goes to exactly one rank); with aspect-ratio grouping they still group landscape and portrait
images, which reorders them a little (the evaluator keys results by image id).

Call ``loader.batch_sampler.set_epoch(epoch)`` before each training epoch, or ``set_epoch(epoch,
start_batch=k)`` to resume after ``k`` batches (``len(loader)`` follows). Each sample's augmentation seed
comes from ``(seed, epoch, rank, position in the epoch)``, so it depends neither on ``num_workers`` nor on
where an epoch was resumed. Worker processes are persistent and get ``random``/``numpy``/``torch`` seeded
from ``(seed, rank)``.

Example::

    loader = build_dataloader(train_set, batch_size=4, train=True, num_workers=2, seed=42)
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for images, targets, skipped in loader: ...
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from .sampler import AspectRatioBatchSampler, _mix_seed, collate_fn, worker_init_fn

__all__ = ["AUTO_MAX_WORKERS", "build_dataloader", "resolve_num_workers"]

#: The most worker processes ``num_workers="auto"`` starts.
AUTO_MAX_WORKERS = 4


def _usable_cpus() -> int:
    # The count torch's DataLoader compares num_workers with (it warns above it): the CPUs this process may use.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_num_workers(num_workers: int | Literal["auto"]) -> int:
    """Worker processes to start: ``"auto"`` is ``min(AUTO_MAX_WORKERS, usable CPUs)``; a number above the
    usable CPUs is lowered to them with one warning (torch would warn once per worker otherwise)."""
    cpus = _usable_cpus()
    if num_workers == "auto":
        return min(AUTO_MAX_WORKERS, cpus)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
    if num_workers > cpus:
        warnings.warn(
            f"num_workers={num_workers} but this process may use {cpus} CPU(s): starting {cpus} worker(s) "
            "(set data.num_workers: auto to choose it)",
            UserWarning,
            stacklevel=2,
        )
        return cpus
    return num_workers


def build_dataloader(
    dataset: Any,
    *,
    batch_size: int,
    train: bool,
    num_workers: int | Literal["auto"] = "auto",
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    aspect_ratio_grouping: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """Data loader yielding :class:`~detection.data.sampler.Batch` ``(images, targets, skipped)``.

    Its ``batch_sampler`` is an :class:`~detection.data.sampler.AspectRatioBatchSampler` (see the module
    docstring for training vs evaluation loaders, seeding and resuming).

    Args:
        dataset: a map-style dataset taking ``(index, seed)`` tuples, with ``image_sizes() -> [(h, w)]``
            (``CocoDetection``); without ``image_sizes``, set ``aspect_ratio_grouping=False``.
        batch_size: images per batch and per rank.
        train: training (shuffle, pad shards) or evaluation (sequential, no padding).
        num_workers: worker processes, or ``"auto"`` (see :func:`resolve_num_workers`); 0 loads in the
            main process.
        seed: base seed for shuffling and augmentation.
        num_replicas: distributed world size.
        rank: this process's rank.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        drop_last: drop the last incomplete batch (training only; evaluation keeps every image).
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
    """
    num_workers = resolve_num_workers(num_workers)
    sampler = AspectRatioBatchSampler(
        _image_sizes(dataset, aspect_ratio_grouping),
        batch_size,
        shuffle=train,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last and train,
        group_by_aspect_ratio=aspect_ratio_grouping,
        pad_shards=train,
    )
    if num_workers == 0:
        # No worker_init_fn runs in the main process: give the augmentation its (seed, rank) stream here.
        transforms = getattr(dataset, "transforms", None)
        if hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(_mix_seed([seed, rank, 2]) % 2**32)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(_mix_seed([seed, rank, 1])),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def _image_sizes(dataset: Any, aspect_ratio_grouping: bool) -> list[tuple[int, int]]:
    if hasattr(dataset, "image_sizes"):
        return list(dataset.image_sizes())
    if aspect_ratio_grouping:
        raise TypeError(
            f"{type(dataset).__name__} has no image_sizes() method, which aspect-ratio grouping needs; "
            "pass aspect_ratio_grouping=False or use CocoDetection"
        )
    return [(1, 1)] * len(dataset)
