"""Export and precision of the detectors: TorchScript for every arch, ONNX (Mask R-CNN in onnxruntime),
float64 end to end, float32 outputs under bf16 autocast, and the head modules on their own."""

import io
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detection import ARCHS, build_detector
from detection.heads import (
    Float32AnchorGenerator,
    Float32FastRCNNPredictor,
    Float32FCOSHead,
    Float32KeypointRCNNPredictor,
    Float32MaskRCNNPredictor,
    Float32RetinaNetHead,
    Float32RPNHead,
)

WIDTH = 64  # RetinaNet v2's GroupNorm(32) needs at least 2 channels per group on the 1x1 P7 map


def few_detections(arch: str) -> dict:
    if ARCHS[arch].family == "rcnn":
        return {"box_score_thresh": 0.0, "box_detections_per_img": 10, "rpn_pre_nms_top_n_test": 200,
                "rpn_post_nms_top_n_test": 50}
    return {"score_thresh": 0.0, "detections_per_img": 10}


def tiny(arch: str, backbone="ours", size: int = 128) -> nn.Module:
    torch.manual_seed(0)
    if backbone == "ours":
        backbone = {"name": "resnet18", "fpn": {"out_channels": WIDTH}}
    return build_detector(arch, backbone=backbone, num_classes=3, min_size=size, max_size=size, **few_detections(arch)).eval()


def torchvision_backbone(arch: str) -> nn.Module:
    """torchvision's (scriptable) ResNet-18 FPN with the levels of ``arch``."""
    if ARCHS[arch].family == "rcnn":
        layers, extra = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, LastLevelMaxPool()
    else:
        layers, extra = {"layer2": "0", "layer3": "1", "layer4": "2"}, LastLevelP6P7(WIDTH, WIDTH)
    channels = [{"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}[name] for name in layers]
    return BackboneWithFPN(resnet18(), layers, channels, WIDTH, extra)


def assert_same_detections(got: dict, expected: dict, atol: float = 1e-4) -> None:
    assert set(got) == set(expected)
    assert len(expected["boxes"]) > 0
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert (got[key].double() - value.double()).abs().max().item() <= atol, key


def scripted_matches_eager(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; torchvision's detectors still script
        scripted = torch.jit.script(model)
    images = [torch.rand(3, 128, 112)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RCNN always returns a (Losses, Detections) tuple in scripting"
        expected = model(images)[0]
        losses, detections = scripted(images)  # torchvision's scripted detectors return (losses, detections)
    assert losses == {}
    assert_same_detections(detections[0], expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_detector_scripts_and_matches_eager(arch):
    scripted_matches_eager(tiny(arch))


@pytest.mark.parametrize("arch", ["mask_rcnn_v2", "keypoint_rcnn", "retinanet_v2", "fcos"])
def test_detectors_on_a_torchvision_backbone_script(arch):
    """The anchor generator, heads and poolers that build_detector adds compile (every head class, both
    v2 recipes), whatever the backbone."""
    scripted_matches_eager(tiny(arch, backbone=torchvision_backbone(arch)))


def test_mask_rcnn_exports_to_onnx_and_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    model = tiny("mask_rcnn")
    image = torch.rand(3, 128, 128)  # exported for this fixed size, as torchvision's ONNX tests do
    with torch.no_grad():
        expected = model([image])[0]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in torchvision's code
        torch.onnx.export(model, ([image],), buffer, dynamo=False, opset_version=11, do_constant_folding=True,
                          input_names=["image"], output_names=["boxes", "labels", "scores", "masks"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    boxes, labels, scores, masks = session.run(None, {"image": image.numpy()})
    assert len(expected["boxes"]) > 0
    assert boxes.shape == tuple(expected["boxes"].shape) and masks.shape == tuple(expected["masks"].shape)
    assert (torch.from_numpy(boxes) - expected["boxes"]).abs().max().item() <= 1e-2
    assert (torch.from_numpy(scores) - expected["scores"]).abs().max().item() <= 1e-4
    assert torch.equal(torch.from_numpy(labels), expected["labels"])


@pytest.mark.parametrize("arch", ["mask_rcnn", "keypoint_rcnn", "retinanet", "fcos"])
def test_double_runs_in_float64_end_to_end(arch):
    model = tiny(arch, size=64).double()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64, dtype=torch.float64)])[0]
    assert len(out["boxes"]) > 0
    # keypoints stay float32: torchvision's heatmap decoding allocates them so
    for key in {"boxes", "scores", "masks"} & set(out):
        assert out[key].dtype == torch.float64, key


@pytest.mark.parametrize("arch", ["mask_rcnn_v2", "keypoint_rcnn", "retinanet", "fcos"])
def test_bf16_autocast_on_cpu_returns_float32(arch):
    model = tiny(arch, size=64)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, out: seen.append(next(iter(out.values())).dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 64, 64)])[0]
    assert seen == [torch.bfloat16]
    assert len(out["boxes"]) > 0
    for key in {"boxes", "scores", "masks", "keypoints"} & set(out):
        assert out[key].dtype == torch.float32, key


def test_a_detector_assembled_from_our_heads_decodes_in_float32():
    """The float32 outputs come with the modules, not with build_detector."""
    torch.manual_seed(0)
    backbone = torchvision_backbone("faster_rcnn")
    model = FasterRCNN(
        backbone, num_classes=None, min_size=64, max_size=64, box_score_thresh=0.0,
        rpn_anchor_generator=Float32AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5),
        rpn_head=Float32RPNHead(WIDTH, 3), box_predictor=Float32FastRCNNPredictor(1024, 3),
    ).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 64, 64)])[0]
    assert len(out["boxes"]) > 0
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32


