"""train.time_budget: the training length planned from measured throughput, with a fake clock."""

import functools
import math
import shutil

import pytest

from detection import trainer as trainer_mod
from detection.budget import IterationPlan
from detection.checkpoint import load_checkpoint
from detection.config import ConfigError, load_config
from detection.logger import read_jsonl
from detection.solver import lr_factor
from detection.trainer import train

from .test_trainer import SMOKE, train_losses


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_plan(plan: IterationPlan, clock: FakeClock, seconds_per_iter, upto: int) -> int | None:
    planned = None
    for it in range(1, upto + 1):
        clock.now += seconds_per_iter(it)
        planned = plan.observe(it) or planned
    return planned


def test_the_plan_fits_the_rest_of_the_budget_at_the_measured_speed():
    clock = FakeClock()
    plan = IterationPlan(100.0, 10_000, window=(50, 150), clock=clock)
    plan.start(0)
    # The first iterations are slow (warm-up), the measured window runs at 0.5 s per iteration.
    planned = run_plan(plan, clock, lambda it: 2.0 if it <= 10 else 0.5, 150)
    elapsed = 10 * 2.0 + 140 * 0.5
    assert plan.seconds_per_iter == pytest.approx(0.5)
    assert planned == plan.planned == plan.max_iters == 150 + math.floor((100.0 - elapsed) / 0.5)
    assert "0.500 s/iteration" in plan.describe() and f"{planned} iterations" in plan.describe()


def test_the_cap_bounds_the_plan_and_a_spent_budget_stops_after_the_window():
    clock = FakeClock()
    capped = IterationPlan(1e6, 400, window=(5, 10), clock=clock)
    capped.start(0)
    assert run_plan(capped, clock, lambda it: 1.0, 10) == 400 and "capped" in capped.describe()
    clock = FakeClock()
    spent = IterationPlan(5.0, 400, window=(5, 10), clock=clock)
    spent.start(0)
    assert run_plan(spent, clock, lambda it: 1.0, 10) == 10


def test_a_saved_plan_is_continued_and_one_from_before_the_plan_measures_again():
    clock = FakeClock()
    plan = IterationPlan(100.0, 1000, window=(5, 10), clock=clock)
    plan.start(0)
    run_plan(plan, clock, lambda it: 1.0, 10)
    restored = IterationPlan(100.0, 1000, window=(5, 10), clock=clock)
    restored.load_state_dict(plan.state_dict())
    restored.start(40)
    assert restored.max_iters == plan.planned == 100 and restored.observe(100) is None
    early = IterationPlan(100.0, 1000, window=(5, 10), clock=clock)
    early.load_state_dict(IterationPlan(100.0, 1000).state_dict())
    early.start(7)  # resumed inside the window: measure over the next five iterations instead
    assert early.planned is None and early.window == (8, 13)


def test_time_budget_must_be_positive():
    with pytest.raises(ConfigError, match="time_budget"):
        load_config(SMOKE, ["train.time_budget=0"])


@pytest.fixture
def fake_plan(monkeypatch):
    """The trainer's plan measures over iterations 2-3 on a clock that advances 10 s per iteration."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_mod, "IterationPlan", functools.partial(IterationPlan, window=(1, 3), clock=clock))
    return clock


def budget_cfg(shapes_cache, budget):
    return load_config(SMOKE, [f"data.shapes.cache_dir={shapes_cache}", "train.max_iters=12",
                               f"train.time_budget={budget}", "train.schedule.name=cosine", "train.log_period=1"])


def test_training_runs_the_planned_length_and_resume_continues_the_plan(tmp_path, fake_plan, monkeypatch):
    from detection import loop as loop_mod

    shapes_cache = tmp_path / "shapes"
    # Each iteration takes 10 s on the fake clock.
    original = loop_mod.TrainLoop.after_iteration

    def tick(self):
        fake_plan.now += 10.0
        original(self)

    monkeypatch.setattr(loop_mod.TrainLoop, "after_iteration", tick)
    out, logged = tmp_path / "run", []
    # 3 iterations measured (30 s), 10 s each: 60 s left give 6 more, 9 in all (the cap is 12).
    train(budget_cfg(shapes_cache, 90), output_dir=out, log=logged.append)
    assert any("time budget 90s: 10.000 s/iteration" in line and "so 9 iterations" in line for line in logged)
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iteration"] for r in records] == list(range(1, 10))
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 9 and final["plan"]["planned"] == 9
    cfg = budget_cfg(shapes_cache, 90)
    # The lr follows a cosine over the planned 9 iterations, not over the cap of 12 (a record holds the
    # lr of the next iteration).
    for r in records[3:]:
        assert r["lr"] == pytest.approx(cfg.train.optimizer.lr * lr_factor(r["iteration"], cfg.train.schedule, 9, 4),
                                        rel=1e-6, abs=1e-12)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "model_0000006.pth", resumed / "model_0000006.pth")
    fake_plan.now = 1e9  # a resumed run continues the saved plan, whatever the clock says now
    train(budget_cfg(shapes_cache, 90), output_dir=resumed, resume=True, log=lambda s: None)
    assert load_checkpoint(resumed / "model_final.pth")["iteration"] == 9
    reference, after = train_losses(out), train_losses(resumed)
    for it in (7, 8, 9):
        assert after[it] == pytest.approx(reference[it], rel=1e-6, abs=1e-7), it
