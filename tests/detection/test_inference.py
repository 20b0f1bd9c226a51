"""optimize_for_inference: BN folding, channels-last, the swapped-in fast modules, reduced precision with
float32 outputs."""

import copy

import pytest
import torch
from torch import nn

from backbone import build_backbone
from detection import build_detector
from detection.inference import AutocastDetector, fold_batch_norms, optimize_for_inference
from detection.inference_modules import (
    GemmMaskRCNNPredictor,
    OneDNNLinear,
    PasteMasksTransform,
    TopKRoIHeads,
    batched_nms_top_k,
)
from detection.roi_align import SparseMultiScaleRoIAlign


def test_folding_keeps_backbone_outputs():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", norm="bn", fpn={"out_channels": 32, "norm": "bn"})
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    bb.eval()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        ref = bb(x)
        folded = fold_batch_norms(bb)
        out = bb(x)
    # stem 1 + 8 blocks x 2 + 3 projection shortcuts = 20 in the body, 8 in the FPN
    assert folded == 28
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    for k in ref:
        assert (out[k] - ref[k]).abs().max().item() <= 1e-4 * max(1.0, ref[k].abs().max().item())


def test_training_mode_bn_is_not_folded():
    bb = build_backbone("resnet18", norm="bn").train()
    assert fold_batch_norms(bb) == 0


