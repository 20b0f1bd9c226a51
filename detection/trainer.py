"""Run an experiment from its config: data, model, training with checkpoints and evaluation, outputs.

``tools/train_det.py`` and ``tools/eval_det.py`` are thin wrappers around :func:`train` and
:func:`evaluate_only`. Everything a run writes goes to its output folder:

* ``config.yaml``: the resolved config (also stored inside every checkpoint);
* ``metrics.jsonl``: one JSON record per log period and per evaluation;
* ``model_0001000.pth`` ..., ``model_best.pth``, ``model_final.pth``, ``last_checkpoint``;
* ``metrics.json``: the final COCO metrics (flat keys such as ``bbox/AP``, in percent);
* ``results.json``: the detections in COCO results format;
* ``predictions.png`` and ``curves.png``.

:func:`train` reads top to bottom: resume, data, model, optimizer and schedule, precision, DDP,
the loop (:class:`detection.loop.TrainLoop`), final outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from backbone import summarize

from . import distributed as dist
from .budget import IterationPlan
from .checkpoint import Checkpointer, load_checkpoint
from .config import ConfigError, ExperimentConfig, config_to_dict, diff_configs
from .ema import ModelEma
from .experiment import Run, TrainBatches, build_datasets, data_paths, select_device, train_loader
from .logger import JsonlWriter, drop_records_after, format_duration, read_jsonl
from .loop import TrainingInterrupted, TrainLoop, TrainState, improved, restore_rng
from .models import build_detector, to_channels_last
from .precision import PrecisionPolicy
from .solver import build_optimizer, build_scheduler, fit_schedule
from .validation import evaluate

__all__ = ["ResumeError", "TrainingInterrupted", "build_model", "evaluate_only", "select_device", "train"]


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with this config."""


def build_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The detector that ``cfg.model`` describes, with ``num_classes`` (background included)."""
    m = cfg.model
    return build_detector(m.arch, backbone=m.backbone, num_classes=num_classes, min_size=m.min_size,
                          max_size=m.max_size, anchor_sizes=m.anchor_sizes, aspect_ratios=m.aspect_ratios,
                          **m.head.to_kwargs())


# -- training -------------------------------------------------------------------------------------
def train(
    cfg: ExperimentConfig,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | bool | None = None,
    weights: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train ``cfg``'s detector, evaluating periodically and at the end; returns the final metrics.

    Args:
        cfg: the resolved experiment config.
        output_dir: where everything is written (default ``cfg.output_dir``).
        resume: ``True`` to continue from the output folder's newest checkpoint, or a checkpoint path.
            Model, optimizer, scheduler, scaler, weight EMA, data position, iteration and RNG states are restored,
            so the run continues exactly; a checkpoint whose ``model`` config differs is refused.
        weights: initial model weights (a detector state dict file, ours or torchvision's).
        log: where progress text goes (rank 0 only).

    Raises:
        NonFiniteLossError: ``train.max_bad_steps`` consecutive steps had non-finite losses or gradients
            (skipped without touching the weights), or the weights became non-finite (found before
            a checkpoint is written: nothing is saved from them).
        TrainingInterrupted: Ctrl-C; a checkpoint was saved before raising.
    """
    cfg.data.validate_for_training()
    run = Run(cfg, output_dir, log)
    try:
        return _train(run, resume, weights)
    finally:
        dist.cleanup()


