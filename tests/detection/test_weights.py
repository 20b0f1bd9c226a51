"""Reading weight files: detector checkpoints, the safe loader's errors, torch.hub downloads (no network)."""

import re
import shutil
import socket
from collections import OrderedDict

import pytest
import torch
from torch import nn

from backbone import WeightsError, build_backbone, safe_load
from detection.weights import load_weights, read_detector_checkpoint


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


def test_plain_state_dict_has_no_extras(tmp_path):
    sd = tiny_model().state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    state, extras = read_detector_checkpoint(path)
    assert extras == {} and list(state) == list(sd)
    assert all(torch.equal(state[k], sd[k]) for k in sd)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_training_checkpoint_is_unwrapped_and_keeps_its_extras(tmp_path, key):
    sd = tiny_model().state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({key: sd, "iteration": 7, "categories": [{"id": 1, "name": "cat"}]}, path)
    state, extras = read_detector_checkpoint(path)
    assert list(state) == list(sd)
    assert extras == {"iteration": 7, "categories": [{"id": 1, "name": "cat"}]}


def test_a_dict_without_a_state_dict_is_named(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsError, match=re.escape(f"{path}: expected a state dict (parameter name -> tensor) or a dict holding one under 'model' or 'state_dict'; found a dict with keys ['epoch', 'lr']")):
        read_detector_checkpoint(path)


def test_module_prefix_is_removed_from_files_and_mappings(tmp_path):
    source = tiny_model()
    wrapped = OrderedDict((f"module.{k}", v + 1) for k, v in source.state_dict().items())
    path = tmp_path / "ddp.pth"
    torch.save({"model": wrapped}, path)
    for given in (path, wrapped):
        target = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        load_weights(target, given)
        assert torch.equal(target[0].weight, source[0].weight + 1)
    assert all(k.startswith("module.") for k in wrapped), "the caller's mapping is left as it was"


def test_mismatch_names_the_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 1)).state_dict(), path)
    with pytest.raises(WeightsError, match=re.escape(f"{path}: 2 tensor(s) have the wrong shape for this model, first: 0.weight: checkpoint (8, 3, 1, 1) vs model (4, 3, 1, 1); 0.bias")):
        load_weights(tiny_model(), path)


class Payload:
    """An arbitrary object: unpickling it would need code execution."""


def test_safe_load_refuses_python_objects_and_says_how_to_inspect(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": tiny_model().state_dict(), "extra": Payload()}, path)
    with pytest.raises(WeightsError) as info:
        read_detector_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused to load: the file holds Python objects (")
    assert "Payload), not only tensors and plain containers, and unpickling them could run code" in message
    assert f"torch.serialization.get_unsafe_globals_in_checkpoint('{path}')" in message


def test_safe_load_says_truncated_only_when_it_is(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny_model().state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(WeightsError, match=re.escape(f"{cut}: truncated PyTorch checkpoint")):
        safe_load(cut)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(WeightsError) as info:
        safe_load(text)
    assert str(info.value) == f"{text}: not a PyTorch checkpoint: it starts with b'not ', while torch.save writes a zip archive starting with b'PK'"
    with pytest.raises(FileNotFoundError, match=re.escape(f"weights file not found: {tmp_path / 'none.pth'}")):
        safe_load(tmp_path / "none.pth")


def test_named_weights_download_through_torch_hub_into_its_cache(tmp_path, monkeypatch, resnet18_imagenet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls = []

    def fake_download(url, dst, *args, **kwargs):
        calls.append((url, socket.getdefaulttimeout()))
        shutil.copyfile(resnet18_imagenet_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    timeout_before = socket.getdefaulttimeout()
    bb = build_backbone("resnet18", weights="IMAGENET1K_V1", fpn=False)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", timeout_before)], "no process-wide timeout"
    assert socket.getdefaulttimeout() == timeout_before
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached.is_file()
    assert torch.equal(bb.body.conv1.weight, torch.load(resnet18_imagenet_file, weights_only=True)["conv1.weight"])
    build_backbone("resnet18", weights="IMAGENET1K_V1", fpn=False)
    assert len(calls) == 1, "the second build reads the cache"


def test_named_weights_offline_say_which_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet50", weights="DEFAULT")
    message = str(info.value)
    assert message.startswith(
        "could not download torchvision weights ResNet50_Weights.IMAGENET1K_V2 from "
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth (OSError: [Errno -2] Name or service not known)."
    )
    assert "pass its path (weights: /path/to/resnet50-11ad3fa6.pth)" in message
    assert f"copy it to {tmp_path / 'torch-home' / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth'}" in message
