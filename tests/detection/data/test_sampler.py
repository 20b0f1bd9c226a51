"""AspectRatioBatchSampler, collate_fn, worker seeding and build_dataloader."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from detection.data import (
    AspectRatioBatchSampler,
    Batch,
    CocoDetection,
    SkippedImage,
    build_dataloader,
    build_transforms,
    collate_fn,
)

# 0: landscape (w >= h), 1: portrait
_SIZES = [
    (10, 20),
    (20, 10),
    (15, 15),
    (30, 10),
    (10, 30),
    (40, 20),
    (20, 40),
    (5, 6),
    (6, 5),
    (8, 9),
    (9, 8),
]


def _group(i: int) -> int:
    h, w = _SIZES[i]
    return 0 if w >= h else 1


def _all_batches(sampler: AspectRatioBatchSampler) -> list[list[int]]:
    return [[i for i, _seed in batch] for batch in sampler]


def test_shards_are_disjoint_padded_and_cover_everything():
    n, replicas = len(_SIZES), 3
    shards = []
    for rank in range(replicas):
        s = AspectRatioBatchSampler(_SIZES, 2, seed=5, num_replicas=replicas, rank=rank)
        s.set_epoch(4)
        shards.append([i for b in _all_batches(s) for i in b])
    assert [len(s) for s in shards] == [4, 4, 4]  # ceil(11 / 3), padded like DistributedSampler
    counts = Counter(i for s in shards for i in s)
    assert set(counts) == set(range(n))
    assert sum(c - 1 for c in counts.values()) == 12 - n  # only the padding repeats
    for s in shards:
        assert len(set(s)) == len(s)  # no repeat within a rank


def test_unpadded_shards_split_exactly():
    shards = []
    for rank in range(3):
        s = AspectRatioBatchSampler(_SIZES, 2, shuffle=False, num_replicas=3, rank=rank, pad_shards=False)
        shards.append([i for b in _all_batches(s) for i in b])
    assert sorted(i for s in shards for i in s) == list(range(len(_SIZES)))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_epochs_reshuffle_deterministically():
    s = AspectRatioBatchSampler(_SIZES, 3, seed=1)
    s.set_epoch(0)
    e0 = _all_batches(s)
    s.set_epoch(1)
    e1 = _all_batches(s)
    s.set_epoch(0)
    assert _all_batches(s) == e0
    assert e0 != e1
    assert sorted(i for b in e0 for i in b) == sorted(i for b in e1 for i in b) == list(range(len(_SIZES)))
    other = AspectRatioBatchSampler(_SIZES, 3, seed=2)
    assert _all_batches(other) != e0
    fixed = AspectRatioBatchSampler(_SIZES, 3, shuffle=False, group_by_aspect_ratio=False)
    assert _all_batches(fixed) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]


def test_batches_group_by_aspect_ratio():
    for epoch in range(10):
        s = AspectRatioBatchSampler(_SIZES, 2, seed=0)
        s.set_epoch(epoch)
        batches = _all_batches(s)
        mixed = [b for b in batches if len({_group(i) for i in b}) > 1]
        assert len(mixed) <= 1
        if mixed:
            assert batches.index(mixed[0]) >= len(batches) - 2  # leftovers come at the end
        assert sorted(i for b in batches for i in b) == list(range(len(_SIZES)))


@pytest.mark.parametrize("n", [1, 7, 11, 16])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("grouping", [False, True])
def test_len_is_exact_and_equal_across_ranks(n, batch_size, replicas, drop_last, grouping):
    sizes = [(10, 20) if i % 3 else (20, 10) for i in range(n)]
    lengths = []
    for rank in range(replicas):
        s = AspectRatioBatchSampler(
            sizes,
            batch_size,
            seed=3,
            num_replicas=replicas,
            rank=rank,
            drop_last=drop_last,
            group_by_aspect_ratio=grouping,
        )
        for epoch in range(3):
            s.set_epoch(epoch)
            batches = _all_batches(s)
            assert len(batches) == len(s)
            assert all(1 <= len(b) <= batch_size for b in batches)
            if drop_last:
                assert all(len(b) == batch_size for b in batches)
        lengths.append(len(s))
    assert len(set(lengths)) == 1


def test_samples_are_plain_index_seed_tuples_with_reproducible_seeds():
    s = AspectRatioBatchSampler(_SIZES, 4, seed=9, num_replicas=2, rank=1)
    s.set_epoch(2)
    first = [sample for b in s for sample in b]
    assert all(type(sample) is tuple and [type(v) for v in sample] == [int, int] for sample in first)
    assert first == [sample for b in s for sample in b]
    assert len({seed for _, seed in first}) == len(first)
    s.set_epoch(3)
    assert [seed for b in s for _, seed in b] != [seed for _, seed in first]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("grouping", [False, True])
def test_resuming_mid_epoch_yields_the_rest_of_the_uninterrupted_epoch(drop_last, grouping):
    def sampler():
        return AspectRatioBatchSampler(
            _SIZES * 2, 4, seed=4, num_replicas=2, rank=1, drop_last=drop_last, group_by_aspect_ratio=grouping
        )

    full = sampler()
    full.set_epoch(5)
    whole = list(full)
    assert len(full) == full.batches_per_epoch == len(whole) == (2 if drop_last else 3)  # 11 of 22 per rank
    for start in range(len(whole) + 1):
        resumed = sampler()
        resumed.set_epoch(5, start_batch=start)
        assert len(resumed) == len(whole) - start and resumed.batches_per_epoch == len(whole)
        assert list(resumed) == whole[start:]  # same indices and same seeds
        assert resumed.state_dict() == {"epoch": 5, "start_batch": start}
        restored = sampler()
        restored.load_state_dict(resumed.state_dict())
        assert list(restored) == whole[start:]
    with pytest.raises(ValueError, match=re.escape(f"start_batch must be in [0, {len(whole)}]")):
        full.set_epoch(5, start_batch=len(whole) + 1)


def test_resumed_loader_skips_without_reading_images(augmented_train_set):
    ds = augmented_train_set
    loader = build_dataloader(ds, batch_size=3, train=True, num_workers=0, seed=7)
    whole = _collect(loader, epochs=(1,))
    reads = []
    real = ds._records.__class__.__getitem__

    class Counting(list):
        def __getitem__(self, index):
            reads.append(index)
            return real(self, index)

    ds._records = Counting(ds._records)
    try:
        loader.batch_sampler.set_epoch(1, start_batch=1)
        assert len(loader) == len(whole) - 1
        rest = [
            ([img.clone() for img in images], [{k: v.clone() for k, v in t.items()} for t in targets])
            for images, targets, _ in loader
        ]
    finally:
        ds._records = list(ds._records)
    assert _same(rest, whole[1:])
    assert len(reads) == sum(len(images) for images, _ in whole[1:])  # the skipped batch was never loaded


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match=re.escape("batch_size must be a positive int, got 0")):
        AspectRatioBatchSampler(_SIZES, 0)
    with pytest.raises(ValueError, match=re.escape("rank must be in [0, 1] for num_replicas=2, got 2")):
        AspectRatioBatchSampler(_SIZES, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=re.escape("image_sizes is empty")):
        AspectRatioBatchSampler([], 2)


def test_collate_drops_skip_markers():
    image = torch.zeros(3, 4, 5)
    target = {"boxes": torch.zeros(0, 4)}
    batch = collate_fn([(image, target), SkippedImage("/data/a.jpg", "truncated"), (image, target)])
    assert isinstance(batch, Batch)
    images, targets, skipped = batch
    assert len(images) == len(targets) == 2 and images[0] is image
    assert skipped == ["/data/a.jpg"]
    assert collate_fn([SkippedImage("/x.png", "gone")]) == Batch([], [], ["/x.png"])


# ---------------------------------------------------------------------------------------------------------
# Loaders and worker seeding
# ---------------------------------------------------------------------------------------------------------


def _collect(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        for images, targets, skipped in loader:
            assert skipped == []
            out.append(
                ([img.clone() for img in images], [{k: v.clone() for k, v in t.items()} for t in targets])
            )
    return out


def _same(a, b) -> bool:
    if len(a) != len(b):
        return False
    for (ia, ta), (ib, tb) in zip(a, b):
        if len(ia) != len(ib) or any(not torch.equal(x, y) for x, y in zip(ia, ib)):
            return False
        for x, y in zip(ta, tb):
            if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
                return False
    return True


@pytest.fixture(scope="module")
def augmented_train_set(shapes_paths):
    augment = build_transforms(
        [
            {"name": "horizontal_flip"},
            {"name": "scale_jitter", "size": 96, "min_scale": 0.5, "max_scale": 1.5},
            {"name": "color_jitter", "brightness": 0.3},
        ],
        train=True,
    )
    return CocoDetection(
        shapes_paths["train_ann"], shapes_paths["train_img_dir"], train=True, transforms=augment
    )


def test_augmentation_reproducible_across_loaders_and_worker_counts(augmented_train_set):
    ds = augmented_train_set
    a = _collect(build_dataloader(ds, batch_size=3, train=True, num_workers=0, seed=7))
    b = _collect(build_dataloader(ds, batch_size=3, train=True, num_workers=2, seed=7))
    assert _same(a, b)
    c = _collect(build_dataloader(ds, batch_size=3, train=True, num_workers=0, seed=8))
    assert not _same(a, c)
    # epochs differ from each other (new order and new augmentation)
    half = len(a) // 2
    assert not _same(a[:half], a[half:])
    # every image of the epoch was seen, each augmented image consistent with its target
    assert sum(len(images) for images, _ in a[:half]) == len(ds)
    for images, targets in a:
        for image, target in zip(images, targets):
            assert target["masks"].shape[1:] == image.shape[1:]
            assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())


class _RandomDataset(torch.utils.data.Dataset):
    """Returns draws from the global RNGs, to check worker seeding."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, sample):
        index, _seed = sample
        draw = torch.tensor([np.random.rand(), random.random(), torch.rand(()).item()])
        return draw, {"index": torch.tensor(index)}


