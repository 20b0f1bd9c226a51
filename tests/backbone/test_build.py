"""build_backbone: option forms, defaults, weight loading from local files, bad files, summary."""

import json
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from backbone import BackboneConfig, FPNConfig, FrozenBatchNorm2d, WeightsError, build_backbone, summarize

FROZEN_RANDOM_STAGES = "ignore:trainable_stages=.* without weights freezes randomly initialised stages:UserWarning"


@pytest.mark.filterwarnings(FROZEN_RANDOM_STAGES)
def test_name_mapping_and_config_give_the_same_model():
    a = build_backbone("resnet18", trainable_stages=2, fpn={"out_channels": 64})
    b = build_backbone({"name": "resnet18", "trainable_stages": 2, "fpn": {"out_channels": 64}})
    c = build_backbone(BackboneConfig(name="resnet18", trainable_stages=2, fpn=FPNConfig(out_channels=64)))
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (a, b, c)]
    assert shapes[0] == shapes[1] == shapes[2]
    grads = [[p.requires_grad for p in m.parameters()] for m in (a, b, c)]
    assert grads[0] == grads[1] == grads[2]


def test_from_mapping_is_the_one_converter():
    cfg = BackboneConfig.from_mapping(
        {"name": "resnet18", "out_features": ["c3", "c5"], "checkpoint_stages": "c3", "fpn": {"extra": "none"}}, fpn=False
    )
    assert cfg.out_features == ("c3", "c5") and cfg.checkpoint_stages == ("c3",)
    assert cfg.fpn == FPNConfig(enabled=False)
    assert BackboneConfig.from_mapping(cfg, name="resnet34") == BackboneConfig(
        name="resnet34", out_features=("c3", "c5"), checkpoint_stages=("c3",), fpn=FPNConfig(enabled=False)
    )
    assert BackboneConfig.from_mapping({"fpn": FPNConfig(out_channels=32)}).fpn.out_channels == 32
    with pytest.raises(TypeError, match=re.escape("fpn must be true/false, a mapping of FPNConfig fields or an FPNConfig, got int")):
        BackboneConfig.from_mapping({"fpn": 1})


def test_freezing_random_stages_warns_once_only_when_asked_for(resnet18_imagenet_file):
    with pytest.warns(UserWarning, match=re.escape("trainable_stages=3 without weights freezes randomly initialised stages of resnet18")) as record:
        bb = build_backbone("resnet18", trainable_stages=3, fpn=False)
    assert len(record) == 1
    assert not any(p.requires_grad for p in bb.body.layer1.parameters()), "the setting keeps its meaning"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone("resnet18", fpn=False)
        build_backbone("resnet18", trainable_stages=5, fpn=False)
        build_backbone("resnet18", weights=str(resnet18_imagenet_file), trainable_stages=3, fpn=False)


def test_keyword_options_override_a_config():
    bb = build_backbone(BackboneConfig(name="resnet18"), fpn=False, out_features=("c5",))
    assert bb.fpn is None and bb.feature_info.names() == ("c5",)
    assert bb.out_channels == 512


def test_unknown_option_suggests_the_closest():
    with pytest.raises(TypeError, match=re.escape("unknown backbone option(s) ['trainable_layers'] (did you mean 'trainable_stages'?)")):
        build_backbone("resnet18", trainable_layers=3)
    with pytest.raises(TypeError, match=re.escape("unknown backbone option(s) ['depth']")):
        build_backbone({"name": "resnet18", "depth": 18})
    with pytest.raises(TypeError, match=re.escape("unknown fpn option(s) ['out_channel'] (did you mean 'out_channels'?)")):
        build_backbone("resnet18", fpn={"out_channel": 64})


def test_state_dict_keys_are_torchvisions():
    keys = set(build_backbone("resnet18").state_dict())
    assert "body.layer1.0.conv1.weight" in keys and "body.layer2.0.downsample.0.weight" in keys
    assert "fpn.inner_blocks.0.0.weight" in keys and "fpn.layer_blocks.3.0.bias" in keys


def test_local_weights_file_loads_strictly_and_matches_torchvision(resnet18_imagenet_file):
    bb = build_backbone("resnet18", weights=str(resnet18_imagenet_file), fpn=False).eval()
    # With weights the default norm is frozen BN, as in torchvision's detection backbones.
    tv = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    tv.load_state_dict(torch.load(resnet18_imagenet_file, weights_only=True))
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        assert (bb(x)["c5"] - y).abs().max() <= 1e-5


def test_default_norm_and_trainable_stages_follow_torchvision(resnet18_imagenet_file):
    pretrained = build_backbone("resnet18", weights=str(resnet18_imagenet_file))
    assert isinstance(pretrained.body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in pretrained.body.layer1.parameters())
    assert all(p.requires_grad for p in pretrained.body.layer2.parameters())
    scratch = build_backbone("resnet18")
    assert isinstance(scratch.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.parameters())


def test_weights_into_a_truncated_body_skip_unbuilt_stages(resnet18_imagenet_file):
    bb = build_backbone("resnet18", weights=str(resnet18_imagenet_file), out_features=("c3",), fpn=False)
    ref = torch.load(resnet18_imagenet_file, weights_only=True)
    assert torch.equal(bb.body.layer2[0].conv1.weight, ref["layer2.0.conv1.weight"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"weights file not found: {missing}")):
        build_backbone("resnet18", weights=str(missing))


def test_truncated_file_names_the_file(tmp_path, resnet18_imagenet_file):
    broken = tmp_path / "truncated.pth"
    broken.write_bytes(resnet18_imagenet_file.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=re.escape(f"{broken}: truncated PyTorch checkpoint (its zip archive has no end record)")):
        build_backbone("resnet18", weights=str(broken))