def _train(run: Run, resume: str | os.PathLike[str] | bool | None, weights: str | os.PathLike[str] | None) -> dict[str, float]:
    cfg = run.cfg
    resume_path, ckpt = _read_resume(run, resume)
    if run.main:
        _tidy_output_dir(run, ckpt)
    paths = data_paths(run)
    train_set, val_set = build_datasets(run, paths, train=True, categories=_saved_categories(ckpt))
    categories = train_set.categories
    num_classes = _num_classes(cfg, categories.num_classes, paths["train_ann"])
    model = _training_model(run, num_classes, weights)
    batches = TrainBatches(train_loader(run, train_set))
    max_iters = cfg.train.max_iters or cfg.train.epochs * batches.per_epoch
    precision = PrecisionPolicy.resolve(cfg.train.amp.enabled, cfg.train.amp.dtype, run.device)
    state = _train_state(run, model, batches, precision, max_iters)
    if ckpt is not None:
        state.load_state_dict(ckpt)
        restore_rng(run, ckpt.get("rng"))
        run.log(f"resumed from {resume_path} at iteration {state.iteration}")
    ddp_model = _distributed(run, model)
    length = f"{max_iters} iterations" if state.plan is None else (
        f"{state.plan.max_iters} iterations (planned from train.time_budget)" if state.plan.planned is not None
        else f"as many iterations as fit in train.time_budget={cfg.train.time_budget:g}s (at most {max_iters})")
    run.log(
        f"training {cfg.model.arch} on {cfg.model.backbone.name}: {len(train_set)} images, {num_classes - 1} classes, "
        f"{run.world} process(es) x {cfg.train.batch_size} images, {length} "
        f"({batches.per_epoch} per epoch), device {run.device}, {precision.describe()}"
        + (f", {state.ema.describe()}, evaluating {cfg.train.ema.evaluate}" if state.ema is not None else "")
    )
    run.log(summarize(model))

    def evaluate_at(m: nn.Module, iteration: int) -> dict[str, float]:
        return evaluate(run, m, val_set, categories.to_cat_id, tag=f"iteration {iteration}")

    jsonl = JsonlWriter(run.output_dir / "metrics.jsonl") if run.main else None
    try:
        loop = TrainLoop(run, state, ddp_model, precision, max_iters=max_iters, jsonl=jsonl,
                         extras={"config": config_to_dict(cfg), "categories": categories.state_dict()},
                         evaluate=evaluate_at if val_set is not None else None)
        start_iter = state.iteration
        seconds = loop.train()
        metrics = _final_checkpoint_and_evaluation(run, loop, val_set, categories.to_cat_id, seconds)
        if run.main:
            images = (state.iteration - start_iter) * cfg.train.batch_size * run.world
            _final_outputs(run, metrics if val_set is not None else None, iterations=state.iteration,
                           seconds=seconds, images=images)
        return metrics
    finally:
        if jsonl is not None:
            jsonl.close()


# -- resume ---------------------------------------------------------------------------------------
def _read_resume(run: Run, resume: str | os.PathLike[str] | bool | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from (path and contents), after checking that its model config is this run's."""
    if not resume:
        return None, None
    if resume is True:
        path = Checkpointer(run.output_dir).last()
        if path is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {run.output_dir} (no last_checkpoint file or model_*.pth); "
                "give a path (--resume PATH) or start without --resume"
            )
    else:
        path = Path(resume).expanduser()
    ckpt = load_checkpoint(path)
    differences = diff_configs(ckpt["config"].get("model", {}), config_to_dict(run.cfg)["model"], prefix="model")
    if differences:
        raise ResumeError(
            f"cannot resume from {path}: its model config differs from this run's:\n  "
            + "\n  ".join(differences)
            + "\n(left: checkpoint, right: this run). Use the checkpoint's config.yaml, or start a new output folder."
        )
    return path, ckpt


def _tidy_output_dir(run: Run, ckpt: Mapping[str, Any] | None) -> None:
    """Remove temporary files a killed run left behind, and, when resuming, the ``metrics.jsonl``
    records after the checkpoint's iteration (they are about to be run again)."""
    leftovers = Checkpointer(run.output_dir).remove_leftovers()
    if leftovers:
        run.log(f"removed {len(leftovers)} temporary file(s) left by an interrupted write in {run.output_dir}: "
                + ", ".join(p.name for p in leftovers[:5]) + (" ..." if len(leftovers) > 5 else ""))
    if ckpt is not None:
        dropped = drop_records_after(run.output_dir / "metrics.jsonl", int(ckpt["iteration"]))
        if dropped:
            run.log(f"metrics.jsonl: dropped {dropped} record(s) after iteration {ckpt['iteration']} (run again now)")


def _saved_categories(ckpt: Mapping[str, Any] | None) -> Any:
    from .data import CategoryMapping

    return CategoryMapping.from_state_dict(ckpt["categories"]) if ckpt and ckpt.get("categories") else None