def test_worker_init_seeds_global_rngs():
    def draws(seed, rank=0):
        loader = build_dataloader(
            _RandomDataset(),
            batch_size=2,
            train=True,
            num_workers=2,
            seed=seed,
            rank=rank,
            num_replicas=2,
            aspect_ratio_grouping=False,
        )
        return torch.stack([img for images, _, _ in loader for img in images])

    first = draws(1)
    assert torch.equal(first, draws(1))
    assert not torch.equal(first, draws(2))
    assert not torch.equal(first, draws(1, rank=1))
    assert len(set(first[:, 0].tolist())) == len(first)  # the two workers do not repeat each other


def test_eval_loader_is_sequential_and_unpadded(shapes_paths):
    ds = CocoDetection(shapes_paths["train_ann"], shapes_paths["train_img_dir"], train=False)
    ids = []
    for rank in range(3):
        loader = build_dataloader(ds, batch_size=2, train=False, num_workers=0, num_replicas=3, rank=rank)
        rank_ids = [int(t["image_id"]) for _, targets, _ in loader for t in targets]
        assert rank_ids == sorted(rank_ids)  # same-shape images: grouping keeps index order
        ids.extend(rank_ids)
    assert sorted(ids) == ds.ids  # each image once, no padding duplicates


def test_loader_needs_image_sizes_for_grouping():
    with pytest.raises(TypeError, match=re.escape("_RandomDataset has no image_sizes() method")):
        build_dataloader(_RandomDataset(), batch_size=2, train=True)
