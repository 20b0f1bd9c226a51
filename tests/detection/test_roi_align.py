"""RoIAlign as sparse matrix products: torchvision's outputs and gradients, to float rounding."""

import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detection import build_detector
from detection.models import to_channels_last
from detection import roi_align as module
from detection.roi_align import SparseMultiScaleRoIAlign, roi_align_matrix


def _boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.6 + 0.5  # some boxes under one pixel of the map
    return torch.cat([xy - size * 0.05, (xy + wh).clamp(max=size * 1.02)], dim=1)  # a few cross the border


def _features(generator: torch.Generator, channels: int = 8) -> OrderedDict:
    sizes = {"p2": 32, "p3": 16, "p4": 8, "p5": 4}
    return OrderedDict((k, torch.randn(2, channels, s, s, generator=generator)) for k, s in sizes.items())


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_function_is_torchvisions_roi_align_in_float64(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 20, 24, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.cat([torch.tensor([[0.0], [2.0], [0.0], [1.0], [2.0]]), _boxes(5, 90.0, g)], dim=1).double()
    extra = [[1.0, 0.0, 0.0, 0.0, 0.0],  # a degenerate box
             [0.0, -40.0, -30.0, 200.0, 150.0],  # past every edge of the map
             [2.0, 94.0, 78.0, 96.0, 80.0]]  # the last pixel
    rois = torch.cat([rois, rois.new_tensor(extra)])
    upstream = torch.randn(len(rois), 4, 5, 3, generator=g, dtype=torch.float64)
    ours = module.roi_align(x, rois, (5, 3), 0.25, sampling_ratio, aligned)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), x)
    expected = roi_align(x, rois, (5, 3), 0.25, sampling_ratio, aligned)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), x)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert ours.is_contiguous(memory_format=torch.channels_last)


def test_matrix_has_fixed_entries_per_row_and_bilinear_weights():
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 24.0], [1.0, -100.0, -100.0, -90.0, -90.0]])
    matrix = roi_align_matrix(rois, 0.25, (2, 3), 2, False, (2, 16, 16))
    assert matrix.layout == torch.sparse_csr and matrix.shape == (2 * 2 * 3, 2 * 16 * 16)
    assert torch.equal(matrix.crow_indices(), torch.arange(0, 12 * 16 + 1, 16))
    per_row = matrix.to_dense().sum(1)
    torch.testing.assert_close(per_row[:6], torch.ones(6))  # inside the map: the weights of a bin sum to one
    assert torch.equal(per_row[6:], torch.zeros(6))  # off the map: nothing
    assert matrix.to_dense()[:6, 256:].abs().sum() == 0  # RoI 0 reads image 0 only


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooler_equals_torchvisions_forward_and_gradients(autocast, output_size, channels_last):
    g = torch.Generator().manual_seed(0)
    features = _features(g)
    if channels_last:
        features = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in features.items())
    boxes = [_boxes(23, 128.0, g), _boxes(17, 128.0, g)]
    image_shapes = [(128, 128), (120, 128)]
    names = list(features)
    ours = SparseMultiScaleRoIAlign(names, output_size, 2, canonical_scale=32)  # RoIs on several levels
    reference = MultiScaleRoIAlign(names, output_size, 2, canonical_scale=32)
    results = []
    for pooler in (ours, reference):
        maps = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in features.items())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inputs = OrderedDict((k, v.to(torch.bfloat16) if autocast else v) for k, v in maps.items())
            out = pooler(inputs, boxes, image_shapes)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        (out * weight).sum().backward()
        results.append((out.detach(), [maps[k].grad for k in names]))
    (out, grads), (ref_out, ref_grads) = results
    assert len(ours.map_levels(boxes).unique()) >= 3
    # float32 sums in another order: 1e-6; bf16 outputs and gradients round those to 8 bits: one bf16 step
    tolerance = {"rtol": 8e-3, "atol": 8e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance)
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad.dtype == ref.dtype, name
        torch.testing.assert_close(grad.float(), ref.float(), **tolerance, msg=name)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_empty_level_and_image_without_rois_give_zero_gradients():
    features = OrderedDict(p2=torch.randn(2, 4, 16, 16, requires_grad=True), p3=torch.randn(2, 4, 8, 8, requires_grad=True))
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.zeros((0, 4))]  # small: all on p2, none for image 1
    out = SparseMultiScaleRoIAlign(["p2", "p3"], 7, 2)(features, boxes, [(64, 64), (64, 64)])
    out.sum().backward()
    assert out.shape == (1, 4, 7, 7)
    assert features["p2"].grad[1].abs().sum() == 0 and features["p2"].grad[0].abs().sum() > 0
    assert features["p3"].grad is None or features["p3"].grad.abs().sum() == 0
    none = SparseMultiScaleRoIAlign(["p2", "p3"], 7, 2)(features, [torch.zeros((0, 4))] * 2, [(64, 64)] * 2)
    assert none.shape == (0, 4, 7, 7)


