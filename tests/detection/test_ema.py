"""Weight EMA: the decay and its warm-up, BatchNorm buffers, state dicts, the checkpoint layout, the
training loop's updates (none on skipped steps or accumulation micro-steps), evaluation of the EMA
or of the raw weights, and an exact resume."""

import math
import re
import types

import pytest
import torch
from torch import nn

from detection import trainer as trainer_mod
from detection.checkpoint import load_checkpoint
from detection.config import ConfigError
from detection.ema import ModelEma, ema_decay
from detection.engine import NonFiniteLossError
from detection.loop import TrainLoop, TrainState, scaler_skipped
from detection.run import load_run
from detection.trainer import train

from .test_divergence import Scaled
from .test_trainer import smoke_cfg, train_losses


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the decay ------------------------------------------------------------------------------------
def test_the_first_update_copies_then_the_warm_up_approaches_the_decay():
    assert ema_decay(0.9998, 2000, 0) == 0.0
    assert ema_decay(0.9998, 0, 0) == 0.0
    assert ema_decay(0.9998, 0, 1) == 0.9998
    assert ema_decay(0.9998, 2000, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    values = [ema_decay(0.9998, 2000, n) for n in (1, 10, 100, 1000, 10000, 100000)]
    assert values == sorted(values) and values[-1] == pytest.approx(0.9998, abs=1e-12)
    assert values[0] == pytest.approx(0.9998 / 2000, rel=1e-3)  # early weights fade within a few steps


def test_updates_follow_the_recursion_with_the_warm_up():
    model = nn.Linear(2, 1)
    set_weights(model, 0.0)
    ema = ModelEma(model, decay=0.9, warmup_steps=3)
    expected = None
    for n, value in enumerate([1.0, 5.0, -2.0, 4.0]):
        set_weights(model, value)
        d = ema_decay(0.9, 3, n)
        assert ema.current_decay() == d
        ema.update(model)
        expected = value if expected is None else d * expected + (1 - d) * value
        assert ema.updates == n + 1
        for p in ema.module.parameters():
            assert torch.allclose(p, torch.full_like(p, expected)), n
    assert all(bool((p == 4.0).all()) for p in model.parameters())  # the model itself is untouched


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=re.escape("EMA decay must be in (0, 1); got 1.0")):
        ModelEma(nn.Linear(1, 1), decay=1.0, warmup_steps=0)
    with pytest.raises(ValueError, match=re.escape("EMA warmup_steps must be >= 0; got -1")):
        ModelEma(nn.Linear(1, 1), decay=0.9, warmup_steps=-1)


@pytest.mark.parametrize("key, value, message", [
    ("decay", "1.0", "must be in (0, 1); got 1.0"),
    ("warmup_steps", "-5", "must be >= 0; got -5"),
    ("evaluate", "best", "one of 'ema', 'raw'"),
])
def test_config_refuses_bad_values_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(f"train.ema.{key}")) as info:
        smoke_cfg(tmp_path, f"train.ema.{key}={value}")
    assert message in str(info.value)


