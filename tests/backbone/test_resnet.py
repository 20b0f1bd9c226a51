"""The ResNet body: declared metadata equals real outputs, torchvision parity, freezing, options."""

import re

import pytest
import torch
import torchvision
from torch import nn

from backbone import ARCHITECTURES, FrozenBatchNorm2d, ResNetBody, build_backbone

ALL_NAMES = list(ARCHITECTURES)
FROZEN_RANDOM_STAGES = "ignore:trainable_stages=.* without weights freezes randomly initialised stages:UserWarning"


def assert_contract(module: nn.Module, x: torch.Tensor) -> dict:
    """The declared feature_info equals the real outputs: names, order, channels and strides."""
    out = module(x)
    info = module.feature_info
    assert list(out) == list(info.names())
    for (name, channels, stride), t in zip(info, out.values()):
        assert t.shape[1] == channels, name
        assert t.shape[-2] == -(-x.shape[-2] // stride), (name, t.shape, stride)
        assert t.shape[-1] == -(-x.shape[-1] // stride), (name, t.shape, stride)
    return out


def tv_stages(tv: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    outs = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        y = layer(y)
        outs.append(y)
    return outs


@pytest.mark.parametrize("name", ALL_NAMES)
def test_torchvision_state_dict_loads_strictly_and_outputs_match(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    tv.eval()
    ours = build_backbone(name, fpn=False).eval()
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours.body.load_state_dict(state, strict=True)
    # Parameter counts equal torchvision's model without its classifier.
    tv_params = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == tv_params
    size = 64 if ARCHITECTURES[name].layers[2] > 6 else 96
    x = torch.randn(1, 3, size, size + 32)
    with torch.no_grad():
        out = assert_contract(ours, x)
        expected = tv_stages(tv, x)
    for level, ref in zip(("c2", "c3", "c4", "c5"), expected):
        assert (out[level] - ref).abs().max().item() <= 1e-5, level


@pytest.mark.parametrize(
    "out_features", [("c2",), ("c3",), ("c2", "c4"), ("c3", "c4", "c5"), ("c4",), ("c2", "c3", "c4", "c5"), ("c5",)]
)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_contract_for_every_out_features_subset(name, out_features):
    body = build_backbone(name, fpn=False, out_features=out_features).body.eval()
    assert body.feature_info.names() == out_features
    with torch.no_grad():
        assert_contract(body, torch.randn(1, 3, 64, 96))
    last = int(out_features[-1][1]) - 1  # c4 -> layer3
    assert hasattr(body, f"layer{last}")
    assert not hasattr(body, f"layer{last + 1}"), "stages after the last requested one must not be built"


def test_expected_channels_and_strides():
    assert build_backbone("resnet18", fpn=False).feature_info.channels() == (64, 128, 256, 512)
    info = build_backbone("resnet50", fpn=False).feature_info
    assert info.channels() == (256, 512, 1024, 2048) and info.reduction() == (4, 8, 16, 32)
    assert build_backbone("wide_resnet50_2", fpn=False).feature_info.channels() == (256, 512, 1024, 2048)


@pytest.mark.parametrize(("output_stride", "strides"), [(16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dilation(name, output_stride, strides):
    body = build_backbone(name, fpn=False, output_stride=output_stride).body.eval()
    assert body.feature_info.reduction() == strides
    with torch.no_grad():
        assert_contract(body, torch.randn(1, 3, 64, 64))
    dilated = body.layer4[-1].conv2 if name == "resnet50" else body.layer4[-1].conv1
    assert dilated.dilation == ((2, 2) if output_stride == 16 else (4, 4))


def test_dilated_weights_still_load_from_torchvision():
    tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    ours = build_backbone("resnet50", fpn=False, output_stride=16).eval()
    ours.body.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x)["c5"] - tv_stages(tv, x)[3]).abs().max() <= 1e-5


def test_caffe_style_moves_the_stride_into_the_first_1x1():
    pt = build_backbone("resnet50", fpn=False).body
    caffe = build_backbone("resnet50", fpn=False, style="caffe").body
    assert pt.layer2[0].conv1.stride == (1, 1) and pt.layer2[0].conv2.stride == (2, 2)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    assert caffe.layer2[0].downsample[0].stride == (2, 2)
    # Same parameter names and shapes: caffe-style checkpoints load without conversion.
    assert {k: v.shape for k, v in pt.state_dict().items()} == {k: v.shape for k, v in caffe.state_dict().items()}
    with torch.no_grad():
        assert_contract(caffe.eval(), torch.randn(1, 3, 64, 64))


def test_caffe_style_rejected_for_basic_blocks():
    with pytest.raises(ValueError, match=re.escape("style='caffe' moves the stride into the first 1x1 conv of bottleneck")):
        build_backbone("resnet18", style="caffe")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_projection_shortcut_wherever_stride_or_width_changes(name):
    body = build_backbone(name, fpn=False).body
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in layer:
            in_ch = block.conv1.in_channels
            stride = max(block.conv1.stride[0], block.conv2.stride[0])
            needs = stride != 1 or in_ch != block.out_channels
            assert (block.downsample is not None) == needs
            if needs:
                conv = block.downsample[0]
                assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)


@pytest.mark.parametrize(("name", "norm_attr"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual(name, norm_attr):
    body = build_backbone(name, fpn=False, zero_init_residual=True).body
    for layer in (body.layer1, body.layer4):
        for block in layer:
            assert torch.count_nonzero(getattr(block, norm_attr).weight) == 0
    assert torch.count_nonzero(body.layer1[0].bn1.weight) > 0


def frozen_modules(body: ResNetBody) -> dict[str, bool]:
    parts = {"stem": [body.conv1, body.bn1], "c2": [body.layer1], "c3": [body.layer2], "c4": [body.layer3], "c5": [body.layer4]}
    return {name: all(not p.requires_grad for m in mods for p in m.parameters()) for name, mods in parts.items()}


@pytest.mark.parametrize(
    ("trainable", "frozen"),
    [
        (0, {"stem", "c2", "c3", "c4", "c5"}),
        (1, {"stem", "c2", "c3", "c4"}),
        (3, {"stem", "c2"}),
        (4, {"stem"}),
        (5, set()),
    ],
)
@pytest.mark.filterwarnings(FROZEN_RANDOM_STAGES)
def test_trainable_stages_torchvision_semantics(trainable, frozen):
    body = build_backbone("resnet18", fpn=False, norm="bn", trainable_stages=trainable).body
    state = frozen_modules(body)
    assert {k for k, v in state.items() if v} == frozen
    # torchvision's own rule, applied by parameter-name prefix, gives the same set.
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for name, p in body.named_parameters():
        assert p.requires_grad == any(name.startswith(layer) for layer in layers_to_train), name


@pytest.mark.filterwarnings(FROZEN_RANDOM_STAGES)
def test_frozen_bn_stays_in_eval_after_every_train_call():
    body = build_backbone("resnet18", fpn=False, norm="bn", trainable_stages=2).body
    for _ in range(2):
        body.eval()
        body.train()
        for m in [body.bn1, *body.layer1.modules(), *body.layer2.modules()]:
            if isinstance(m, nn.BatchNorm2d):
                assert not m.training
        assert body.layer3[0].bn1.training and body.layer4[0].bn1.training
    running = body.layer1[0].bn1.running_mean.clone()
    body(torch.randn(2, 3, 64, 64))
    assert torch.equal(body.layer1[0].bn1.running_mean, running), "frozen BN statistics must not change"
    assert not torch.equal(body.layer3[0].bn1.running_mean, torch.zeros(256))


def test_norm_eval_freezes_statistics_but_affine_trains():
    body = build_backbone("resnet18", fpn=False, norm="bn", norm_eval=True).body
    body.train()
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(m.weight.requires_grad for m in bns)
    before = [m.running_mean.clone() for m in bns]
    body(torch.randn(2, 3, 64, 64)).popitem()[1].sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert bns[-1].weight.grad is not None


@pytest.mark.parametrize(("norm", "cls"), [("bn", nn.BatchNorm2d), ("frozen_bn", FrozenBatchNorm2d), ("gn", nn.GroupNorm), ("sync_bn", nn.SyncBatchNorm)])
def test_norm_choice(norm, cls):
    body = build_backbone("resnet18", fpn=False, norm=norm).body
    assert isinstance(body.bn1, cls) and isinstance(body.layer4[1].bn2, cls)
    assert isinstance(body.layer2[0].downsample[1], cls)


def test_frozen_bn_keeps_reduced_precision_under_autocast():
    body = build_backbone("resnet18", fpn=False, norm="frozen_bn").body.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = body(torch.randn(1, 3, 64, 64))
    assert all(t.dtype == torch.bfloat16 for t in out.values())


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward (outside checkpointed regions)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return total, out


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_activation_checkpointing_same_outputs_gradients_and_less_memory(norm):
    torch.manual_seed(0)
    plain = build_backbone("resnet18", norm=norm).train()
    ckpt = build_backbone("resnet18", norm=norm, checkpoint_stages=("c2", "c3", "c4", "c5")).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 96)
    bytes_plain, out_plain = saved_activation_bytes(plain, x)
    bytes_ckpt, out_ckpt = saved_activation_bytes(ckpt, x)
    for k in out_plain:
        assert torch.equal(out_plain[k], out_ckpt[k]), k
    sum(o.float().pow(2).mean() for o in out_plain.values()).backward()
    sum(o.float().pow(2).mean() for o in out_ckpt.values()).backward()
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6, rtol=1e-5), name
    # BN running statistics are updated once, not twice (the recompute must not touch them).
    for (name, b1), b2 in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b1, b2), name
    assert bytes_ckpt < 0.5 * bytes_plain, (bytes_ckpt, bytes_plain)


def test_bad_arguments():
    with pytest.raises(ValueError, match=re.escape("trainable_stages must be in 0..5 (0 freezes everything, 5 trains the stem too); got 6")):
        build_backbone("resnet18", trainable_stages=6)
    with pytest.raises(ValueError, match=re.escape("unknown backbone name 'resnet5'; choose one of")):
        build_backbone("resnet5")
    with pytest.raises(ValueError, match=re.escape("out_features has unknown level(s) ['c6']")):
        build_backbone("resnet18", out_features=["c3", "c6"])
    with pytest.raises(ValueError, match=re.escape("out_features must list distinct levels in increasing order, got ['c4', 'c3']")):
        build_backbone("resnet18", out_features=["c4", "c3"])
    with pytest.raises(ValueError, match=re.escape("output_stride must be 32 (no dilation), 16 (dilated C5) or 8")):
        build_backbone("resnet18", output_stride=4)
