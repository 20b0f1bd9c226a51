"""train.channels_last: the memory format the trainer builds the model in."""

from pathlib import Path

import pytest
import torch

from detection.config import load_config
from detection.experiment import Run
from detection.precision import PrecisionPolicy
from detection.trainer import _training_model


def test_channels_last_is_the_layout_where_convolutions_run_faster():
    assert PrecisionPolicy("cpu").channels_last and PrecisionPolicy("cpu", torch.bfloat16).channels_last
    assert PrecisionPolicy("cuda", torch.float16).channels_last and not PrecisionPolicy("cuda").channels_last


@pytest.mark.parametrize(("setting", "amp", "channels_last"), [("auto", "false", True), ("auto", "true", True),
                                                               ("false", "false", False)])
def test_training_model_memory_format_follows_train_channels_last(tmp_path, setting, amp, channels_last):
    cfg = load_config(Path(__file__).parents[2] / "configs/smoke/tiny_cpu.yaml",
                      [f"train.channels_last={setting}", f"train.amp.enabled={amp}"])
    logged = []
    model = _training_model(Run(cfg, tmp_path, logged.append), 3, None)
    assert model.backbone.channels_last is channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) is channels_last for w in convs)
    expected = "memory format channels-last (train.channels_last: auto, cpu " + ("bf16)" if amp == "true" else "fp32)")
    assert (expected in logged) is (setting == "auto")