def test_build_detector_uses_our_heads_for_every_arch():
    for arch, spec in ARCHS.items():
        model = tiny(arch)
        if spec.family == "rcnn":
            heads = [model.rpn.anchor_generator, model.rpn.head, model.roi_heads.box_predictor]
            heads += [model.roi_heads.mask_predictor] if spec.masks else []
            heads += [model.roi_heads.keypoint_predictor] if spec.keypoints else []
            assert len(model.rpn.head.conv) == (2 if spec.v2 else 1), arch
        else:
            heads = [model.anchor_generator, model.head]
        assert all(type(h).__name__.startswith("Float32") for h in heads), arch
        assert "Float32" in repr(model)


def head_cases():
    features = [torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)]
    return [
        (Float32RPNHead(32, 3, conv_depth=2), (features,)),
        (Float32FastRCNNPredictor(64, 4), (torch.randn(5, 64),)),
        (Float32MaskRCNNPredictor(32, 16, 4), (torch.randn(2, 32, 14, 14),)),
        (Float32KeypointRCNNPredictor(32, 17), (torch.randn(2, 32, 14, 14),)),
        (Float32RetinaNetHead(32, 9, 4), (features,)),
        (Float32FCOSHead(32, 1, 4), (features,)),
        (Float32AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2), (ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), features)),
    ]


def flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat(v)]
    return [t for v in value for t in flat(v)]


@pytest.mark.parametrize("case", range(7))
def test_head_module_scripts_and_casts_only_reduced_precision(case):
    module, inputs = head_cases()[case]
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
    with torch.no_grad():
        for got, expected in zip(flat(scripted(*inputs)), flat(module(*inputs))):
            assert torch.equal(got, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert all(t.dtype == torch.float32 for t in flat(module(*inputs)))
        module.double()
        doubled = [t.double() if isinstance(t, torch.Tensor) else [f.double() for f in t] for t in inputs[-1:]]
        assert all(t.dtype == torch.float64 for t in flat(module(*inputs[:-1], *doubled)))


def test_heads_export_and_compile():
    head = Float32RetinaNetHead(32, 9, 4).eval()
    features = [torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)]
    with torch.no_grad():
        expected = head(features)
        exported = torch.export.export(head, (features,)).module()
        compiled = torch.compile(head, backend="eager", fullgraph=True)
        for out in (exported(features), compiled(features)):
            assert all(torch.equal(out[k], expected[k]) for k in expected)
