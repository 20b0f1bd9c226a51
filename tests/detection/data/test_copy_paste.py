"""Simple Copy-Paste: occlusion bookkeeping, crowd and empty images, seeding, the real loader and resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from detection.archs import arch_spec
from detection.config import ConfigError, load_config
from detection.data import CocoDetection, build_dataloader, build_transforms
from detection.data.copy_paste import CopyPasteDataset, choose_objects, paste_objects, with_copy_paste

_REPO = Path(__file__).resolve().parents[3]
_H, _W = 40, 50


def _target(rects: list[tuple[int, int, int, int]], labels: list[int], crowd: list[int] | None = None) -> dict:
    """Target of filled rectangles ``(x1, y1, x2, y2)`` (pixel edges), masks uint8 [N, H, W]."""
    masks = torch.zeros((len(rects), _H, _W), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.tensor(crowd or [0] * len(rects), dtype=torch.int64),
        "image_id": torch.tensor(7),
    }


def _image(value: float, h: int = _H, w: int = _W) -> torch.Tensor:
    return torch.full((3, h, w), value)


def _check_consistent(image: torch.Tensor, target: dict, slack_px: float = 0.0) -> None:
    """Per-object fields agree in length; each mask is non-empty, its area is its pixel count and its box
    encloses it (exactly for boxes computed from masks: ``slack_px`` = 0)."""
    n = len(target["boxes"])
    assert len(target["labels"]) == len(target["masks"]) == len(target["area"]) == len(target["iscrowd"]) == n
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
    for k in range(n):
        ys, xs = torch.nonzero(target["masks"][k], as_tuple=True)
        assert len(xs) > 0 and float(target["area"][k]) == len(xs)
        x1, y1, x2, y2 = target["boxes"][k].tolist()
        assert x1 - slack_px <= xs.min() and xs.max() + 1 <= x2 + slack_px
        assert y1 - slack_px <= ys.min() and ys.max() + 1 <= y2 + slack_px


# ---------------------------------------------------------------------------------------------------------
# paste_objects / choose_objects
# ---------------------------------------------------------------------------------------------------------


def test_occluded_object_gets_its_visible_mask_and_box_and_untouched_ones_keep_theirs():
    # object 0 is covered on its right half; object 1 is away from the paste and has a loose box (kept as is)
    target = _target([(10, 10, 30, 20), (35, 25, 45, 35)], [1, 2])
    target["boxes"][1] = torch.tensor([34.0, 24.0, 46.0, 36.0])
    source = _target([(20, 5, 33, 22)], [3])
    image, out = paste_objects(_image(0.0), target, _image(1.0), source, torch.tensor([0]), min_visible_area_px=1)

    assert out["labels"].tolist() == [1, 2, 3]
    assert out["boxes"].tolist() == [[10, 10, 20, 20], [34, 24, 46, 36], [20, 5, 33, 22]]
    assert out["area"].tolist() == [100.0, 100.0, 13 * 17]
    assert out["iscrowd"].tolist() == [0, 0, 0]
    assert not (out["masks"][0].bool() & source["masks"][0].bool()).any()
    assert torch.equal(out["masks"][1], target["masks"][1]) and torch.equal(out["masks"][2], source["masks"][0])
    alpha = source["masks"][0].bool()
    assert (image[:, alpha] == 1.0).all() and (image[:, ~alpha] == 0.0).all()
    assert int(out["image_id"]) == 7
    _check_consistent(image, out, slack_px=1.0)


def test_hidden_objects_and_slivers_below_the_visible_area_are_dropped():
    # 0: fully hidden; 1: loses a 2 x 2 corner (12 px left, same box); 2: keeps its top 10 x 10
    target = _target([(12, 12, 18, 18), (8, 8, 12, 12), (30, 10, 40, 30)], [1, 2, 3])
    source = _target([(10, 10, 20, 20), (30, 20, 45, 35)], [4, 5])
    chosen = torch.tensor([0, 1])
    _, loose = paste_objects(_image(0.0), target, _image(1.0), source, chosen, min_visible_area_px=4)
    assert loose["labels"].tolist() == [2, 3, 4, 5]
    assert loose["boxes"][:2].tolist() == [[8, 8, 12, 12], [30, 10, 40, 20]]
    assert loose["area"][:2].tolist() == [12.0, 100.0]
    _, strict = paste_objects(_image(0.0), target, _image(1.0), source, chosen, min_visible_area_px=13)
    assert strict["labels"].tolist() == [3, 4, 5]


def test_choose_objects_never_picks_crowd_and_draws_between_one_and_max():
    iscrowd = torch.tensor([1, 0, 0, 1, 0, 0, 0])
    rng = np.random.default_rng(0)
    picks = [choose_objects(rng, iscrowd, max_objects=3) for _ in range(200)]
    assert all(1 <= len(p) <= 3 and p.dtype == torch.int64 for p in picks)
    assert {len(p) for p in picks} == {1, 2, 3}
    assert set(torch.cat(picks).tolist()) == {1, 2, 4, 5, 6}
    assert all(torch.equal(p, p.sort().values) for p in picks)
    assert len(choose_objects(rng, torch.tensor([1, 1]), max_objects=3)) == 0
    assert len(choose_objects(rng, torch.zeros(0, dtype=torch.int64), max_objects=3)) == 0


def test_crowd_region_of_the_target_is_cut_and_stays_crowd():
    target = _target([(0, 0, 20, 20), (25, 0, 35, 10)], [1, 2], crowd=[1, 0])
    source = _target([(10, 0, 30, 40)], [3])
    _, out = paste_objects(_image(0.0), target, _image(1.0), source, torch.tensor([0]), min_visible_area_px=1)
    assert out["iscrowd"].tolist() == [1, 0, 0]
    assert out["boxes"][:2].tolist() == [[0, 0, 10, 20], [30, 0, 35, 10]]
    assert out["area"][:2].tolist() == [200.0, 50.0]


def test_empty_target_receives_objects_and_empty_source_changes_nothing():
    empty = _target([], [])
    source = _target([(5, 5, 15, 15)], [2])
    image, out = paste_objects(_image(0.0), empty, _image(1.0), source, torch.tensor([0]), min_visible_area_px=1)
    assert out["labels"].tolist() == [2] and out["boxes"].tolist() == [[5, 5, 15, 15]]
    assert out["masks"].shape == (1, _H, _W) and float(image.sum()) == 3 * 100

    target = _target([(5, 5, 15, 15)], [1])
    none = choose_objects(np.random.default_rng(0), empty["iscrowd"], max_objects=5)
    same_image, same = paste_objects(_image(0.0), target, _image(1.0), empty, none, min_visible_area_px=1)
    assert same is target and float(same_image.sum()) == 0.0


def test_a_partner_of_another_size_is_resized_to_the_target():
    source = _target([(10, 10, 30, 20)], [3])  # 40 x 50, pasted onto 80 x 100
    target = _target([], [])
    target["masks"] = torch.zeros((0, 2 * _H, 2 * _W), dtype=torch.uint8)
    image, out = paste_objects(
        _image(0.0, 2 * _H, 2 * _W), target, _image(1.0), source, torch.tensor([0]), min_visible_area_px=1
    )
    assert image.shape == (3, 2 * _H, 2 * _W) and out["masks"].shape == (1, 2 * _H, 2 * _W)
    assert out["boxes"].tolist() == [[20, 20, 60, 40]] and out["area"].tolist() == [800.0]


# ---------------------------------------------------------------------------------------------------------
# CopyPasteDataset
# ---------------------------------------------------------------------------------------------------------


class _Rects(torch.utils.data.Dataset):
    """Image i holds i % 3 rectangles (0, 1 or 2 objects); the seed shifts them so augmentation shows."""

    with_masks = True
    transforms = None
    categories = None

    def __len__(self) -> int:
        return 6

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(_H, _W)] * 6

    def __getitem__(self, index: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        i, seed = index
        dx = seed % 7
        rects = [(2 + dx + 20 * k, 5, 14 + dx + 20 * k, 30) for k in range(i % 3)]
        return _image(i / 10), _target(rects, [i + 1] * len(rects))


def _same(a: Any, b: Any) -> bool:
    (ia, ta), (ib, tb) = a, b
    return torch.equal(ia, ib) and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_samples_follow_their_seed_only():
    ds = CopyPasteDataset(_Rects(), p=1.0, max_objects=2, min_visible_area_px=1)
    again = CopyPasteDataset(_Rects(), p=1.0, max_objects=2, min_visible_area_px=1)
    samples = {(i, s): ds[(i, s)] for i in range(6) for s in (11, 12, 13)}
    assert all(_same(samples[key], again[key]) for key in samples)
    pasted = [key for key, (_, t) in samples.items() if len(t["labels"]) and int(t["labels"][-1]) != key[0] + 1]
    assert len(pasted) >= 6  # partners with objects: a third of them have none
    assert any(not _same(samples[(i, 11)], samples[(i, 12)]) for i in range(6))
    for image, target in samples.values():
        _check_consistent(image, target)

    off = CopyPasteDataset(_Rects(), p=0.0, max_objects=2, min_visible_area_px=1)
    assert all(_same(off[(i, 5)], _Rects()[(i, 5)]) for i in range(6))


def test_dataset_without_masks_and_bad_parameters_are_refused():
    no_masks = _Rects()
    no_masks.with_masks = False
    with pytest.raises(ValueError, match=re.escape("the dataset loads none (with_masks=False)")):
        CopyPasteDataset(no_masks, p=1.0, max_objects=2, min_visible_area_px=1)
    with pytest.raises(ValueError, match=re.escape("got p=1.5, max_objects=2, min_visible_area_px=1")):
        CopyPasteDataset(_Rects(), p=1.5, max_objects=2, min_visible_area_px=1)


def test_config_section_and_box_only_architectures():
    cfg = load_config(None, ["data.train.copy_paste.enabled=true", "data.train.copy_paste.max_objects=7"])
    wrapped = with_copy_paste(_Rects(), cfg.data.train.copy_paste)
    assert isinstance(wrapped, CopyPasteDataset) and (wrapped.p, wrapped.max_objects) == (1.0, 7)
    plain = _Rects()
    assert with_copy_paste(plain, load_config(None).data.train.copy_paste) is plain
    with pytest.raises(ConfigError, match=re.escape("--set: data.train.copy_paste.p must be in [0, 1]; got 1.5")):
        load_config(None, ["data.train.copy_paste.p=1.5"])

    for path in ("configs/quickstart.yaml", "configs/mask_rcnn_r50_fpn_ssj_copypaste_270k_coco.yaml"):
        recipe = load_config(_REPO / path, ["data.train.copy_paste.enabled=true"])
        assert recipe.data.train.copy_paste.enabled and arch_spec(recipe.model.arch).masks
    ssj = load_config(_REPO / "configs/mask_rcnn_r50_fpn_ssj_copypaste_270k_coco.yaml")
    assert ssj.data.train.augment[0] == {"name": "large_scale_jitter", "size": 1024, "min_scale": 0.8,
                                         "max_scale": 1.25}

    with pytest.raises(ConfigError, match=re.escape(  # refused when the config loads, before any file is read
        "data.train.copy_paste.enabled is true but model.arch='faster_rcnn' predicts no masks"
    )):
        load_config(None, ["model.arch=faster_rcnn", "data.train.copy_paste.enabled=true"])


# ---------------------------------------------------------------------------------------------------------
# Through the real loader
# ---------------------------------------------------------------------------------------------------------


def _batches(loader: Any, epoch: int, start_batch: int = 0) -> list[Any]:
    loader.batch_sampler.set_epoch(epoch, start_batch=start_batch)
    return list(loader)


def _same_batch(a: Any, b: Any) -> bool:
    return len(a.images) == len(b.images) and all(
        _same((ia, ta), (ib, tb)) for ia, ta, ib, tb in zip(a.images, a.targets, b.images, b.targets)
    )


@pytest.fixture
def shapes_copy_paste(shapes_paths: dict[str, Path]) -> CopyPasteDataset:
    augment = build_transforms([{"name": "horizontal_flip", "p": 0.5}], train=True)
    base = CocoDetection(shapes_paths["train_ann"], shapes_paths["train_img_dir"], train=True, transforms=augment)
    return CopyPasteDataset(base, p=1.0, max_objects=3, min_visible_area_px=1)


def test_shapes_loader_pastes_and_resumes_exactly(shapes_copy_paste: CopyPasteDataset):
    loader = build_dataloader(shapes_copy_paste, batch_size=2, train=True, num_workers=0, seed=5)
    epoch = _batches(loader, 1)
    assert len(epoch) == 5
    base_counts = [len(shapes_copy_paste.dataset[i][1]["labels"]) for i in range(10)]
    counts = [len(t["labels"]) for b in epoch for t in b.targets]
    assert sum(counts) > sum(base_counts)  # objects were pasted
    for batch in epoch:
        for image, target in zip(batch.images, batch.targets):
            assert image.shape == (3, 64, 96)
            _check_consistent(image, target, slack_px=1.0)

    state = {"epoch": 1, "start_batch": 3}
    loader.batch_sampler.load_state_dict(state)
    assert all(_same_batch(x, y) for x, y in zip(list(loader), epoch[3:], strict=True))
    fresh = build_dataloader(shapes_copy_paste, batch_size=2, train=True, num_workers=1, seed=5)
    fresh.batch_sampler.load_state_dict(state)
    assert all(_same_batch(x, y) for x, y in zip(list(fresh), epoch[3:], strict=True))


def test_coco128_with_large_scale_jitter_through_the_loader(coco128_dir: Path):
    augment = build_transforms(
        [{"name": "large_scale_jitter", "size": 256, "min_scale": 0.1, "max_scale": 2.0},
         {"name": "horizontal_flip", "p": 0.5}],
        train=True,
    )
    base = CocoDetection(coco128_dir / "annotations" / "instances.json", coco128_dir / "images", train=True,
                         transforms=augment, filter_empty=False)
    ds = CopyPasteDataset(base, p=1.0, max_objects=100, min_visible_area_px=1)
    loader = build_dataloader(ds, batch_size=2, train=True, num_workers=0, seed=1)
    loader.batch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(4), loader)]
    plain = [base[index] for batch in list(loader.batch_sampler)[:4] for index in batch]
    grew = 0
    for (image, target), (_, before) in zip(((i, t) for b in batches for i, t in zip(b.images, b.targets)), plain):
        assert image.shape == (3, 256, 256)
        # boxes of untouched objects are polygon boxes scaled by the jitter, masks rasterised then resampled
        _check_consistent(image, target, slack_px=2.0)
        grew += int(len(target["labels"]) > len(before["labels"]))
    assert grew >= 4
