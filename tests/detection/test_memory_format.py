"""train.channels_last: the memory format the trainer builds the model in."""

from pathlib import Path

import pytest
import torch

from detection.config import load_config
from detection.experiment import Run
from detection.precision import PrecisionPolicy
from detection.trainer import _training_model


@pytest.fixture(params=["AVX512", "AVX2"])
def capability(request, monkeypatch):
    """This CPU's kernels as AVX-512 or as AVX2 only (what ``ATEN_CPU_CAPABILITY`` would report)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: request.param)
    return request.param


def test_channels_last_is_the_layout_where_convolutions_run_faster(capability):
    on_cpu = capability == "AVX512"
    assert PrecisionPolicy("cpu").channels_last is on_cpu and PrecisionPolicy("cpu", torch.bfloat16).channels_last is on_cpu
    assert PrecisionPolicy("cuda", torch.float16).channels_last and not PrecisionPolicy("cuda").channels_last


@pytest.mark.parametrize(("setting", "amp", "channels_last"), [("auto", "false", True), ("auto", "true", True),
                                                               ("false", "false", False)])
def test_training_model_memory_format_follows_train_channels_last(tmp_path, setting, amp, channels_last, capability):
    if setting == "auto" and capability == "AVX2":
        channels_last = False
    cfg = load_config(Path(__file__).parents[2] / "configs/smoke/tiny_cpu.yaml",
                      [f"train.channels_last={setting}", f"train.amp.enabled={amp}"])
    logged = []
    model = _training_model(Run(cfg, tmp_path, logged.append), 3, None)
    assert model.backbone.channels_last is channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) is channels_last for w in convs)
    precision = "bf16" if amp == "true" else "fp32"
    if capability == "AVX512":
        expected = f"memory format channels-last (train.channels_last: auto, cpu {precision})"
    else:
        expected = f"memory format contiguous (train.channels_last: auto, cpu {precision}, no AVX-512 kernels: " \
                   "channels-last trains slower)"
    assert (expected in logged) is (setting == "auto"), logged
