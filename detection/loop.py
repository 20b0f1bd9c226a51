"""The training loop: iterations, logging, periodic checkpoints and evaluation, Ctrl-C.

:class:`TrainState` holds the stateful parts of a training (model, optimizer, scheduler, grad
scaler, data position, optional weight EMA); its ``state_dict`` is their union, and a checkpoint is
that plus the RNG states, the config and the categories (:meth:`TrainLoop.snapshot`).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dist
from .budget import IterationPlan
from .checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from .ema import ModelEma
from .engine import NonFiniteLossError, describe_bad_step, non_finite_tensors, to_device, train_step
from .experiment import Run, TrainBatches
from .logger import JsonlWriter, ProgressLogger
from .precision import PrecisionPolicy

__all__ = ["TrainLoop", "TrainState", "TrainingInterrupted", "improved", "scaler_skipped"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; a checkpoint was saved first (its path is in ``.checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainState:
    """Everything that changes while training and is restored on resume.

    With an EMA (``ema``), :meth:`evaluation_model` is the average when ``evaluate_ema`` (else the
    trained model), and the checkpoint's ``model`` entry holds its weights: what evaluation,
    ``eval_det`` and :func:`detection.load_run` use. ``raw_model`` then holds the trained weights and
    ``ema`` the average with its update count (``{"model", "updates"}``), so a resume is exact.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    batches: TrainBatches
    ema: ModelEma | None = None
    evaluate_ema: bool = True
    iteration: int = 0
    best_metric: float = -math.inf
    bad_steps: int = 0  # consecutive skipped (non-finite) steps
    skipped_steps: int = 0  # skipped steps in the whole training
    first_bad_step: str = ""  # description of the first skipped step
    plan: IterationPlan | None = None  # the training length planned from train.time_budget

    @property
    def max_iters(self) -> int | None:
        """The planned training length under a time budget (the cap until it is planned), else ``None``."""
        return self.plan.max_iters if self.plan is not None else None

    def evaluation_model(self) -> nn.Module:
        """The model that evaluation uses and the checkpoint's ``model`` entry stores."""
        return self.ema.module if self.ema is not None and self.evaluate_ema else self.model

    def weights_changed(self) -> None:
        """After an optimizer step that changed the weights: update the EMA."""
        if self.ema is not None:
            self.ema.update(self.model)

    def state_dict(self) -> dict[str, Any]:
        position = self.batches.state_dict()
        return {
            **self._weights(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "sampler": position,
            "iteration": self.iteration, "epoch": position["epoch"], "best_metric": self.best_metric,
            "bad_steps": {"consecutive": self.bad_steps, "total": self.skipped_steps, "first": self.first_bad_step},
            "plan": self.plan.state_dict() if self.plan is not None else None,
        }

    def _weights(self) -> dict[str, Any]:
        # The tensors of "model" are those of "raw_model" or "ema": torch.save writes each storage once.
        raw = self.model.state_dict()
        if self.ema is None:
            return {"model": raw}
        ema = self.ema.state_dict()
        return {"model": ema["model"] if self.evaluate_ema else raw, "raw_model": raw, "ema": ema}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state.get("raw_model", state["model"]))
        self._load_ema(state.get("ema"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_metric = float(state.get("best_metric", -math.inf))
        bad = state.get("bad_steps") or {}
        self.bad_steps, self.skipped_steps = int(bad.get("consecutive", 0)), int(bad.get("total", 0))
        self.first_bad_step = str(bad.get("first", ""))
        if self.plan is not None and state.get("plan"):
            self.plan.load_state_dict(state["plan"])
        self.batches.load_state_dict(state.get("sampler") or self.batches.position_at(self.iteration))

    def _load_ema(self, saved: Mapping[str, Any] | None) -> None:
        if self.ema is not None and saved:
            self.ema.load_state_dict(saved)
        elif self.ema is not None:
            warnings.warn("the checkpoint holds no weight EMA (train.ema was off); the EMA starts from its "
                          "weights now", stacklevel=3)
            self.ema.reset(self.model)
        elif saved:
            warnings.warn("train.ema.enabled is false: the checkpoint's weight EMA is dropped and training "
                          "continues from its trained (raw) weights", stacklevel=3)


def restore_rng(run: Run, rng: list[dict[str, Any]] | None) -> None:
    """Restore this rank's RNG states from a checkpoint's ``rng`` list (one entry per process)."""
    if isinstance(rng, list) and len(rng) == run.world:
        restore_rng_state(rng[run.rank])
    elif rng:
        warnings.warn(f"checkpoint was saved with {len(rng)} process(es), this run has {run.world}; "
                      "random streams restart from rank 0's state", stacklevel=2)
        restore_rng_state(rng[0])


def scaler_skipped(scaler: torch.amp.GradScaler, scale_before: float | None) -> bool:
    """Whether a float16 ``GradScaler`` skipped the optimizer step it was just given (an overflow lowers
    its scale, which ``scale_before`` read before the step); ``False`` when no scale was read."""
    return scale_before is not None and scaler.get_scale() < scale_before


def improved(score: float | None, best: float) -> bool:
    """True when bbox AP ``score`` beats ``best``; an AP of 0, nan or none never counts as a best model."""
    return score is not None and math.isfinite(score) and score > 0 and score > best


class TrainLoop:
    """Runs ``state`` to ``max_iters``: one :meth:`iteration` per batch, then logging, checkpoints, evaluation.

    Args:
        run: the experiment's process context.
        state: the stateful parts, already restored when resuming.
        model: what the step calls (``state.model``, or its ``DistributedDataParallel`` wrapper).
        precision: autocast policy of the forward pass.
        max_iters: training length (under ``train.time_budget``, the cap until ``state.plan`` is made).
        extras: checkpoint entries that do not change while training (``config``, ``categories``).
        evaluate: ``evaluate(model, iteration)`` returns the metrics (on rank 0; ``{}`` elsewhere).
        jsonl: ``metrics.jsonl`` on rank 0, ``None`` elsewhere.
    """

    def __init__(self, run: Run, state: TrainState, model: nn.Module, precision: PrecisionPolicy, *, max_iters: int,
                 extras: Mapping[str, Any], evaluate: Callable[[nn.Module, int], dict[str, float]] | None,
                 jsonl: JsonlWriter | None) -> None:
        t = run.cfg.train
        self.run, self.state, self.model, self.precision = run, state, model, precision
        self.fixed_iters, self.extras, self.evaluate, self.jsonl = max_iters, dict(extras), evaluate, jsonl
        self.checkpointer = Checkpointer(run.output_dir, keep_last=t.keep_last)
        self.progress = ProgressLogger(self.max_iters, state.iteration, run.device, t.batch_size * run.world, enabled=run.main)
        self.no_sync = getattr(model, "no_sync", None)
        if isinstance(model, nn.parallel.DistributedDataParallel):  # a stalled rank is named, see iteration()
            dist.count_gradient_all_reduces(model)
        self.micro_step = 0  # position in the gradient accumulation
        self.window: dict[str, list[float]] = {}  # finite losses since the last report, averaged when logged
        self.window_skipped = 0  # skipped steps since the last report
        # Where the current iteration started: (iteration, data position, RNG state); a Ctrl-C checkpoint
        # taken before the iteration finished is written from there, so the resumed run repeats it exactly.
        self.step_start: tuple[int, dict[str, int], dict[str, Any]] | None = None

    @property
    def max_iters(self) -> int:
        """The training length: planned from the time budget when there is one."""
        planned = self.state.max_iters
        return planned if planned is not None else self.fixed_iters

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> float:
        """Train to ``max_iters``; returns the seconds it took. Ctrl-C saves a checkpoint and raises
        :class:`TrainingInterrupted`."""
        t_start = time.perf_counter()
        if self.state.plan is not None:
            self.state.plan.start(self.state.iteration)
        try:
            while self.state.iteration < self.max_iters:
                self.train_epoch()
        except KeyboardInterrupt:
            raise self.interrupted() from None
        return time.perf_counter() - t_start

    def train_epoch(self) -> None:
        """The rest of the current epoch (or up to ``max_iters``); reports unreadable images skipped in it."""
        epoch, skipped = self.state.batches.epoch, 0
        for images, targets, bad in self.state.batches.epoch_batches():
            skipped += len(bad)
            self.step_start = (self.state.iteration, self.state.batches.position_before_last(), capture_rng_state())
            self.iteration(images, targets)
            self.after_iteration()
            if self.state.iteration >= self.max_iters:
                break
        total = int(sum(dist.all_gather_object(skipped)))
        if total:
            self.progress.newline()
            self.run.log(f"epoch {epoch}: skipped {total} unreadable image(s) in total (data.on_bad_image: skip)")

    def iteration(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> None:
        """One training step on a batch (none when every image of it was unreadable), then the lr schedule."""
        t, s = self.run.cfg.train, self.state
        if images:
            imgs, tgts = to_device(images, targets, self.run.device)
            scale = s.scaler.get_scale() if s.ema is not None and s.scaler.is_enabled() else None
            with dist.bounded(f"DDP's gradient all-reduce or buffer broadcast (iteration {s.iteration + 1})"):
                result = train_step(
                    self.model, imgs, tgts, optimizer=s.optimizer, scaler=s.scaler, precision=self.precision,
                    accumulate_steps=t.accumulate_grad_steps, micro_step=self.micro_step,
                    clip_grad_norm=t.clip_grad_norm, no_sync=self.no_sync,
                    all_ranks_finite=lambda ok: not dist.any_rank(not ok, self.run.device),
                )
            self.micro_step = (self.micro_step + 1) % t.accumulate_grad_steps
            if result.stepped and not scaler_skipped(s.scaler, scale):
                s.weights_changed()
            if result.finite:
                s.bad_steps = 0
                for k, v in result.losses.items():
                    self.window.setdefault(k, []).append(v)
            else:
                self.non_finite(result.losses, [int(x["image_id"]) for x in targets], result.bad or "loss")
        s.iteration += 1
        with warnings.catch_warnings():
            # The schedule follows iterations, also when a skipped (non-finite) step made no update.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            s.scheduler.step()

    def non_finite(self, losses: Mapping[str, float], image_ids: list[int], bad: str) -> None:
        """A skipped step (the weights were not touched): warn, or stop after ``train.max_bad_steps`` in a row."""
        s, limit = self.state, self.run.cfg.train.max_bad_steps
        s.bad_steps += 1
        s.skipped_steps += 1
        self.window_skipped += 1
        self.micro_step = 0
        message = describe_bad_step(s.iteration + 1, losses, image_ids, bad)
        s.first_bad_step = s.first_bad_step or message
        if s.bad_steps >= limit:
            raise NonFiniteLossError(
                f"{s.bad_steps} consecutive non-finite steps (train.max_bad_steps={limit}), the last {message}; "
                f"first bad step: {s.first_bad_step}; stopping. Lower train.optimizer.lr, enable "
                "train.clip_grad_norm, or check these images' annotations."
            )
        self.progress.newline()
        self.run.log(f"warning: skipped step ({s.bad_steps} in a row, limit {limit}), " + message)

    def after_iteration(self) -> None:
        t, it = self.run.cfg.train, self.state.iteration
        if self.state.plan is not None:
            self.plan_length(self.state.plan, it)
        if it % t.log_period == 0 or it == self.max_iters:
            self.report()
        if it < self.max_iters and t.checkpoint_period and it % t.checkpoint_period == 0:
            snapshot = self.snapshot()
            if self.run.main:
                self.checkpointer.save_numbered(it, snapshot)
        if it < self.max_iters and t.eval_period and it % t.eval_period == 0 and self.evaluate is not None:
            self.periodic_evaluation()

    def plan_length(self, plan: IterationPlan, iteration: int) -> None:
        """Under ``train.time_budget``: fix the training length once the throughput is measured (rank 0's
        plan, so every process stops at the same iteration)."""
        planned = plan.observe(iteration)
        if planned is None:
            return
        plan.planned = int(dist.all_gather_object(planned)[0])
        self.progress.max_iters = plan.planned
        self.progress.newline()
        self.run.log(plan.describe())

    def report(self) -> None:
        """Log the losses averaged over the ranks and the finite iterations since the last report;
        a report with only skipped steps says so (``"skipped": true``, no loss)."""
        losses = dist.reduce_mean({k: torch.tensor(sum(v) / len(v)) for k, v in self.window.items()})
        skipped = self.window_skipped
        self.window, self.window_skipped = {}, 0
        record = self.progress.update(self.state.iteration, losses, self.state.optimizer.param_groups[0]["lr"],
                                      skipped=skipped)
        if self.jsonl is not None:
            self.jsonl.write({"type": "train", "epoch": self.state.batches.epoch, **record})

    def periodic_evaluation(self) -> None:
        """Evaluate; a bbox AP that improved on the best so far is saved as ``model_best.pth``."""
        self.progress.newline()
        it = self.state.iteration
        metrics = self.evaluate(self.state.evaluation_model(), it)
        if self.jsonl is not None:
            self.jsonl.write({"type": "eval", "iteration": it, **metrics})
        score = dist.all_gather_object(metrics.get("bbox/AP"))[0]  # rank 0 holds the metrics
        if improved(score, self.state.best_metric):
            self.state.best_metric = score
            snapshot = self.snapshot()
            if self.run.main:
                self.checkpointer.save("model_best", snapshot, update_last=False)
        self.state.model.train()

    # -- checkpoints ------------------------------------------------------------------------------
    def snapshot(self, *, collective: bool = True) -> dict[str, Any]:
        """The checkpoint contents; with ``collective`` every rank must call it (RNG states are gathered).

        Raises:
            NonFiniteLossError: the weights hold NaN or inf (nothing is saved from them).
        """
        self.check_weights()
        rngs = dist.all_gather_object(capture_rng_state()) if collective else [capture_rng_state()]
        return {**self.state.state_dict(), "rng": rngs, **self.extras}

    def check_weights(self) -> None:
        """Raise :class:`NonFiniteLossError` when a weight or buffer of the model (or of its EMA) is NaN or inf."""
        s = self.state
        models = {"": s.model, **({"EMA ": s.ema.module} if s.ema is not None else {})}
        bad = [prefix + name for prefix, m in models.items() for name in non_finite_tensors(m)]
        if bad:
            total = sum(len(m.state_dict()) for m in models.values())
            first = f"first bad step: {s.first_bad_step}" if s.first_bad_step else "no step had a non-finite loss or gradient"
            raise NonFiniteLossError(
                f"the model diverged: {len(bad)} of {total} weight tensors{' (model and EMA)' if s.ema is not None else ''} are "
                f"non-finite (e.g. {bad[0]}) at iteration {s.iteration}; nothing saved from them; {first}. "
                "Lower train.optimizer.lr or enable train.clip_grad_norm."
            )

    def interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C: rank 0 saves a numbered checkpoint (no collective calls: other ranks may be gone).

        Interrupted inside an iteration, the checkpoint holds the data position and RNG state of that
        iteration's start (its update, if any, was not made), so ``--resume`` runs it again exactly as an
        uninterrupted run would. The message is in the exception only (the caller reports it once).
        """
        self.progress.newline()
        path = None
        if self.run.main:
            snapshot = self.snapshot(collective=False)
            if self.step_start is not None and self.step_start[0] == self.state.iteration:
                _, position, rng = self.step_start
                snapshot.update(sampler=position, epoch=position["epoch"], rng=[rng])
            path = self.checkpointer.save_numbered(self.state.iteration, snapshot)
        message = f"interrupted at iteration {self.state.iteration}; checkpoint saved to {path}. Continue with --resume."
        return TrainingInterrupted(message, path)