def test_adaptive_sampling_and_torchscript_use_torchvisions_pooling(monkeypatch):
    g = torch.Generator().manual_seed(3)
    features = _features(g)
    boxes, shapes = [_boxes(9, 128.0, g), _boxes(4, 128.0, g)], [(128, 128), (128, 128)]
    expected = MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, shapes)
    scripted = torch.jit.script(SparseMultiScaleRoIAlign(list(features), 7, 2))
    monkeypatch.setattr(module, "roi_align", lambda *a: pytest.fail("this path is torchvision's"))
    assert torch.equal(scripted(features, boxes, shapes), expected)
    adaptive = SparseMultiScaleRoIAlign(list(features), 7, 0)  # a sample grid per RoI: torchvision's kernel
    assert torch.equal(adaptive(features, boxes, shapes), MultiScaleRoIAlign(list(features), 7, 0)(features, boxes, shapes))


def test_build_detector_gives_the_rcnns_these_poolers_and_they_copy_and_script():
    model = build_detector("mask_rcnn", backbone="resnet18", num_classes=3, min_size=64, max_size=64)
    poolers = [model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool]
    assert all(type(p) is SparseMultiScaleRoIAlign for p in poolers)
    assert [p.output_size for p in poolers] == [(7, 7), (14, 14)] and poolers[0].sampling_ratio == 2
    assert type(copy.deepcopy(poolers[0])) is SparseMultiScaleRoIAlign
    torch.jit.script(poolers[0])


def _targets(generator: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(2):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [60.0, 30.0, 120.0, 100.0], [5.0, 70.0, 50.0, 125.0]])
        masks = torch.zeros(3, 128, 128, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks})
    return targets


def _step(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 128, 128, generator=g).to(dtype) for _ in range(2)]
    targets = _targets(g)
    torch.manual_seed(1)  # the same proposal sampling in every model
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_as_the_trainer_runs_it_matches_the_plain_model():
    """The trainer's model (channels-last, sparse-product poolers) against the plain one (contiguous,
    torchvision's poolers), fp32: the same losses within 1e-5, and gradients as close to the float64
    gradient as the plain model's (within a factor 4, plus 1e-4 relative) (early backbone gradients of a randomly initialised model
    with batch statistics carry float32 rounding of about 1e-3 in either layout)."""
    torch.manual_seed(0)
    fast = build_detector("mask_rcnn", backbone="resnet18", num_classes=3, min_size=128, max_size=128).train()
    plain = copy.deepcopy(fast)
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(plain.roi_heads, name)
        setattr(plain.roi_heads, name, MultiScaleRoIAlign(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio))
    exact = copy.deepcopy(plain).double()
    to_channels_last(fast)
    (losses, grads), (fast_losses, fast_grads) = _step(plain), _step(fast)
    _, exact_grads = _step(exact, torch.float64)
    for key, value in losses.items():
        torch.testing.assert_close(fast_losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert grads.keys() == fast_grads.keys() == exact_grads.keys() and len(grads) > 50
    for name, value in exact_grads.items():
        norm = float(value.norm())
        plain_error = float((grads[name].double() - value).norm()) / norm
        fast_error = float((fast_grads[name].double() - value).norm()) / norm
        assert fast_error <= 4 * plain_error + 1e-4, (name, fast_error, plain_error)