# -- buffers, state dicts, memory format, autocast ------------------------------------------------
def test_batchnorm_statistics_are_averaged_and_the_batch_count_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEma(model, decay=0.5, warmup_steps=0)
    ema.update(model)  # a copy: running_mean 0, running_var 1, count 0
    model.train()(torch.randn(2, 3, 8, 8) * 3 + 2)
    bn, ema_bn = model[1], ema.module[1]
    ema.update(model)
    assert torch.allclose(ema_bn.running_mean, 0.5 * bn.running_mean)
    assert torch.allclose(ema_bn.running_var, 0.5 * 1.0 + 0.5 * bn.running_var)
    assert int(ema_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    a = ModelEma(model, decay=0.8, warmup_steps=5)
    for value in (1.0, 2.0, 3.0):
        set_weights(model, value)
        a.update(model)
    saved = a.state_dict()
    assert saved["updates"] == 3 and set(saved["model"]) == set(model.state_dict())  # the detector's own keys
    b = ModelEma(model, decay=0.8, warmup_steps=5)
    b.load_state_dict(saved)
    assert b.updates == 3 and b.current_decay() == a.current_decay()
    set_weights(model, 7.0)
    a.update(model)
    b.update(model)
    assert_same_weights(a.module.state_dict(), b.module.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        b.load_state_dict({"model": {}, "updates": 1})


def test_channels_last_and_bf16_autocast_keep_the_average_in_float32_and_its_layout():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    plain, under_autocast = (ModelEma(model, decay=0.9, warmup_steps=0) for _ in range(2))
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        plain.update(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast.update(model)
    w = under_autocast.module.weight
    assert w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w, plain.module.weight)


def test_a_step_the_float16_scaler_skipped_is_recognised():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    for factor, skipped in ((float("inf"), True), (1.0, False)):
        before = scaler.get_scale()
        scaler.scale(model(torch.ones(1, 2)).sum() * factor).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert scaler_skipped(scaler, before) is skipped
    assert scaler_skipped(scaler, None) is False


# -- the training state -----------------------------------------------------------------------------
class Position:
    """The data position part of a TrainState, without a loader."""

    def state_dict(self):
        return {"epoch": 0, "start_batch": 0}

    def load_state_dict(self, state):
        pass

    def position_at(self, iteration):
        return self.state_dict()


def make_state(ema: bool, evaluate_ema: bool = True, value: float = 1.0) -> TrainState:
    model = nn.Linear(2, 2)
    set_weights(model, value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return TrainState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), Position(),
                      ema=ModelEma(model, decay=0.5, warmup_steps=0) if ema else None, evaluate_ema=evaluate_ema)


@pytest.mark.parametrize("evaluate_ema", [True, False])
def test_the_checkpoint_model_entry_is_what_evaluation_uses(evaluate_ema):
    s = make_state(ema=True, evaluate_ema=evaluate_ema)
    s.weights_changed()  # the copy
    set_weights(s.model, 3.0)
    s.weights_changed()  # the average: 2.0
    state = s.state_dict()
    assert s.evaluation_model() is (s.ema.module if evaluate_ema else s.model)
    assert_same_weights(state["model"], s.evaluation_model().state_dict())
    assert_same_weights(state["raw_model"], s.model.state_dict())
    assert state["ema"]["updates"] == 2 and float(state["ema"]["model"]["weight"][0, 0]) == 2.0
    restored = make_state(ema=True, evaluate_ema=evaluate_ema, value=0.0)
    restored.load_state_dict(state)
    assert float(restored.model.weight.detach()[0, 0]) == 3.0 and float(restored.ema.module.weight.detach()[0, 0]) == 2.0
    assert restored.ema.updates == 2


def test_without_ema_the_checkpoint_is_unchanged():
    s = make_state(ema=False)
    s.weights_changed()
    state = s.state_dict()
    assert "raw_model" not in state and "ema" not in state and s.evaluation_model() is s.model


def test_resuming_across_an_ema_setting_change_warns_and_keeps_the_trained_weights():
    without = make_state(ema=False, value=3.0).state_dict()
    s = make_state(ema=True, value=0.0)
    s.ema.update(s.model)
    with pytest.warns(UserWarning, match="the checkpoint holds no weight EMA"):
        s.load_state_dict(without)
    assert s.ema.updates == 0 and float(s.ema.module.weight.detach()[0, 0]) == 3.0
    with_ema = make_state(ema=True, evaluate_ema=True, value=5.0)
    with_ema.weights_changed()
    set_weights(with_ema.model, 7.0)
    s = make_state(ema=False, value=0.0)
    with pytest.warns(UserWarning, match="train.ema.enabled is false"):
        s.load_state_dict(with_ema.state_dict())
    assert float(s.model.weight.detach()[0, 0]) == 7.0  # the raw weights, not the evaluated ones


def test_non_finite_ema_weights_stop_a_checkpoint():
    s = make_state(ema=True)
    s.weights_changed()
    with torch.no_grad():
        s.ema.module.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=re.escape(
            "the model diverged: 1 of 4 weight tensors (model and EMA) are non-finite (e.g. EMA bias)")):
        TrainLoop.check_weights(types.SimpleNamespace(state=s))