# -- model, optimizer, DDP ------------------------------------------------------------------------
def _num_classes(cfg: ExperimentConfig, dataset_classes: int, train_ann: Path | None) -> int:
    num_classes = cfg.model.num_classes or dataset_classes
    if num_classes < dataset_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} is too small for {dataset_classes - 1} categories in "
            f"{train_ann} (+1 for background); remove model.num_classes to use the dataset's count"
        )
    return num_classes


def _training_model(run: Run, num_classes: int, weights: str | os.PathLike[str] | None) -> nn.Module:
    """The detector with its initial weights, on the run's device, in the configured memory format
    (``train.channels_last: auto`` follows :attr:`PrecisionPolicy.channels_last`)."""
    cfg = run.cfg
    model = build_model(cfg, num_classes)
    if weights:
        from .weights import load_weights

        load_weights(model, weights)
        run.log(f"loaded initial weights from {weights}")
    if run.world > 1 and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = cfg.train.channels_last
    if channels_last == "auto":
        precision = PrecisionPolicy.resolve(cfg.train.amp.enabled, cfg.train.amp.dtype, run.device)
        channels_last = precision.channels_last
        why = "" if channels_last or run.device.type != "cpu" else ", no AVX-512 kernels: channels-last trains slower"
        run.log(f"memory format {'channels-last' if channels_last else 'contiguous'} (train.channels_last: auto, "
                f"{run.device.type} {precision.name}{why})")
    model.to(device=run.device)
    if channels_last:
        to_channels_last(model)
    return model.train()


def _train_state(run: Run, model: nn.Module, batches: TrainBatches, precision: PrecisionPolicy, max_iters: int) -> TrainState:
    """Optimizer, lr schedule, grad scaler, time-budget plan and (``train.ema``) weight EMA around ``model``,
    at iteration 0. Under ``train.time_budget`` the schedule follows the planned length (``max_iters`` until
    it is planned).
    """
    t = run.cfg.train
    optimizer = build_optimizer(model, t.optimizer, t.optimizer.scaled_lr(t.batch_size, run.world))
    plan = IterationPlan(t.time_budget, max_iters) if t.time_budget else None
    schedule, warning = fit_schedule(t.schedule, max_iters, batches.per_epoch)
    if warning:
        run.log(warning)
    length = (lambda: plan.max_iters) if plan is not None else max_iters
    scheduler = build_scheduler(optimizer, schedule, length, batches.per_epoch)
    # Made before the DDP wrapper and updated from the unwrapped model, so the average has the detector's own keys.
    ema = ModelEma(model, decay=t.ema.decay, warmup_steps=t.ema.warmup_steps) if t.ema.enabled else None
    return TrainState(model, optimizer, scheduler, precision.grad_scaler(), batches, plan=plan, ema=ema,
                      evaluate_ema=t.ema.evaluate == "ema")


