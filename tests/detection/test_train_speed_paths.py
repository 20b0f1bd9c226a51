"""The training step's fast paths compute what torchvision's modules compute: threaded RoIAlign forward
and backward against ``torchvision.ops.roi_align``, and a whole Mask R-CNN step against the same model
with torchvision's poolers."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

import detection.roi_align as threaded
from detection import build_detector
from detection.roi_align import ContiguousMaps, ThreadedMultiScaleRoIAlign, threaded_roi_align


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="roi_align") as executor:
        yield executor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def level_inputs(images: int, rois_per_image: int, seed: int = 0):
    """Three levels of maps ``[images, 4, H, W]`` (strides 4, 8, 16 of a 96 px image), RoIs ``[K, 5]`` and a
    level per RoI. Level 2 gets no RoI, and the last image none on level 1."""
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(images, 4, 96 // s, 96 // s, generator=g, dtype=torch.float64) for s in (4, 8, 16)]
    xy = torch.rand(images * rois_per_image, 2, generator=g) * 70
    boxes = torch.cat([xy, xy + 1 + torch.rand(images * rois_per_image, 2, generator=g) * 40], 1)
    image_index = torch.arange(images).repeat_interleave(rois_per_image)
    levels = torch.randint(0, 2, (len(boxes),), generator=g)
    levels[(image_index == images - 1) & (levels == 1)] = 0
    rois = torch.cat([image_index[:, None].double(), boxes.double()], 1)
    return features, rois, levels, [0.25, 0.125, 0.0625]


def torchvision_reference(features, rois, levels, scales, output_size, sampling_ratio, aligned):
    out = features[0].new_zeros((len(rois), features[0].shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        index = torch.where(levels == level)[0]
        out[index] = roi_align(feature, rois[index], output_size, scale, sampling_ratio, aligned)
    return out


def forward_and_grads(fn, features, grad_out):
    leaves = [f.clone().requires_grad_() for f in features]
    out = fn(leaves)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), [torch.zeros_like(f) if g is None else g for f, g in zip(features, grads)]


@pytest.mark.parametrize("workers", [2, 3])  # 3 workers on 2 images: each image's RoIs split and summed
@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(False, 2), (True, 0), (True, 3)])
def test_threaded_roi_align_equals_torchvision_forward_and_backward(pool, workers, aligned, sampling_ratio):
    features, rois, levels, scales = level_inputs(images=2, rois_per_image=13)
    output_size = (5, 4)
    grad_out = torch.randn(len(rois), 4, *output_size, dtype=torch.float64)
    expected, expected_grads = forward_and_grads(
        lambda f: torchvision_reference(f, rois, levels, scales, output_size, sampling_ratio, aligned), features, grad_out)
    got, got_grads = forward_and_grads(
        lambda f: threaded_roi_align(f, rois, levels, scales, output_size, sampling_ratio, aligned,
                                     lambda _: pool, workers), features, grad_out)
    assert torch.equal(got, expected)
    assert expected_grads[1][-1].abs().max() == 0 and expected_grads[2].abs().max() == 0
    for level, (g, e) in enumerate(zip(got_grads, expected_grads)):
        assert e.abs().max() > 0 or level > 0
        if workers == 2:  # one image per job: the kernel's own summation order, bit-identical
            assert torch.equal(g, e), level
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_threaded_roi_align_of_no_rois_is_empty_with_zero_gradients(pool):
    features, _, _, scales = level_inputs(images=2, rois_per_image=1)
    rois, levels = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    got, grads = forward_and_grads(
        lambda f: threaded_roi_align(f, rois, levels, scales, (3, 3), 2, False, lambda _: pool, 2), features,
        torch.zeros(0, 4, 3, 3, dtype=torch.float64))
    assert got.shape == (0, 4, 3, 3)
    assert all(g.abs().max() == 0 for g in grads)


def test_threaded_roi_align_reads_channels_last_maps_and_runs_on_the_pool(pool, monkeypatch):
    ran_in = []
    for name in ("_pool_rois", "_pool_rois_backward"):
        kernel = getattr(threaded, name)
        monkeypatch.setattr(threaded, name, lambda *a, kernel=kernel, name=name: (
            ran_in.append((name, threading.current_thread().name)), kernel(*a))[1])
    features, rois, levels, scales = level_inputs(images=2, rois_per_image=9, seed=1)
    grad_out = torch.randn(len(rois), 4, 2, 2, dtype=torch.float64)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    expected = forward_and_grads(lambda f: torchvision_reference(f, rois, levels, scales, (2, 2), 2, False),
                                 features, grad_out)
    got = forward_and_grads(lambda f: threaded_roi_align(
        [x.contiguous(memory_format=torch.channels_last) for x in f], rois, levels, scales, (2, 2), 2, False,
        lambda _: pool, 2), channels_last, grad_out)
    assert torch.equal(got[0], expected[0])
    assert all(torch.equal(g, e) for g, e in zip(got[1], expected[1]))
    # forward: 2 chunks on each of 2 levels; backward: one job per image and level with RoIs (3)
    assert sorted(n for n, _ in ran_in) == ["_pool_rois"] * 4 + ["_pool_rois_backward"] * 3
    assert all(thread.startswith("roi_align") for _, thread in ran_in)


def pooler_inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    features = {k: torch.randn(2, 8, s, s, dtype=dtype).requires_grad_() for k, s in (("0", 32), ("1", 16), ("2", 8))}
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2) * 90
        boxes.append(torch.cat([xy, xy + 2 + torch.rand(30, 2) * 60], 1))
    return features, boxes


@pytest.mark.parametrize("amp", [False, True])
def test_threaded_pooler_trains_like_torchvisions(two_threads, amp):
    """Same outputs and feature gradients, in fp32 and on bf16 maps under bf16 autocast (where both pool in
    float32 and return bf16)."""
    features, boxes = pooler_inputs(torch.bfloat16 if amp else torch.float32)
    results = []
    for pooler in (MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=32),
                   ThreadedMultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=32)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = pooler(features, boxes, [(128, 128)] * 2)
        grads = torch.autograd.grad(out, list(features.values()), torch.ones_like(out))
        results.append((out, grads))
    (expected, expected_grads), (got, got_grads) = results
    assert len(torch.unique(pooler.map_levels(boxes))) == 3
    assert got.dtype == expected.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(got, expected)
    assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got_grads, expected_grads))
    assert pooler._pool is not None and pooler._pool._max_workers == 2
    pooler.close()


def test_contiguous_maps_keep_float32_copies_apart_from_copies_without_gradients():
    maps = ContiguousMaps()
    bf16 = torch.randn(1, 4, 6, 6).bfloat16().requires_grad_()
    with torch.no_grad():
        untracked = maps(bf16, torch.float32)
    assert untracked.dtype == torch.float32 and not untracked.requires_grad
    tracked = maps(bf16, torch.float32)
    assert tracked.requires_grad and tracked is not untracked
    assert maps(bf16, torch.float32) is tracked and maps(bf16) is bf16


def tiny_mask_rcnn():
    torch.manual_seed(0)
    return build_detector("mask_rcnn", backbone={"name": "resnet18", "base_channels": 16, "fpn": {"out_channels": 32}},
                          num_classes=3, min_size=128, max_size=128, box_head_dim=64, mask_head_channels=(32, 32),
                          rpn_batch_size_per_image=64, box_batch_size_per_image=64, roi_canonical_scale=56)


def batch():
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(2):
        xy = torch.rand(3, 2, generator=g) * 70
        boxes = torch.cat([xy, xy + 12 + torch.rand(3, 2, generator=g) * 40], 1)
        masks = torch.zeros(3, 128, 128, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        images.append(torch.rand(3, 128, 128, generator=g))
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks})
    return images, targets


def one_step(model):
    images, targets = batch()
    torch.manual_seed(1)  # the samplers draw from it
    losses = model(images, targets)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_equals_the_step_with_torchvisions_poolers(two_threads, monkeypatch):
    backward_jobs = []
    kernel = threaded._pool_rois_backward
    monkeypatch.setattr(threaded, "_pool_rois_backward", lambda *a: (backward_jobs.append(a[4]), kernel(*a))[1])
    ours = tiny_mask_rcnn().train()
    roi_heads = ours.roi_heads
    assert type(roi_heads.box_roi_pool) is type(roi_heads.mask_roi_pool) is ThreadedMultiScaleRoIAlign
    assert roi_heads.box_roi_pool.maps is roi_heads.mask_roi_pool.maps  # one copy of each map for both
    assert "ThreadedMultiScaleRoIAlign(featmap_names=['p2', 'p3', 'p4', 'p5'], output_size=(7, 7)" in repr(ours)
    plain = copy.deepcopy(ours)
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(plain.roi_heads, name)
        setattr(plain.roi_heads, name, MultiScaleRoIAlign(pooler.featmap_names, pooler.output_size,
                                                          pooler.sampling_ratio, canonical_scale=56))
    expected_losses, expected_grads = one_step(plain)
    losses, grads = one_step(ours)
    assert set(losses) == set(expected_losses) and losses["loss_mask"] > 0
    for key, value in expected_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=0)
    assert set(grads) == set(expected_grads)
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-5 * value.abs().max().item(), msg=name)
    # the threaded backward ran, for both poolers, on RoIs of several levels of both images
    assert len(backward_jobs) >= 2 * 2 * 2 and len(set(backward_jobs)) >= 2


def test_channels_last_is_the_layout_where_convolutions_run_faster():
    from detection.precision import PrecisionPolicy

    assert PrecisionPolicy("cpu").channels_last and PrecisionPolicy("cpu", torch.bfloat16).channels_last
    assert PrecisionPolicy("cuda", torch.float16).channels_last and not PrecisionPolicy("cuda").channels_last


@pytest.mark.parametrize(("setting", "amp", "channels_last"), [("auto", "false", True), ("auto", "true", True),
                                                               ("false", "false", False)])
def test_training_model_memory_format_follows_train_channels_last(tmp_path, setting, amp, channels_last):
    from detection.config import load_config
    from detection.experiment import Run
    from detection.trainer import _training_model

    cfg = load_config(Path(__file__).parents[2] / "configs/smoke/tiny_cpu.yaml",
                      [f"train.channels_last={setting}", f"train.amp.enabled={amp}"])
    logged = []
    model = _training_model(Run(cfg, tmp_path, logged.append), 3, None)
    assert model.backbone.channels_last is channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) is channels_last for w in convs)
    expected = "memory format channels-last (train.channels_last: auto, cpu " + ("bf16)" if amp == "true" else "fp32)")
    assert (expected in logged) is (setting == "auto")
