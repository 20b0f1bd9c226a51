"""engine.train_step and engine.run_inference on a two-parameter model whose losses and gradients are known."""

import contextlib

import pytest
import torch
from torch import nn

from detection.engine import run_inference, train_step
from detection.precision import PrecisionPolicy

FP32 = PrecisionPolicy("cpu")
BF16 = PrecisionPolicy("cpu", torch.bfloat16, "test")  # built directly: .of() warns on CPUs without native bf16


class Quadratic(nn.Module):
    """``loss_a = w . x`` (gradient ``x``) and ``loss_b = s * |w|^2`` (gradient ``2 s w``), ``x`` the summed images."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.autocast_seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, images, targets=None):
        self.autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        x = torch.stack(images).sum(0)
        if targets is None:
            return [{"boxes": (self.w * x).expand(1, 2).clone(), "scores": torch.ones(1)}]
        return {"loss_a": (self.w * x).sum(), "loss_b": targets[0]["s"] * (self.w**2).sum()}


def grad_of(w: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
    return x + 2 * s * w


def step(model, opt, x, s=1.0, **kwargs):
    kwargs.setdefault("scaler", torch.amp.GradScaler("cpu", enabled=False))
    kwargs.setdefault("precision", FP32)
    return train_step(model, [x], [{"s": torch.tensor(s)}], optimizer=opt, **kwargs)


def setup(lr: float = 0.1):
    model = Quadratic()
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def test_a_step_applies_the_loss_gradient_and_clears_it():
    model, opt = setup()
    w0, x = model.w.detach().clone(), torch.tensor([0.5, 3.0])
    result = step(model, opt, x, s=2.0)
    assert result.finite and result.stepped
    assert result.losses == pytest.approx({"loss_a": -5.5, "loss_b": 10.0})
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * grad_of(w0, x, 2.0))
    assert model.w.grad is None


def test_accumulation_averages_the_micro_steps_and_steps_once():
    model, opt = setup()
    w0 = model.w.detach().clone()
    x1, x2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])
    first = step(model, opt, x1, accumulate_steps=2, micro_step=0)
    assert first.finite and not first.stepped
    torch.testing.assert_close(model.w.detach(), w0)  # no update yet
    torch.testing.assert_close(model.w.grad, grad_of(w0, x1, 1.0) / 2)  # kept for the next micro-step
    second = step(model, opt, x2, accumulate_steps=2, micro_step=1)
    assert second.stepped
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * (grad_of(w0, x1, 1.0) + grad_of(w0, x2, 1.0)) / 2)
    assert model.w.grad is None


def test_no_sync_wraps_every_backward_but_the_last_of_an_accumulation():
    model, opt = setup()
    entered: list[bool] = []  # per no_sync() use: did a backward pass run inside it

    @contextlib.contextmanager
    def no_sync():
        before = None if model.w.grad is None else model.w.grad.clone()
        yield
        entered.append(model.w.grad is not None and (before is None or not torch.equal(before, model.w.grad)))

    results = [step(model, opt, torch.ones(2), accumulate_steps=3, micro_step=i, no_sync=no_sync) for i in range(3)]
    assert entered == [True, True]  # micro-steps 0 and 1; the last one synchronises
    assert [r.stepped for r in results] == [False, False, True]


def test_gradients_are_unscaled_before_clipping():
    model, opt = setup(lr=1.0)
    w0 = model.w.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    result = step(model, opt, torch.tensor([30.0, -40.0]), s=0.0, scaler=scaler, clip_grad_norm=0.5)
    assert result.stepped
    # Gradient (30, -40), norm 50: clipped to norm 0.5 in true (unscaled) units.
    torch.testing.assert_close(model.w.detach() - w0, torch.tensor([-0.3, 0.4]))


def test_clipping_leaves_small_gradients_alone():
    model, opt = setup(lr=1.0)
    w0 = model.w.detach().clone()
    step(model, opt, torch.tensor([0.3, 0.4]), s=0.0, clip_grad_norm=10.0)
    torch.testing.assert_close(model.w.detach() - w0, torch.tensor([-0.3, -0.4]))


def test_a_non_finite_loss_skips_the_step_and_clears_accumulated_gradients():
    model, opt = setup()
    w0 = model.w.detach().clone()
    step(model, opt, torch.ones(2), accumulate_steps=2, micro_step=0)
    assert model.w.grad is not None
    bad = step(model, opt, torch.tensor([float("nan"), 1.0]), accumulate_steps=2, micro_step=1)
    assert not bad.finite and not bad.stepped
    assert bad.losses["loss_b"] == pytest.approx(5.0)
    assert model.w.grad is None
    torch.testing.assert_close(model.w.detach(), w0)


def test_a_non_finite_loss_on_another_rank_skips_the_step_here():
    model, opt = setup()
    w0 = model.w.detach().clone()
    asked = []

    def all_ranks_finite(ok: bool) -> bool:
        asked.append(ok)
        return False  # some other rank had a non-finite loss

    result = step(model, opt, torch.ones(2), all_ranks_finite=all_ranks_finite)
    assert asked == [True] and not result.finite and not result.stepped
    assert model.w.grad is None
    torch.testing.assert_close(model.w.detach(), w0)


def test_the_forward_pass_runs_under_the_policy():
    model, opt = setup()
    step(model, opt, torch.ones(2), precision=BF16)
    step(model, opt, torch.ones(2), precision=FP32)
    assert model.autocast_seen[0] == (True, torch.bfloat16)
    assert model.autocast_seen[1][0] is False


def test_run_inference_restores_the_mode_and_hands_over_cpu_outputs():
    model = Quadratic().train()
    loader = [([torch.ones(2)], [{"image_id": 1}], []), ([], [], ["bad.jpg"]), ([torch.ones(2)], [{"image_id": 2}], []),
              ([torch.ones(2)], [{"image_id": 3}], [])]
    seen = []

    def on_batch(images, targets, outputs):
        assert not model.training
        seen.append((targets[0]["image_id"], outputs[0]["boxes"].device.type))

    count = run_inference(model, loader, torch.device("cpu"), BF16, on_batch=on_batch, max_images=2)
    assert count == 2 and seen == [(1, "cpu"), (2, "cpu")]  # the empty batch is skipped, the limit stops it
    assert model.training
    assert all(entry == (True, torch.bfloat16) for entry in model.autocast_seen)