def _distributed(run: Run, model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when the run has several processes."""
    if run.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
        find_unused_parameters=not run.cfg.data.train.filter_empty,
    )


# -- final outputs --------------------------------------------------------------------------------
def _final_checkpoint_and_evaluation(run: Run, loop: TrainLoop, val_set: Any, label_to_cat_id: Any,
                                     seconds: float) -> dict[str, float]:
    """``model_final.pth``, the final evaluation (``metrics.json``, ``results.json``, ``predictions.png``)
    and ``model_best.pth`` when it beats the best periodic evaluation."""
    state = loop.state
    snapshot = loop.snapshot()
    if run.main:
        final = loop.checkpointer.save("model_final", snapshot)
        run.log(f"training done in {format_duration(seconds)}; saved {final}")
    if val_set is None:
        run.log("no validation set configured (data.val.ann_file); skipping evaluation")
        return {}
    metrics = evaluate(run, state.evaluation_model(), val_set, label_to_cat_id, tag="final", write_outputs=True)
    if loop.jsonl is not None:
        loop.jsonl.write({"type": "eval", "iteration": state.iteration, **metrics})
    if run.main and improved(metrics.get("bbox/AP"), state.best_metric):
        state.best_metric = metrics["bbox/AP"]
        loop.checkpointer.save("model_best", {**snapshot, "best_metric": state.best_metric}, update_last=False)
    return metrics


def _final_outputs(run: Run, metrics: dict[str, float] | None, *, iterations: int, seconds: float, images: int) -> None:
    """Rank 0: ``metrics.json`` with the training figures added (when evaluated) and ``curves.png``."""
    if metrics is not None:
        from .coco_eval import write_metrics

        write_metrics(run.output_dir / "metrics.json", {
            **metrics, "train/iterations": iterations, "train/seconds": seconds,
            "train/img_per_s": images / max(seconds, 1e-9),
        })
    from .visualize import save_curves

    curves = save_curves(read_jsonl(run.output_dir / "metrics.jsonl"), run.output_dir / "curves.png")
    if curves is not None:
        run.log(f"wrote {curves}")


# -- evaluation only ------------------------------------------------------------------------------
def evaluate_only(
    cfg: ExperimentConfig,
    weights: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
    optimize: str | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint on ``cfg``'s validation set; writes ``config.yaml``, ``metrics.json``,
    ``results.json`` and ``predictions.png`` into an evaluation folder and returns the metrics.

    The folder is ``output_dir`` if given, else ``eval/`` next to ``weights``; a folder that holds a
    training run (``metrics.jsonl``, ``last_checkpoint`` or checkpoints) gets an ``eval/`` subfolder
    instead, so a training run's files are never replaced. The folder used is logged.

    ``optimize`` (``"fp32"``, ``"bf16"`` or ``"fp16"``) evaluates the model that
    :func:`detection.optimize_for_inference` returns at that backbone precision. ``eval.tta`` (flips,
    scales) wraps the model that is evaluated in a :class:`detection.tta.TTADetector`.

    ``weights`` is one of our checkpoints (its stored category mapping is used) or a torchvision
    detector state dict. A torchvision COCO model predicts original COCO category ids as labels, so
    when the model has ``max(category id) + 1`` classes and the checkpoint stores no mapping, labels
    are taken to be category ids.
    """
    weights = Path(weights).expanduser()
    folder = evaluation_dir(weights, output_dir)
    run = Run(cfg, folder, log)
    run.log(f"evaluation outputs go to {folder}")
    try:
        return _evaluate_only(run, weights, optimize)
    finally:
        dist.cleanup()


def evaluation_dir(weights: Path, output_dir: str | os.PathLike[str] | None) -> Path:
    """Where :func:`evaluate_only` writes: ``output_dir`` (or ``weights``' folder) unless it holds a
    training run, then its ``eval/`` subfolder."""
    folder = Path(output_dir).expanduser() if output_dir is not None else weights.parent
    training = folder.is_dir() and any((folder / name).exists() for name in ("metrics.jsonl", "last_checkpoint")) \
        or any(folder.glob("model_*.pth"))
    return folder / "eval" if training or output_dir is None else folder


def _evaluate_only(run: Run, weights: Path, optimize: str | None = None) -> dict[str, float]:
    from .run import load_run
    from .weights import num_classes_in_state_dict

    cfg = run.cfg
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    paths = data_paths(run)
    if paths.get("val_ann") is None:
        raise ConfigError("evaluation needs data.val.ann_file and data.val.img_dir (or data.source: shapes)")
    loaded = load_run(weights, config=cfg, device=run.device, log=lambda line: None)
    _, val_set = build_datasets(run, paths, train=False, categories=loaded.categories)
    categories = val_set.categories
    num_classes = num_classes_in_state_dict(loaded.model.state_dict()) or categories.num_classes
    label_to_cat: Any = categories.to_cat_id
    if loaded.categories is None and num_classes == max(c["id"] for c in val_set.coco.dataset["categories"]) + 1 \
            and num_classes != categories.num_classes:
        run.log(f"{weights} stores no category mapping and has {num_classes} classes = max category id + 1: "
                "treating predicted labels as COCO category ids (torchvision's COCO models)")
        label_to_cat = {i: i for i in range(1, num_classes)}
    model = loaded.model
    run.log(f"loaded {weights}")
    if optimize is not None:
        from .inference import optimize_for_inference

        model = optimize_for_inference(model, precision=optimize)  # type: ignore[arg-type]
        run.log(f"fast inference path: BN folded, channels-last backbone, {optimize} backbone/FPN")
    return evaluate(run, model, val_set, label_to_cat, tag=str(weights), write_outputs=True, tta=True)
