"""The FPN: declared p-levels equal real outputs, torchvision parity, extra levels, norms, legacy keys."""

import re

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from backbone import FPN, FeatureInfo, build_backbone


def assert_contract(module, x):
    out = module(x)
    assert list(out) == list(module.feature_info.names())
    for (name, channels, stride), t in zip(module.feature_info, out.values()):
        assert t.shape[1] == channels, name
        assert t.shape[-2:] == (-(-x.shape[-2] // stride), -(-x.shape[-1] // stride)), (name, tuple(t.shape), stride)
    return out


@pytest.mark.parametrize(
    ("out_features", "extra", "names", "strides"),
    [
        (("c2", "c3", "c4", "c5"), "maxpool", ("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64)),
        (("c2", "c3", "c4", "c5"), "none", ("p2", "p3", "p4", "p5"), (4, 8, 16, 32)),
        (("c3", "c4", "c5"), "p6p7_c5", ("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128)),
        (("c3", "c4", "c5"), "p6p7_p5", ("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128)),
        (("c3", "c4"), "maxpool", ("p3", "p4", "p5"), (8, 16, 32)),
    ],
)
def test_declared_levels_equal_outputs(out_features, extra, names, strides):
    bb = build_backbone("resnet18", out_features=out_features, fpn={"extra": extra, "out_channels": 64}).eval()
    assert bb.feature_info.names() == names and bb.feature_info.reduction() == strides
    assert bb.out_channels == 64 and bb.feature_info.channels() == (64,) * len(names)
    with torch.no_grad():
        assert_contract(bb, torch.randn(1, 3, 128, 160))


def test_odd_input_sizes_work():
    bb = build_backbone("resnet18", fpn={"out_channels": 32}).eval()
    with torch.no_grad():
        assert_contract(bb, torch.randn(1, 3, 97, 65))


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_norm_inside_the_fpn(norm):
    bb = build_backbone("resnet18", fpn={"norm": norm, "out_channels": 64}).eval()
    cls = nn.BatchNorm2d if norm == "bn" else nn.GroupNorm
    assert isinstance(bb.fpn.inner_blocks[0][1], cls) and isinstance(bb.fpn.layer_blocks[3][1], cls)
    assert bb.fpn.inner_blocks[0][0].bias is None, "a conv followed by a norm needs no bias"
    with torch.no_grad():
        assert_contract(bb, torch.randn(1, 3, 64, 64))


def test_gn_fpn_width_must_divide_into_groups():
    with pytest.raises(ValueError, match=re.escape("fpn.out_channels must be a multiple of 32; got 48")):
        build_backbone("resnet18", fpn={"norm": "gn", "out_channels": 48})


def randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_matches_torchvision_resnet_fpn_backbone(name):
    torch.manual_seed(0)
    tv = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    randomise_bn(tv)
    ours = build_backbone(name)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a = tv.eval()(x)
        b = ours.eval()(x)
    assert list(a) == ["0", "1", "2", "3", "pool"] and list(b) == ["p2", "p3", "p4", "p5", "p6"]
    for ta, tb in zip(a.values(), b.values()):
        assert ta.shape == tb.shape
        assert (ta - tb).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("in_ch", "extra"), [(256, "p6p7_p5"), (512, "p6p7_c5")])
def test_matches_torchvision_p6p7(in_ch, extra):
    import torchvision

    torch.manual_seed(0)
    body = torchvision.models.resnet18()
    tv = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(in_ch, 256))
    ours = build_backbone("resnet18", out_features=("c3", "c4", "c5"), fpn={"extra": extra})
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = tv.eval()(x), ours.eval()(x)
    assert list(b) == ["p3", "p4", "p5", "p6", "p7"]
    for ta, tb in zip(a.values(), b.values()):
        assert (ta - tb).abs().max().item() <= 1e-5


def test_legacy_torchvision_fpn_keys_are_renamed_on_load():
    fpn = FPN(FeatureInfo([("c4", 32, 16), ("c5", 64, 32)]), 16, extra="maxpool")
    legacy = {}
    for k, v in fpn.state_dict().items():
        legacy[re.sub(r"^(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"\1.\2.", k)] = v.clone() + 1
    assert "inner_blocks.0.weight" in legacy
    fresh = FPN(FeatureInfo([("c4", 32, 16), ("c5", 64, 32)]), 16)
    fresh.load_state_dict(legacy, strict=True)
    assert torch.equal(fresh.inner_blocks[0][0].weight, fpn.inner_blocks[0][0].weight + 1)


def test_wrong_input_channels_name_the_level():
    fpn = FPN(FeatureInfo([("c4", 32, 16), ("c5", 64, 32)]), 16)
    message = "FPN input 'c5' should be [N, 64, H, W] as declared when the FPN was built"
    with pytest.raises(AssertionError, match=re.escape(message)):
        fpn({"c4": torch.randn(1, 32, 4, 4), "c5": torch.randn(1, 63, 2, 2)})
    with pytest.raises(AssertionError, match=re.escape(message)):
        fpn({"c4": torch.randn(1, 32, 4, 4), "c5": torch.randn(64, 2, 2)})
    with pytest.raises(KeyError, match=re.escape("FPN input lacks 'c5'; it received ['c4']")):
        fpn({"c4": torch.randn(1, 32, 4, 4)})


def test_p6p7_from_c5_needs_c5():
    with pytest.raises(ValueError, match=re.escape("fpn.extra='p6p7_c5' computes P6 from C5, so out_features must end with 'c5'")):
        build_backbone("resnet18", out_features=("c3", "c4"), fpn={"extra": "p6p7_c5"})


@pytest.mark.parametrize(("extra", "source"), [("p6p7_c5", "c5"), ("p6p7_p5", "p5")])
def test_p6_comes_from_the_named_level_even_when_c5_is_as_wide_as_the_fpn(extra, source):
    # A half-width ResNet-18 has a 256-channel C5: torchvision would infer "from P5" from the widths.
    bb = build_backbone("resnet18", base_channels=32, out_features=("c3", "c4", "c5"), fpn={"extra": extra}).eval()
    assert bb.body.out_channels == bb.out_channels == 256
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        c5 = bb.body(x)["c5"]
        out = bb(x)
        expected = bb.fpn.extra_blocks.p6(c5 if source == "c5" else out["p5"])
    assert torch.equal(out["p6"], expected)
