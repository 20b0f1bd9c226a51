"""The backbone compiles and exports: TorchScript, torch.fx, torch.export, ONNX (onnxruntime), float64."""

import io

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from backbone import build_backbone

# torch deprecates TorchScript and the TorchScript-based ONNX exporter; both are still what users run.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

SCRIPT_CONFIGS = {
    "resnet18": dict(name="resnet18", fpn={"out_channels": 32}),
    "resnet50-caffe-os16-p6p7_c5-gn": dict(
        name="resnet50", base_channels=32, style="caffe", output_stride=16, fpn={"out_channels": 32, "extra": "p6p7_c5", "norm": "gn"}
    ),
    "resnext50-os8-p6p7_p5-bn": dict(
        name="resnext50_32x4d", base_channels=32, output_stride=8, out_features=("c3", "c4", "c5"),
        fpn={"out_channels": 32, "extra": "p6p7_p5", "norm": "bn"},
    ),
    "resnet18-c3c5-none-frozen_bn": dict(name="resnet18", norm="frozen_bn", out_features=("c3", "c5"), fpn={"out_channels": 16, "extra": "none"}),
    "resnet18-no-fpn-gn": dict(name="resnet18", norm="gn", fpn=False),
    "resnet18-c4-no-fpn": dict(name="resnet18", out_features=("c4",), fpn=False),
}


def small_input() -> torch.Tensor:
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def assert_same(expected: dict, actual: dict, atol: float = 0.0) -> None:
    assert list(actual) == list(expected)
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, name
        assert (actual[name] - ref).abs().max().item() <= atol, name


@pytest.mark.parametrize("config", list(SCRIPT_CONFIGS.values()), ids=list(SCRIPT_CONFIGS))
def test_torchscript_matches_eager(config):
    bb = build_backbone(config).eval()
    scripted = torch.jit.script(bb)
    x = small_input()
    with torch.no_grad():
        assert_same(bb(x), scripted(x), atol=1e-6)
    assert bb.out_channels == (config["fpn"]["out_channels"] if config["fpn"] else bb.body.feature_info[-1].channels)


def test_torchvision_detector_on_the_backbone_scripts():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    bb = build_backbone("resnet18", fpn={"out_channels": 16})
    names, strides = bb.feature_info.names(), bb.feature_info.strides()
    anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((1.0,),) * len(names))
    model = FasterRCNN(bb, num_classes=3, min_size=64, max_size=64, rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(list(names[:-1]), 7, 2)).eval()
    scripted = torch.jit.script(model)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        expected = model(images)[0]
        _, detections = scripted(images)
    assert expected["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(detections[0][key].float(), expected[key].float(), atol=1e-5), key


def test_torchscript_channels_last():
    bb = build_backbone("resnet18", fpn={"out_channels": 32}).eval()
    x = small_input()
    with torch.no_grad():
        expected = bb(x)
    bb.set_channels_last()
    scripted = torch.jit.script(bb)
    with torch.no_grad():
        out = scripted(x)
    assert out["p2"].is_contiguous(memory_format=torch.channels_last)
    assert_same(expected, out, atol=1e-4)


def test_torchscript_with_checkpoint_stages_runs_them_without_checkpointing():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", norm="gn", checkpoint_stages=("c2", "c3"), fpn={"out_channels": 32}).train()
    scripted = torch.jit.script(bb)
    x = small_input()
    expected = bb(x)
    out = scripted(x)
    assert_same({k: v.detach() for k, v in expected.items()}, {k: v.detach() for k, v in out.items()}, atol=1e-6)
    sum(v.sum() for v in out.values()).backward()
    assert bb.body.layer1[0].conv1.weight.grad is not None


def test_fx_trace_then_torchscript():
    bb = build_backbone("resnet18", norm="frozen_bn", fpn={"out_channels": 32}).eval()
    traced = torch.fx.symbolic_trace(bb)
    assert "torch._assert" in traced.code, "the FPN's input checks are part of the traced graph"
    scripted = torch.jit.script(traced)
    x = small_input()
    with torch.no_grad():
        expected = bb(x)
        assert_same(expected, traced(x))
        assert_same(expected, scripted(x), atol=1e-6)


def test_create_feature_extractor_returns_body_levels_and_the_pyramid():
    bb = build_backbone("resnet18", fpn={"out_channels": 32, "extra": "p6p7_p5"}, out_features=("c3", "c4", "c5")).eval()
    extractor = create_feature_extractor(bb, {"body.layer2": "c3", "body.layer4": "c5", "fpn": "pyramid"})
    x = small_input()
    with torch.no_grad():
        features = extractor(x)
        body = bb.body(x)
        pyramid = bb(x)
    assert list(features) == ["c3", "c5", "pyramid"]
    assert torch.equal(features["c3"], body["c3"]) and torch.equal(features["c5"], body["c5"])
    assert_same(pyramid, features["pyramid"])
    scripted = torch.jit.script(extractor)
    with torch.no_grad():
        assert_same(pyramid, scripted(x)["pyramid"], atol=1e-6)


def test_torch_export_matches_eager():
    bb = build_backbone("resnet18", norm="frozen_bn", fpn={"out_channels": 32, "extra": "p6p7_c5"}, out_features=("c3", "c4", "c5")).eval()
    x = small_input()
    program = torch.export.export(bb, (x,))
    with torch.no_grad():
        assert_same(bb(x), program.module()(x), atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_like_eager():
    ort = pytest.importorskip("onnxruntime")
    bb = build_backbone("resnet18", norm="frozen_bn", fpn={"out_channels": 32}).eval()
    x = small_input()
    with torch.no_grad():
        expected = bb(x)
    buffer = io.BytesIO()
    torch.onnx.export(bb, (x,), buffer, dynamo=False, input_names=["images"], output_names=list(expected))
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(expected)
    assert_same(expected, {k: torch.from_numpy(v) for k, v in zip(expected, outputs)}, atol=1e-4)


def test_float64():
    bb = build_backbone("resnet18", norm="frozen_bn", fpn={"out_channels": 32}).eval()
    x = small_input()
    with torch.no_grad():
        expected = bb(x)
        out = bb.double()(x.double())
    assert all(t.dtype == torch.float64 for t in out.values())
    assert_same(expected, {k: v.float() for k, v in out.items()}, atol=1e-4)


def test_torch_compile_captures_one_graph():
    bb = build_backbone("resnet18", norm="frozen_bn", fpn={"out_channels": 32}).eval()
    compiled = torch.compile(bb, backend="aot_eager", fullgraph=True)
    x = small_input()
    with torch.no_grad():
        assert_same(bb(x), compiled(x), atol=1e-5)
