"""build_optimizer: parameter groups and the fused AdamW update; build_scheduler's learning rates."""

import pytest
import torch
from torch import nn

from detection.config import OptimizerConfig, ScheduleConfig
from detection.solver import build_optimizer, build_scheduler


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_norm_and_bias_parameters_get_no_weight_decay():
    model = _model()
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05,
                                                 no_decay_norm_and_bias=True), 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # two conv biases, BN weight and bias


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_fused_option_matches_the_loop_update(fused):
    reference, model = _model(), _model()
    cfg = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.05, fused=fused)
    opt = build_optimizer(model, cfg, 1e-2)
    assert opt.defaults["fused"] is (True if fused else None)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    # Same gradients for both (from a model, Adam's normalisation would amplify rounding in near-zero ones).
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(model.parameters(), reference.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert (a - b).abs().max().item() <= 1e-6
    assert (model[0].weight - _model()[0].weight).abs().max().item() > 1e-2  # it did update


def test_sgd_ignores_fused():
    opt = build_optimizer(_model(), OptimizerConfig(name="sgd", lr=0.1, fused=True), 0.1)
    assert isinstance(opt, torch.optim.SGD)


def test_cosine_schedule_warms_up_then_decays():
    model = _model()
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1), 0.1)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_iters=10), 100, 10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.01 + 1e-9 and max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs.index(max(lrs)) in range(9, 12) and lrs[-1] < 0.001