# -- end to end -------------------------------------------------------------------------------------
EMA = ["train.ema.enabled=true", "train.ema.decay=0.5", "train.ema.warmup_steps=0", "eval.max_images=2",
       "eval.num_vis_images=0"]


def recording_evaluate(monkeypatch):
    """Patch the trainer's ``evaluate`` to record (tag, weights) of every model it evaluates."""
    calls, real = [], trainer_mod.evaluate

    def evaluate(run, model, *args, tag, **kwargs):
        calls.append((tag, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(run, model, *args, tag=tag, **kwargs)

    monkeypatch.setattr(trainer_mod, "evaluate", evaluate)
    return calls


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("ema-run"), tmp_path_factory.mktemp("shapes")
    with pytest.MonkeyPatch.context() as mp:
        calls = recording_evaluate(mp)
        train(smoke_cfg(cache, *EMA, "train.eval_period=2"), output_dir=out, log=lambda s: None)
    return out, cache, calls


@pytest.mark.slow
def test_periodic_and_final_evaluation_and_load_run_use_the_ema(ema_run):
    out, _, calls = ema_run
    final, middle = load_checkpoint(out / "model_final.pth"), load_checkpoint(out / "model_0000002.pth")
    assert [tag for tag, _ in calls] == ["iteration 2", "final"]
    assert final["ema"]["updates"] == 4 and middle["ema"]["updates"] == 2
    assert_same_weights(calls[0][1], middle["ema"]["model"])
    assert_same_weights(calls[1][1], final["ema"]["model"])
    assert_same_weights(final["model"], final["ema"]["model"])
    assert any(not torch.equal(final["model"][k], final["raw_model"][k]) for k in final["model"])
    assert_same_weights(load_run(out, device="cpu", log=lambda s: None).model.state_dict(), final["model"])


@pytest.mark.slow
def test_resume_gives_the_same_ema_and_losses(ema_run, tmp_path):
    out, cache, _ = ema_run
    train(smoke_cfg(cache, *EMA, "train.eval_period=2"), output_dir=tmp_path,
          resume=str(out / "model_0000002.pth"), log=lambda s: None)
    reference, resumed = load_checkpoint(out / "model_final.pth"), load_checkpoint(tmp_path / "model_final.pth")
    assert resumed["ema"]["updates"] == 4
    for part in ("raw_model", "model"):
        for k, v in reference[part].items():
            torch.testing.assert_close(resumed[part][k], v, rtol=1e-6, atol=1e-7, msg=f"{part}.{k}")
    before, after = train_losses(out), train_losses(tmp_path)
    assert sorted(after) == [3, 4]
    for it in (3, 4):
        assert after[it] == pytest.approx(before[it], rel=1e-6, abs=1e-7), it


@pytest.mark.slow
def test_skipped_and_accumulation_steps_do_not_update_and_raw_evaluation_uses_the_trained_weights(
        tmp_path, monkeypatch):
    real = trainer_mod.build_model
    monkeypatch.setattr(trainer_mod, "build_model", lambda cfg, n: Scaled(real(cfg, n), float("nan"), when=[1]))
    calls = recording_evaluate(monkeypatch)
    # Iteration 1 is skipped (non-finite) and restarts the accumulation: 2+3 and 4+5 make a step each, 6 none.
    cfg = smoke_cfg(tmp_path / "shapes", *EMA, "train.accumulate_grad_steps=2", "train.ema.evaluate=raw",
                    "train.checkpoint_period=0", "train.max_iters=6")
    train(cfg, output_dir=tmp_path / "run", log=lambda s: None)
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert final["ema"]["updates"] == 2 and final["bad_steps"]["total"] == 1
    assert_same_weights(final["model"], final["raw_model"])
    assert any(not torch.equal(final["model"][k], final["ema"]["model"][k]) for k in final["model"])
    assert [tag for tag, _ in calls] == ["final"]
    assert_same_weights(calls[0][1], final["raw_model"])
