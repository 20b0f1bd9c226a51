"""Deformable convs (DCNv2) in the ResNet stages: the module, the body, config, freezing, weights and export."""

import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from backbone import BackboneConfig, ModulatedDeformConv2d, build_backbone
from backbone.deform import offset_state_keys
from backbone.resnet import ResNetBody
from backbone.weights import WeightsError, load_state_dict_checked

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

DCN = ("c3", "c4", "c5")
# A bottleneck body small enough for CPU tests: resnet50's layout at a quarter of its width.
SMALL = {"name": "resnet50", "base_channels": 16, "fpn": {"out_channels": 16}}


def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def saturate_mask(body: nn.Module) -> None:
    """Mask logits of +30 (sigmoid = 1 to float precision) with zero offsets: every DCN becomes its plain conv."""
    for m in body.modules():
        if isinstance(m, ModulatedDeformConv2d):
            taps = m.kernel_size[0] * m.kernel_size[1] * m.offset_groups
            m.conv_offset.bias.data[2 * taps :] = 30.0


@pytest.mark.parametrize(
    "stride, dilation, groups, dtype",
    [(1, 1, 1, torch.float32), (2, 1, 1, torch.float32), (1, 2, 1, torch.float32), (2, 1, 4, torch.float32), (1, 2, 4, torch.float64)],
)
def test_initialised_module_is_half_the_plain_conv_and_the_plain_conv_at_mask_one(stride, dilation, groups, dtype):
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(8, 12, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups).to(dtype)
    x = rand(2, 8, 11, 10, dtype=dtype)
    plain = F.conv2d(x, conv.weight, stride=stride, padding=dilation, dilation=dilation, groups=groups)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        out = conv(x)
        assert out.dtype == dtype and out.shape == plain.shape
        # detectron2 and mmcv start from zero offsets and mask sigmoid(0) = 0.5.
        assert (out - 0.5 * plain).abs().max().item() <= tol
        saturate_mask(conv)
        assert (conv(x) - plain).abs().max().item() <= tol


def test_offset_channels_are_dy_dx_pairs_per_tap():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(4, 4, 3, padding=1)
    saturate_mask(conv)
    conv.conv_offset.bias.data[1:18:2] = 1.0  # every tap's dx: sample one pixel to the right
    x = rand(1, 4, 7, 9)
    with torch.no_grad():
        out = conv(x)
        plain = F.conv2d(x, conv.weight, padding=1)
    assert (out[..., :-1] - plain[..., 1:]).abs().max().item() <= 1e-5


def test_only_the_named_stages_get_deformable_3x3_convs_with_their_stride_dilation_and_groups():
    bb = build_backbone(name="resnext50_32x4d", base_channels=16, style="caffe", output_stride=16, dcn_stages=("c3", "c5"), fpn=False)
    body = bb.body
    for layer, deform in ((body.layer1, False), (body.layer2, True), (body.layer3, False), (body.layer4, True)):
        for block in layer:
            assert isinstance(block.conv2, ModulatedDeformConv2d) == deform
            assert type(block.conv1) is nn.Conv2d and type(block.conv3) is nn.Conv2d
    first = body.layer2[0].conv2
    assert (first.stride, first.dilation, first.groups) == ((1, 1), (1, 1), 32)  # caffe: the stride is in conv1
    dilated = body.layer4[1].conv2
    assert (dilated.stride, dilated.dilation, dilated.padding) == ((1, 1), (2, 2), (2, 2))
    assert dilated.conv_offset.dilation == (2, 2) and dilated.conv_offset.out_channels == 27
    assert all(m.conv_offset.weight.abs().sum() == 0 for m in body.modules() if isinstance(m, ModulatedDeformConv2d))