def test_fp32_fast_path_matches_retinanet_features_and_head():
    """RetinaNet's prior-initialised classifier gives every anchor a score of about 0.01, so its final
    detections are all ties; compare what the fast path changes: features and head outputs."""
    torch.manual_seed(0)
    options = {"backbone": {"name": "resnet18", "norm": "frozen_bn", "fpn": {"out_channels": 64}}, "num_classes": 4}
    plain = build_detector("retinanet", **options).eval()
    fast = build_detector("retinanet", **options)
    fast.load_state_dict(plain.state_dict())
    assert optimize_for_inference(fast) is fast
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        fa, fb = plain.backbone(x), fast.backbone(x)
        ha, hb = plain.head(list(fa.values())), fast.head(list(fb.values()))
    for k in fa:
        assert (fa[k] - fb[k]).abs().max().item() <= 1e-4, k
    for k in ha:
        assert (ha[k] - hb[k]).abs().max().item() <= 1e-4, k


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn_v2"])
def test_fp32_fast_path_matches_the_plain_model(arch):
    torch.manual_seed(0)
    kwargs = {"box_score_thresh": 0.0}
    plain = build_detector(arch, backbone={"name": "resnet18", "norm": "frozen_bn", "fpn": {"out_channels": 64}},
                           num_classes=4, min_size=128, max_size=128, **kwargs).eval()
    for m in plain.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_var.uniform_(0.5, 1.5)
    fast = build_detector(arch, backbone={"name": "resnet18", "norm": "frozen_bn", "fpn": {"out_channels": 64}},
                          num_classes=4, min_size=128, max_size=128, **kwargs)
    fast.load_state_dict(plain.state_dict())
    assert optimize_for_inference(fast, precision="fp32") is fast
    assert fast.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert type(fast.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign
    assert isinstance(fast.transform, PasteMasksTransform)
    assert isinstance(fast.roi_heads.mask_predictor, GemmMaskRCNNPredictor) == arch.startswith("mask")
    assert isinstance(fast.roi_heads, TopKRoIHeads) and not isinstance(plain.roi_heads, TopKRoIHeads)
    linears = [m for m in fast.roi_heads.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    # modules, not patches: no instance carries its own forward or postprocess
    assert not [n for n, m in fast.named_modules() if {"forward", "postprocess"} & set(vars(m))]
    image = [torch.rand(3, 128, 112)]
    with torch.no_grad():
        a = plain(image)[0]
        b = fast(image)[0]
    assert a["boxes"].shape == b["boxes"].shape and len(a["boxes"]) > 0
    # Same detections; near-tied scores of an untrained model may swap places, so match rows.
    rows_a = torch.cat([a["boxes"], a["scores"][:, None], a["labels"][:, None].float()], 1)
    rows_b = torch.cat([b["boxes"], b["scores"][:, None], b["labels"][:, None].float()], 1)
    distance = (rows_a[:, None, :] - rows_b[None, :, :]).abs().amax(-1)
    # Rows at the detections-per-image cut-off can differ by a near-tie; compare the ones clearly above it.
    clear = a["scores"] > max(a["scores"].min(), b["scores"].min()) + 1e-3
    assert clear.sum() > 10
    assert distance[clear].min(1).values.max().item() <= 1e-4
    if "masks" in a:
        order = distance.argmin(1)
        assert (a["masks"] - b["masks"][order]).abs().max().item() <= 1e-4


def test_a_torchvision_built_model_gets_the_sparse_poolers():
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.ops import MultiScaleRoIAlign

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    plain = model.roi_heads.mask_roi_pool
    assert type(plain) is MultiScaleRoIAlign
    optimize_for_inference(model)
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(model.roi_heads, name)
        assert type(pooler) is SparseMultiScaleRoIAlign, name
    pooler = model.roi_heads.mask_roi_pool
    assert (pooler.featmap_names, pooler.output_size, pooler.sampling_ratio) == (
        plain.featmap_names, plain.output_size, plain.sampling_ratio)


def test_bf16_fast_path_on_cpu_keeps_outputs_float32():
    import warnings

    torch.manual_seed(0)
    model = build_detector("mask_rcnn", backbone={"name": "resnet18", "fpn": {"out_channels": 32}}, num_classes=4,
                           min_size=64, max_size=64, box_score_thresh=0.0).eval()
    seen = []
    model.backbone.body.register_forward_hook(lambda m, i, out: seen.append(next(iter(out.values())).dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPUs without native bf16 warn that it is slow
        fast = optimize_for_inference(model, precision="bf16")
    assert isinstance(fast, AutocastDetector) and fast.detector is model and fast.policy.dtype == torch.bfloat16
    with torch.no_grad():
        out = fast([torch.rand(3, 64, 64)])[0]
        plain_out = model([torch.rand(3, 64, 64)])[0]  # the detector itself still runs in fp32
    assert seen == [torch.bfloat16, torch.float32]
    assert plain_out["boxes"].dtype == torch.float32
    assert len(out["boxes"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert out[key].dtype == torch.float32, key


def test_bad_precision():
    with pytest.raises(ValueError, match="unknown precision 'int8'; choose one of"):
        optimize_for_inference(nn.Conv2d(1, 1, 1), precision="int8")


@pytest.mark.slow
def test_bf16_fast_path_agrees_with_fp32_on_a_trained_model(tmp_path):
    """Train the quickstart model until it fits a few images, then compare: every confident fp32
    detection is found again by the bf16 fast path with the same label and box IoU > 0.9, or, where
    bf16 itself moves the box (torchvision's model under plain bf16 autocast also misses 0.9), with an
    IoU no more than 0.02 below that model's."""
    import warnings
    from pathlib import Path

    from torchvision.io import read_image
    from torchvision.ops import box_iou

    from detection.config import load_config
    from detection.trainer import build_model, train
    from detection.weights import load_weights, read_detector_checkpoint

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "quickstart.yaml", [
        f"data.shapes.cache_dir={tmp_path / 'shapes'}", "data.shapes.num_train=8", "data.shapes.num_val=0",
        # 400 iterations: the half-width quickstart model needs them to fit 8 images (at 200 its loss is still
        # ~1.5 and a few of its borderline detections move under bf16).
        "train.max_iters=400", "train.log_period=100", "train.checkpoint_period=0", "data.num_workers=0",
        "train.device=cpu", "train.schedule.warmup_iters=20",
    ])
    train(cfg, output_dir=tmp_path / "run", log=lambda s: None)
    state, _ = read_detector_checkpoint(tmp_path / "run" / "model_final.pth")
    reference = build_model(cfg, 4)
    load_weights(reference, state)
    reference.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPUs without native bf16 warn that it is slow; it is still correct
        fast = optimize_for_inference(copy.deepcopy(reference), precision="bf16")
    images_dir = next((tmp_path / "shapes").iterdir()) / "train" / "images"
    images = [read_image(str(p)).float() / 255 for p in sorted(images_dir.iterdir())]
    with torch.no_grad():
        fp32, ours = reference(images), fast(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = reference(images)

    def best_iou(box: torch.Tensor, label: torch.Tensor, found: dict) -> float:
        same = found["labels"] == label
        return box_iou(box[None], found["boxes"][same]).max().item() if same.any() else 0.0

    confident = 0
    for ref, out, plain_bf16 in zip(fp32, ours, autocast):
        assert out["boxes"].dtype == torch.float32 and out["masks"].dtype == torch.float32
        keep = ref["scores"] > 0.5
        confident += int(keep.sum())
        for box, label in zip(ref["boxes"][keep], ref["labels"][keep]):
            iou = best_iou(box, label, out)
            assert iou > 0.9 or iou >= best_iou(box, label, plain_bf16) - 0.02, (iou, label)
    assert confident >= 5, f"the trained model made only {confident} confident detections"


def test_paste_masks_is_identical_to_torchvisions():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from detection.inference import paste_masks

    torch.manual_seed(0)
    masks = torch.rand(12, 1, 28, 28)
    xy = torch.rand(12, 2) * 90
    boxes = torch.cat([xy, xy + 1 + torch.rand(12, 2) * 60], 1).clamp(max=99.0)
    boxes[0] = torch.tensor([0.0, 0.0, 99.0, 79.0])  # the whole image: expansion runs past every edge
    boxes[1] = torch.tensor([50.0, 40.0, 50.4, 40.3])  # thinner than a pixel
    expected = paste_masks_in_image(masks, boxes, (80, 100))
    got = paste_masks(masks, boxes, (80, 100))
    assert got.shape == (12, 1, 80, 100)
    assert torch.equal(got, expected)
    assert paste_masks(masks[:0], boxes[:0], (80, 100)).shape == (0, 1, 80, 100)


def test_paste_masks_transform_postprocesses_like_torchvisions():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    torch.manual_seed(0)
    plain = GeneralizedRCNNTransform(96, 128, [0.5] * 3, [0.2] * 3, size_divisible=16).eval()
    fast = PasteMasksTransform.from_transform(plain)
    assert (fast.min_size, fast.max_size, fast.size_divisible) == ((96,), 128, 16)
    images = [torch.rand(3, 80, 100)]
    assert torch.equal(fast(images)[0].tensors, plain(images)[0].tensors)
    xy = torch.rand(6, 2) * 60
    result = {"boxes": torch.cat([xy, xy + 5 + torch.rand(6, 2) * 30], 1), "masks": torch.rand(6, 1, 28, 28),
              "keypoints": torch.rand(6, 17, 3) * 90}
    expected = plain.postprocess([dict(result)], [(96, 120)], [(80, 100)])[0]
    got = fast.postprocess([dict(result)], [(96, 120)], [(80, 100)])[0]
    for key in result:
        assert torch.equal(got[key], expected[key]), key


def test_gemm_mask_predictor_matches_the_convolutions():
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    torch.manual_seed(0)
    plain = MaskRCNNPredictor(16, 12, 5).eval()
    fast = GemmMaskRCNNPredictor.from_predictor(plain)
    assert [p is q for p, q in zip(fast.parameters(), plain.parameters())] == [True] * 4
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(6, 16, 14, 14)
    with torch.no_grad():
        expected, got = plain(x), fast(x)
        cl = fast(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = fast(x)
    assert got.shape == expected.shape == (6, 5, 28, 28)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (cl - expected).abs().max().item() <= 1e-5
    assert reduced.dtype == torch.float32
    # With gradients it runs the convolutions, so it still trains.
    assert torch.equal(fast.train()(x), plain.train()(x))
    # Anything else is left alone.
    assert not GemmMaskRCNNPredictor.supports(nn.Sequential(nn.Conv2d(16, 5, 1)))
    with pytest.raises(ValueError, match="is not a MaskRCNNPredictor"):
        GemmMaskRCNNPredictor.from_predictor(nn.Sequential(nn.Conv2d(16, 5, 1)))


def test_every_private_torchvision_helper_is_where_the_adapter_expects_it(monkeypatch):
    import importlib

    import detection._torchvision as adapter

    assert sorted(adapter.HELPERS) == sorted(adapter.__all__)
    for alias, (module, name) in adapter.HELPERS.items():
        assert callable(getattr(adapter, alias)), alias
        assert getattr(adapter, alias) is getattr(importlib.import_module(module), name), alias
    monkeypatch.setitem(adapter.HELPERS, "filter_input", ("torchvision.ops.poolers", "_moved_away"))
    with pytest.raises(ImportError, match=r"torchvision .* has no torchvision\.ops\.poolers\._moved_away, which "
                                          r"detection/_torchvision\.py imports as 'filter_input'"):
        adapter._load("filter_input")


def _nms_candidates(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=generator) * 300
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=generator) * 80], 1)
    return boxes, torch.rand(n, generator=generator), torch.randint(classes, (n,), generator=generator)


def test_batched_nms_top_k_keeps_what_torchvisions_batched_nms_keeps(monkeypatch):
    from torchvision.ops import batched_nms

    import detection.inference_modules as modules

    seen = []
    vanilla = modules.batched_nms_vanilla
    monkeypatch.setattr(modules, "batched_nms_vanilla", lambda b, *a: seen.append(len(b)) or vanilla(b, *a))
    boxes, scores, labels = _nms_candidates(6000, 40)
    expected = batched_nms(boxes, scores, labels, 0.5)
    for k in (1, 100, 300):
        assert torch.equal(batched_nms_top_k(boxes, scores, labels, 0.5, k), expected[:k]), k
    assert seen and max(seen) < 6000  # NMS ran on the top scores only
    # The top 1000 scores are copies of one box: the first rounds keep too few, the n doubles.
    boxes[scores.argsort(descending=True)[:1000]] = torch.tensor([10.0, 10.0, 60.0, 60.0])
    labels[scores.argsort(descending=True)[:1000]] = 3
    seen.clear()
    assert torch.equal(batched_nms_top_k(boxes, scores, labels, 0.5, 100), batched_nms(boxes, scores, labels, 0.5)[:100])
    assert len(seen) >= 2
    # Fewer boxes than torchvision's single-NMS bound, or than k ever kept: torchvision's own call.
    small = _nms_candidates(500, 5)
    assert torch.equal(batched_nms_top_k(*small, 0.5, 100), batched_nms(*small, 0.5)[:100])
    same = torch.tensor([[5.0, 5.0, 50.0, 50.0]]).repeat(3000, 1), torch.rand(3000), torch.zeros(3000, dtype=torch.int64)
    assert torch.equal(batched_nms_top_k(*same, 0.5, 100), batched_nms(*same, 0.5)[:100])
    empty = batched_nms_top_k(boxes[:0], scores[:0], labels[:0], 0.5, 100)
    assert empty.dtype == torch.int64 and len(empty) == 0


@pytest.mark.parametrize("score_thresh", [0.0, 0.05])
def test_top_k_roi_heads_postprocess_like_torchvisions(score_thresh):
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", backbone={"name": "resnet18", "fpn": {"out_channels": 32}}, num_classes=91,
                           box_score_thresh=score_thresh).eval()
    plain = model.roi_heads
    fast = TopKRoIHeads.from_roi_heads(plain)
    assert fast.box_predictor is plain.box_predictor and fast.nms_thresh == plain.nms_thresh
    fast.mask_predictor = nn.Identity()  # the submodule tables are the copy's own
    assert not isinstance(plain.mask_predictor, nn.Identity)
    proposals = []
    for _ in range(2):
        xy = torch.rand(400, 2) * 200
        proposals.append(torch.cat([xy, xy + 2 + torch.rand(400, 2) * 100], 1))
    class_logits, box_regression = torch.randn(800, 91) * 3, torch.randn(800, 91 * 4) * 0.2
    shapes = [(256, 256), (240, 300)]
    with torch.no_grad():
        expected = plain.postprocess_detections(class_logits, box_regression, proposals, shapes)
        got = fast.postprocess_detections(class_logits, box_regression, proposals, shapes)
    for e, g in zip(expected, got):
        assert [len(t) for t in g] == [len(t) for t in e] and len(e[0]) > 0
        for a, b in zip(e, g):
            assert torch.equal(a, b)


def test_onednn_linear_computes_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(48, 20)
    fast = OneDNNLinear.from_linear(plain)
    assert fast.weight is plain.weight and fast.bias is plain.bias
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(30, 48)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced, expected = fast(x), plain(x)
    assert reduced.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(reduced.float(), expected.float(), rtol=1e-2, atol=1e-2)
    # With gradients (and for other dtypes) it is nn.Linear's call, so it trains like one.
    fast(x).sum().backward()
    assert plain.weight.grad is not None and plain.weight.grad.abs().sum() > 0
    double = OneDNNLinear.from_linear(nn.Linear(48, 20).double())
    with torch.no_grad():
        assert torch.equal(double(x.double()), torch.nn.functional.linear(x.double(), double.weight, double.bias))
    no_bias = OneDNNLinear.from_linear(nn.Linear(48, 5, bias=False))
    with torch.no_grad():
        assert torch.allclose(no_bias(x), x @ no_bias.weight.t(), rtol=1e-5, atol=1e-6)