def test_wrong_kind_of_file(tmp_path):
    text = tmp_path / "config.pth"
    text.write_text(json.dumps({"lr": 0.1}))
    with pytest.raises(WeightsError, match=re.escape(f"{text}: not a PyTorch checkpoint: it starts with b'{{\"lr'")):
        build_backbone("resnet18", weights=str(text))
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(WeightsError, match=re.escape(f"{not_tensors}: expected a state dict (parameter name -> tensor); found a dict with keys ['epoch', 'lr']")):
        build_backbone("resnet18", weights=str(not_tensors))


class Payload:
    """An arbitrary object: unpickling it would need code execution."""

    def __init__(self) -> None:
        self.x = 1


def test_files_that_would_run_code_are_refused(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload()}, unsafe)
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet18", weights=str(unsafe))
    message = str(info.value)
    assert message.startswith(f"{unsafe}: refused to load: the file holds Python objects (")
    assert "test_build.Payload), not only tensors and plain containers, and unpickling them could run code" in message
    assert f"torch.serialization.get_unsafe_globals_in_checkpoint('{unsafe}')" in message


def test_shape_mismatch_lists_keys_and_both_shapes(tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save(torchvision.models.wide_resnet50_2().state_dict(), wide)
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet50", weights=str(wide))
    message = str(info.value)
    assert message.startswith(f"{wide}: ")
    assert "layer1.0.conv1.weight: checkpoint (128, 64, 1, 1) vs model (64, 64, 1, 1)" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, resnet18_imagenet_file):
    sd = torch.load(resnet18_imagenet_file, weights_only=True)
    renamed = OrderedDict((k.replace("layer3", "stage3"), v) for k, v in sd.items())
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with pytest.raises(WeightsError, match=r"missing key\(s\), first: \['layer3\.0\.conv1\.weight'.*unexpected key\(s\), first: \['stage3\.0\.conv1\.weight'"):
        build_backbone("resnet18", weights=str(path))


def test_a_training_checkpoint_is_not_taken_for_backbone_weights(tmp_path, resnet18_imagenet_file):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(resnet18_imagenet_file, weights_only=True), "epoch": 1}, path)
    with pytest.raises(WeightsError, match=re.escape(f"{path}: a training or detector checkpoint (its state dict is under 'model'), not backbone weights; the backbone reads a plain state dict")):
        build_backbone("resnet18", weights=str(path))


def test_unknown_torchvision_weights_name_lists_the_choices():
    with pytest.raises(ValueError, match=re.escape("unknown weights 'IMAGENET22K' for resnet18; torchvision offers ['IMAGENET1K_V1', 'DEFAULT']")):
        build_backbone("resnet18", weights="IMAGENET22K")
    with pytest.raises(ValueError, match=re.escape("weights 'ResNet50_Weights.IMAGENET1K_V2' belong to another model; resnet18 takes ResNet18_Weights.*")):
        build_backbone("resnet18", weights="ResNet50_Weights.IMAGENET1K_V2")


def test_named_weights_are_read_from_the_torch_cache(tmp_path, monkeypatch, resnet18_imagenet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(resnet18_imagenet_file.read_bytes())
    bb = build_backbone("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    ref = torch.load(resnet18_imagenet_file, weights_only=True)
    assert torch.equal(bb.body.conv1.weight, ref["conv1.weight"])


@pytest.mark.filterwarnings(FROZEN_RANDOM_STAGES)
def test_summary_shows_stages_norms_and_bn_state():
    bb = build_backbone("resnet18", norm="bn", trainable_stages=3, fpn={"out_channels": 64})
    bb.train()
    lines = summarize(bb).splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line and not line.startswith("-")}
    stem_params = sum(p.numel() for p in (*bb.body.conv1.parameters(), *bb.body.bn1.parameters()))
    assert rows["stem"] == ["stem", "0", f"{stem_params:,}", "bn", "frozen"]
    assert rows["c2"][1] == "0" and rows["c2"][4] == "frozen"
    c3 = sum(p.numel() for p in bb.body.layer2.parameters())
    assert rows["c3"] == ["c3", f"{c3:,}", f"{c3:,}", "bn", "update"]
    assert rows["fpn"][3:] == ["-", "-"]
    total = sum(p.numel() for p in bb.parameters())
    trainable = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    assert rows["total"] == ["total", f"{trainable:,}", f"{total:,}"]
    bb.eval()
    assert "update" not in summarize(bb)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_base_channels_scales_every_stage(name):
    narrow = build_backbone(name, base_channels=32, fpn={"out_channels": 64})
    standard = build_backbone(name, fpn={"out_channels": 64})
    assert narrow.body.feature_info.channels() == tuple(c // 2 for c in standard.body.feature_info.channels())
    assert narrow.body.conv1.out_channels == 32
    out = narrow(torch.rand(1, 3, 96, 64))
    assert [tuple(v.shape) for v in out.values()] == [(1, 64, 96 // s, 64 // s) for s in (4, 8, 16, 32)] + [(1, 64, 2, 1)]
    body_params = sum(p.numel() for p in narrow.body.parameters())
    assert body_params < 0.3 * sum(p.numel() for p in standard.body.parameters())


def test_base_channels_is_refused_with_pretrained_weights_and_when_not_positive(resnet18_imagenet_file):
    with pytest.raises(ValueError, match=r"pretrained ResNets all have base_channels=64: drop weights or base_channels"):
        build_backbone("resnet18", weights=str(resnet18_imagenet_file), base_channels=32)
    with pytest.raises(ValueError, match=r"base_channels must be a positive channel count"):
        build_backbone("resnet18", base_channels=0)