def test_body_with_saturated_masks_equals_the_plain_body_in_float64():
    torch.manual_seed(0)
    options = dict(name="resnext50_32x4d", base_channels=16, output_stride=16, norm="frozen_bn", fpn=False)
    plain = build_backbone(options).eval().double()
    dcn = build_backbone(options, dcn_stages=DCN).eval().double()
    new = load_state_dict_checked(dcn.body, plain.body.state_dict(), source="plain body", new_keys=offset_state_keys(dcn.body))
    assert new == offset_state_keys(dcn.body) and len(new) == 2 * (4 + 6 + 3)
    saturate_mask(dcn)
    x = rand(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        expected, got = plain(x), dcn(x)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float64
        assert (got[name] - expected[name]).abs().max().item() <= 1e-9, name


def test_contract_unchanged_and_gradients_reach_the_offsets():
    torch.manual_seed(0)
    plain, dcn = build_backbone(SMALL), build_backbone(SMALL, dcn_stages=DCN)
    assert dcn.feature_info == plain.feature_info and dcn.body.feature_info == plain.body.feature_info
    assert dcn.out_channels == plain.out_channels and dcn.output_shape() == plain.output_shape()
    assert set(dcn.state_dict()) == set(plain.state_dict()) | {f"body.{k}" for k in offset_state_keys(dcn.body)}
    x = rand(1, 3, 64, 48)
    out = dcn.train()(x)
    with torch.no_grad():
        assert [tuple(v.shape) for v in out.values()] == [tuple(v.shape) for v in plain(x).values()]
    sum(v.square().mean() for v in out.values()).backward()
    for layer in (dcn.body.layer2, dcn.body.layer3, dcn.body.layer4):
        for block in layer:
            assert block.conv2.weight.grad.abs().sum() > 0
            assert block.conv2.conv_offset.weight.grad.abs().sum() > 0
            assert block.conv2.conv_offset.bias.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:trainable_stages=2 without weights:UserWarning")
def test_frozen_stages_freeze_their_offset_convs_with_a_warning():
    message = "dcn_stages ['c3'] lie in stages frozen by trainable_stages=2, so their offset convs never train"
    with pytest.warns(UserWarning, match=re.escape(message)):
        bb = build_backbone(SMALL, dcn_stages=DCN, trainable_stages=2)
    offsets = {level: [m.conv2.conv_offset for m in layer] for level, layer in zip(DCN, (bb.body.layer2, bb.body.layer3, bb.body.layer4))}
    assert all(not p.requires_grad for m in offsets["c3"] for p in m.parameters())
    assert all(p.requires_grad for level in ("c4", "c5") for m in offsets[level] for p in m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone(SMALL, dcn_stages=("c4", "c5"), trainable_stages=5)


@pytest.fixture(scope="module")
def resnet50_imagenet_file(tmp_path_factory: pytest.TempPathFactory):
    """A torchvision resnet50 state dict (random init, with ``fc``), saved locally."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("weights") / "resnet50-local.pth"
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_weights_load_and_offsets_are_reported_as_new_keys(resnet50_imagenet_file):
    expected = (
        f"{resnet50_imagenet_file}: 26 new key(s) not in the checkpoint, the deformable-conv offsets of dcn_stages, "
        "initialised to zero (plain 3x3 sampling, mask 0.5): layer2.0.conv2.conv_offset.weight, layer2.0.conv2.conv_offset.bias, "
    )
    with pytest.warns(UserWarning, match=re.escape(expected)):
        bb = build_backbone("resnet50", weights=str(resnet50_imagenet_file), dcn_stages=DCN, fpn=False)
    state = torch.load(resnet50_imagenet_file, weights_only=True)
    body = bb.body
    assert torch.equal(body.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert torch.equal(body.layer2[0].bn2.running_mean, state["layer2.0.bn2.running_mean"])
    assert isinstance(body.layer3[2].conv2, ModulatedDeformConv2d)
    assert body.layer3[2].conv2.conv_offset.weight.abs().sum() == 0


def test_checkpoint_mismatches_other_than_new_offsets_still_fail():
    plain = ResNetBody("bottleneck", (1, 1, 1, 1), base_channels=16)
    dcn = ResNetBody("bottleneck", (1, 1, 1, 1), base_channels=16, dcn_stages=("c5",))
    with pytest.raises(WeightsError, match=re.escape("2 unexpected key(s), first: ['layer4.0.conv2.conv_offset.weight'")):
        load_state_dict_checked(plain, dcn.state_dict(), source="dcn body")
    with pytest.raises(WeightsError, match=re.escape("2 missing key(s), first: ['layer4.0.conv2.conv_offset.weight'")):
        load_state_dict_checked(dcn, plain.state_dict(), source="plain body")  # detector checkpoints allow no new keys


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"name": "resnet18", "dcn_stages": ["c4"]}, ValueError,
         "dcn_stages=['c4']: deformable convs replace the 3x3 conv of bottleneck blocks, but resnet18 is built from "
         "basic blocks; use a bottleneck ResNet (resnet50 and up, resnext*, wide_resnet*) or set dcn_stages: []"),
        ({"dcn_stages": ["c3", "c6"]}, ValueError, "dcn_stages has unknown level(s) ['c6']; the ResNet body produces"),
        ({"dcn_stages": ["c5", "c4"]}, ValueError, "dcn_stages must list distinct levels in increasing order, got ['c5', 'c4']"),
        ({"dcn_stages": ["c5"], "out_features": ["c2", "c3", "c4"]}, ValueError,
         "dcn_stages names ['c5'], but out_features ['c2', 'c3', 'c4'] ends at 'c4', so those stages are not built"),
        ({"dcn_stage": ["c5"]}, TypeError, "unknown backbone option(s) ['dcn_stage'] (did you mean 'dcn_stages'?)"),
    ],
)
def test_config_errors(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        BackboneConfig.from_mapping(options)


def test_config_direct_string_and_module_level_checks():
    with pytest.raises(TypeError, match=re.escape("dcn_stages must be a list of level names such as ['c3', 'c4', 'c5'], got the string 'c5'")):
        BackboneConfig(dcn_stages="c5")
    assert BackboneConfig.from_mapping({"dcn_stages": "c5"}).dcn_stages == ("c5",)
    assert BackboneConfig.from_mapping({"dcn_stages": ["c3", "c4", "c5"]}).dcn_stages == DCN
    with pytest.raises(ValueError, match=re.escape("but this body is built from basic blocks")):
        ResNetBody("basic", (1, 1, 1, 1), dcn_stages=("c3",))


def test_experiment_config_reads_model_backbone_dcn_stages(tmp_path):
    from detection.config import ConfigError, load_config

    path = tmp_path / "dcn.yaml"
    path.write_text("model:\n  backbone:\n    dcn_stages: [c3, c4, c5]\n")
    assert load_config(path).model.backbone.dcn_stages == DCN
    assert load_config(None, ["model.backbone.dcn_stages=[c5]"]).model.backbone.dcn_stages == ("c5",)
    with pytest.raises(ConfigError, match=re.escape("dcn_stages=['c5']: deformable convs replace the 3x3 conv")):
        load_config(path, ["model.backbone.name=resnet34", "model.backbone.dcn_stages=[c5]"])


def test_torchscript_and_fx_match_eager_and_onnx_export_is_refused():
    torch.manual_seed(0)
    bb = build_backbone(SMALL, dcn_stages=DCN, norm="frozen_bn").eval()
    for m in bb.modules():  # non-zero offsets and masks, so the compiled paths are exercised for real
        if isinstance(m, ModulatedDeformConv2d):
            nn.init.normal_(m.conv_offset.weight, std=0.05)
    x = rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = bb(x)
        for compiled in (torch.jit.script(bb), torch.fx.symbolic_trace(bb)):
            got = compiled(x)
            assert all((got[k] - v).abs().max().item() <= 1e-5 for k, v in expected.items())
    message = "backbone dcn_stages: ModulatedDeformConv2d cannot be exported to ONNX"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.onnx.export(bb, (x,), io.BytesIO(), dynamo=False)


def test_cpu_bf16_autocast_runs_in_float32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(8, 8, 3, padding=1)
    nn.init.normal_(conv.conv_offset.weight, std=0.1)
    x = rand(1, 8, 9, 9)
    with torch.no_grad():
        expected = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = conv(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_mask_rcnn_with_deformable_stages_trains_one_step():
    from detection import build_detector

    torch.manual_seed(0)
    model = build_detector(
        "mask_rcnn",
        backbone={**SMALL, "dcn_stages": ["c4", "c5"], "trainable_stages": 5},
        num_classes=3, min_size=96, max_size=96, rpn_post_nms_top_n_train=50, box_batch_size_per_image=16,
        box_head_dim=32, mask_head_channels=(16,),
    ).train()
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[0, 20:70, 10:60] = 1
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1]), "masks": masks}]
    offset = model.backbone.body.layer4[0].conv2.conv_offset
    before = offset.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model([rand(3, 96, 96)], targets)
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert offset.weight.grad.abs().sum() > 0 and not torch.equal(offset.weight, before)
