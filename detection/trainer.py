"""Run an experiment from its config: data, model, training with checkpoints and evaluation, outputs.

``tools/train_det.py`` and ``tools/eval_det.py`` are thin wrappers around :func:`train` and
:func:`evaluate_only`. Everything a run writes goes to its output folder:

* ``config.yaml``: the resolved config (also stored inside every checkpoint);
* ``metrics.jsonl``: one JSON record per log period and per evaluation;
* ``model_0001000.pth`` ..., ``model_best.pth``, ``model_final.pth``, ``last_checkpoint``;
* ``metrics.json``: the final COCO metrics (flat keys such as ``bbox/AP``, in percent);
* ``results.json``: the detections in COCO results format;
* ``predictions.png`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbone import summarize

from . import distributed as dist
from .amp import make_grad_scaler, resolve_amp
from .checkpoint import Checkpointer, capture_rng_state, load_checkpoint, restore_rng_state
from .config import ConfigError, ExperimentConfig, config_to_dict, diff_configs, dump_config
from .engine import NonFiniteLossError, describe_bad_step, run_inference, to_device, train_step
from .logger import JsonlWriter, ProgressLogger, format_duration, read_jsonl
from .models import build_detector
from .solver import build_optimizer, build_scheduler

__all__ = ["ResumeError", "TrainingInterrupted", "build_model", "evaluate_only", "train"]


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with this config."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; a checkpoint was saved first (its path is in ``.checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


# -- pieces ---------------------------------------------------------------------------------------
def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use train.device: auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def build_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The detector that ``cfg.model`` describes, with ``num_classes`` (background included)."""
    m = cfg.model
    options: dict[str, Any] = dict(m.head)
    options["min_size"] = m.min_size
    options["max_size"] = m.max_size
    if m.anchor_sizes is not None:
        options["anchor_sizes"] = m.anchor_sizes
    if m.aspect_ratios is not None:
        options["aspect_ratios"] = m.aspect_ratios
    return build_detector(m.arch, backbone=m.backbone, num_classes=num_classes, **options)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _data_paths(cfg: ExperimentConfig, log: Callable[[str], None]) -> dict[str, Path | None]:
    """Train/val annotation files and image folders; generates the built-in shapes dataset if asked."""
    if cfg.data.source == "shapes":
        from .data import ensure_shapes_dataset

        s = cfg.data.shapes
        kwargs = dict(
            num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
            min_objects=s.min_objects, max_objects=s.max_objects, size_range=tuple(s.size_range),
            distractors=tuple(s.distractors), min_visible=s.min_visible,
        )
        cache = Path(os.path.expanduser(s.cache_dir))
        if dist.is_main_process():
            t0 = time.perf_counter()
            paths = ensure_shapes_dataset(cache, **kwargs)
            log(f"shapes dataset ready in {time.perf_counter() - t0:.1f}s: {paths['train_ann'].parent.parent}")
        dist.barrier()
        paths = ensure_shapes_dataset(cache, **kwargs)
        return {"train_ann": paths["train_ann"], "train_img": paths["train_img_dir"],
                "val_ann": paths.get("val_ann"), "val_img": paths.get("val_img_dir")}
    out: dict[str, Path | None] = {}
    for split in ("train", "val"):
        ds = getattr(cfg.data, split)
        for key, value in (("ann", ds.ann_file), ("img", ds.img_dir)):
            if value is None:
                out[f"{split}_{key}"] = None
                continue
            path = Path(os.path.expanduser(value))
            if not path.exists():
                what = "annotation file" if key == "ann" else "image folder"
                raise FileNotFoundError(f"data.{split}.{'ann_file' if key == 'ann' else 'img_dir'}: {what} not found: {path}")
            out[f"{split}_{key}"] = path
    return out


class _ResumableBatches:
    """Wraps the training batch sampler so the first batches of an epoch can be skipped on resume,
    without reading their images (per-sample augmentation seeds keep their positions)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def _train_loader(dataset: Any, cfg: ExperimentConfig, world: int, rank: int) -> tuple[torch.utils.data.DataLoader, _ResumableBatches]:
    from .data import build_dataloader

    base = build_dataloader(
        dataset, batch_size=cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        num_replicas=world, rank=rank, aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
    )
    batches = _ResumableBatches(base.batch_sampler)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=base.collate_fn, num_workers=base.num_workers,
        worker_init_fn=base.worker_init_fn, generator=base.generator, persistent_workers=base.persistent_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, batches


class _Run:
    """State shared by training and evaluation of one experiment."""

    def __init__(self, cfg: ExperimentConfig, output_dir: str | os.PathLike[str] | None, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log_fn = log
        self.device = select_device(cfg.train.device)
        self.rank, self.world, local_rank = dist.init_from_env(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        self.main = self.rank == 0
        self.output_dir = Path(output_dir if output_dir is not None else cfg.output_dir).expanduser()
        if cfg.train.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        _seed_everything(cfg.train.seed + self.rank)
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")

    def log(self, message: str) -> None:
        if self.main:
            self.log_fn(message)

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, val_set: Any, label_to_cat_id: Any, *, tag: str, iteration: int | None = None,
                 write_outputs: bool = False) -> dict[str, float]:
        from .coco_eval import CocoEvaluator, write_metrics, write_results
        from .data import build_dataloader

        cfg = self.cfg
        loader = build_dataloader(
            val_set, batch_size=cfg.eval.batch_size, train=False, num_workers=cfg.data.num_workers,
            num_replicas=self.world, rank=self.rank, aspect_ratio_grouping=False,
        )
        iou_types = cfg.eval.resolved_iou_types(cfg.model.arch)
        names = {c["id"]: c["name"] for c in val_set.coco.dataset["categories"]}
        evaluator = CocoEvaluator(val_set.coco, label_to_cat_id, iou_types, backend=cfg.eval.backend,
                                  class_names=names, log=self.log)
        keep_vis = cfg.eval.num_vis_images if (write_outputs and self.main) else 0
        vis: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        threshold = cfg.eval.score_threshold

        def on_batch(images: list, targets: list, outputs: list) -> None:
            preds = {}
            for image, target, out in zip(images, targets, outputs):
                if threshold > 0:
                    keep = out["scores"] >= threshold
                    out = {k: v[keep] for k, v in out.items()}
                preds[int(target["image_id"])] = out
                if len(vis) < keep_vis:
                    vis.append((image, out))
            evaluator.update(preds)

        limit = cfg.eval.max_images
        total = min(len(val_set), limit) if limit else len(val_set)
        self.log(f"evaluating on {total} images ({tag}) ...")
        t0 = time.perf_counter()
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        eval_on, eval_dtype, _ = resolve_amp(cfg.eval.amp.enabled, cfg.eval.amp.dtype, self.device)
        eval_amp = dataclasses.replace(cfg.eval.amp, enabled=eval_on, dtype=eval_dtype)
        run_inference(inner, loader, self.device, eval_amp, on_batch=on_batch,
                      max_images=None if limit is None else -(-limit // self.world), total_images=total, log=self.log)
        evaluator.synchronize()
        metrics = evaluator.evaluate() if self.main else {}
        self.log(f"evaluation took {format_duration(time.perf_counter() - t0)}")
        if self.main and write_outputs:
            write_metrics(self.output_dir / "metrics.json", metrics)
            write_results(self.output_dir / "results.json", evaluator.results)
            if vis:
                from .visualize import save_prediction_grid

                class_names = ["__background__"] + [names.get(_cat(label_to_cat_id, k), str(k)) for k in range(1, 1 + max(
                    (int(o["labels"].max()) for _, o in vis if len(o["labels"])), default=0))]
                path = save_prediction_grid([v[0] for v in vis], [v[1] for v in vis], class_names,
                                            self.output_dir / "predictions.png")
                self.log(f"wrote {path}")
        return metrics


def _cat(mapping: Any, label: int) -> int:
    try:
        return mapping(label) if callable(mapping) else mapping[label]
    except (KeyError, ValueError, IndexError):
        return -1


def _datasets(run: _Run, paths: Mapping[str, Path | None], *, train: bool, categories: Any = None) -> tuple[Any, Any]:
    from .data import CocoDetection, build_transforms

    cfg = run.cfg
    with_masks = cfg.model.arch.startswith("mask_rcnn")
    train_set = None
    if train:
        transforms = build_transforms(cfg.data.train.augment, train=True) if cfg.data.train.augment else None
        train_set = CocoDetection(paths["train_ann"], paths["train_img"], train=True, transforms=transforms,
                                  filter_empty=cfg.data.train.filter_empty, with_masks=with_masks,
                                  on_bad_image=cfg.data.on_bad_image, category_mapping=categories)
        categories = train_set.categories
        if len(train_set) == 0:
            raise ValueError(f"{paths['train_ann']}: no training images left after filtering images without annotations")
    val_set = None
    if paths.get("val_ann") is not None:
        val_set = CocoDetection(paths["val_ann"], paths["val_img"], train=False, with_masks=False,
                                on_bad_image=cfg.data.on_bad_image, category_mapping=categories)
    return train_set, val_set


def _resolve_resume(run: _Run, resume: str | os.PathLike[str] | bool | None) -> Path | None:
    if not resume:
        return None
    if resume is True:
        found = Checkpointer(run.output_dir).last()
        if found is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {run.output_dir} (no last_checkpoint file or model_*.pth); "
                "give a path (--resume PATH) or start without --resume"
            )
        return found
    return Path(resume).expanduser()


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
            Model, optimizer, scheduler, scaler, iteration and RNG states are restored, so the run
            continues exactly; a checkpoint whose ``model`` config differs is refused.
        weights: initial model weights (a detector state dict file, ours or torchvision's).
        log: where progress text goes (rank 0 only).

    Raises:
        NonFiniteLossError: ``train.max_bad_steps`` consecutive steps had non-finite losses.
        TrainingInterrupted: Ctrl-C; a checkpoint was saved before raising.
    """
    cfg.data.validate_for_training()
    run = _Run(cfg, output_dir, log)
    try:
        return _train(run, resume, weights)
    finally:
        dist.cleanup()


def _train(run: _Run, resume: str | os.PathLike[str] | bool | None, weights: str | os.PathLike[str] | None) -> dict[str, float]:
    cfg, device = run.cfg, run.device
    resume_path = _resolve_resume(run, resume)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    if ckpt is not None:
        differences = diff_configs(ckpt["config"].get("model", {}), config_to_dict(cfg)["model"], prefix="model")
        if differences:
            raise ResumeError(
                f"cannot resume from {resume_path}: its model config differs from this run's:\n  "
                + "\n  ".join(differences)
                + "\n(left: checkpoint, right: this run). Use the checkpoint's config.yaml, or start a new output folder."
            )

    paths = _data_paths(cfg, run.log)
    from .data import CategoryMapping

    saved_categories = CategoryMapping.from_state_dict(ckpt["categories"]) if ckpt and ckpt.get("categories") else None
    train_set, val_set = _datasets(run, paths, train=True, categories=saved_categories)
    categories = train_set.categories
    num_classes = cfg.model.num_classes or categories.num_classes
    if num_classes < categories.num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} is too small for {categories.num_classes - 1} categories in "
            f"{paths['train_ann']} (+1 for background); remove model.num_classes to use the dataset's count"
        )

    model = build_model(cfg, num_classes)
    if weights:
        from .weights import load_weights

        load_weights(model, weights)
        run.log(f"loaded initial weights from {weights}")
    if run.world > 1 and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if cfg.train.channels_last:
        # Images arrive as a list of (C, H, W) tensors; the model batches them, so convert the batch
        # where it enters the backbone.
        from .inference import channels_last_input

        channels_last_input(model.backbone)

    loader, batches = _train_loader(train_set, cfg, run.world, run.rank)
    iters_per_epoch = len(batches.sampler)
    max_iters = cfg.train.max_iters or cfg.train.epochs * iters_per_epoch
    lr = cfg.train.optimizer.scaled_lr(cfg.train.batch_size, run.world)
    optimizer = build_optimizer(model, cfg.train.optimizer, lr)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, max_iters, iters_per_epoch)
    amp_on, amp_dtype, amp_reason = resolve_amp(cfg.train.amp.enabled, cfg.train.amp.dtype, device)
    amp = dataclasses.replace(cfg.train.amp, enabled=amp_on, dtype=amp_dtype)
    scaler = make_grad_scaler(device, amp.enabled, amp.dtype)
    start_iter, best = 0, -math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = int(ckpt["iteration"])
        best = float(ckpt.get("best_metric", -math.inf))
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == run.world:
            restore_rng_state(rng[run.rank])
        elif rng:
            warnings.warn(f"checkpoint was saved with {len(rng)} process(es), this run has {run.world}; "
                          "random streams restart from rank 0's state", stacklevel=2)
            restore_rng_state(rng[0])
        run.log(f"resumed from {resume_path} at iteration {start_iter}")

    ddp_model: nn.Module = model
    if run.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not cfg.data.train.filter_empty,
        )
    checkpointer = Checkpointer(run.output_dir, keep_last=cfg.train.keep_last)
    jsonl = JsonlWriter(run.output_dir / "metrics.jsonl") if run.main else None
    model.train()
    run.log(
        f"training {cfg.model.arch} on {cfg.model.backbone.name}: {len(train_set)} images, {num_classes - 1} classes, "
        f"{run.world} process(es) x {cfg.train.batch_size} images, {max_iters} iterations "
        f"({iters_per_epoch} per epoch), device {device}, amp {amp.dtype if amp.enabled else 'off'} ({amp_reason})"
    )
    run.log(summarize(model))

    def state(iteration: int, epoch: int, *, collective: bool = True) -> dict[str, Any]:
        """Everything needed to resume; with ``collective`` every rank must call it (RNG states are gathered)."""
        rngs = dist.all_gather_object(capture_rng_state()) if collective else [capture_rng_state()]
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "iteration": iteration, "epoch": epoch, "rng": rngs,
            "config": config_to_dict(cfg), "categories": categories.state_dict(), "best_metric": best,
        }

    progress = ProgressLogger(max_iters, start_iter, cfg.train.log_period, device, cfg.train.batch_size * run.world,
                              enabled=run.main)
    iteration, epoch = start_iter, start_iter // iters_per_epoch
    bad_steps, micro = 0, 0
    no_sync = getattr(ddp_model, "no_sync", None)
    t_start = time.perf_counter()
    window: dict[str, list[float]] = {}  # finite losses since the last report, averaged when logged
    try:
        while iteration < max_iters:
            batches.set_epoch(epoch, skip=iteration - epoch * iters_per_epoch)
            skipped_in_epoch = 0
            for images, targets, skipped in loader:
                skipped_in_epoch += len(skipped)
                if images:
                    imgs, tgts = to_device(images, targets, device)
                    result = train_step(
                        ddp_model, imgs, tgts, optimizer=optimizer, scaler=scaler, amp=amp, device=device,
                        accumulate_steps=cfg.train.accumulate_grad_steps, micro_step=micro,
                        clip_grad_norm=cfg.train.clip_grad_norm,
                        all_ranks_finite=lambda ok: not dist.any_rank(not ok, device), no_sync=no_sync,
                    )
                    micro = (micro + 1) % cfg.train.accumulate_grad_steps
                    if not result.finite:
                        bad_steps += 1
                        micro = 0
                        ids = [int(t["image_id"]) for t in targets]
                        message = describe_bad_step(iteration + 1, result.losses, ids, bad_steps, cfg.train.max_bad_steps)
                        if bad_steps >= cfg.train.max_bad_steps:
                            raise NonFiniteLossError(message + "; stopping. Lower train.optimizer.lr, enable "
                                                     "train.clip_grad_norm, or check these images' annotations.")
                        progress.newline()
                        run.log("warning: skipped step, " + message)
                    else:
                        bad_steps = 0
                        for k, v in result.losses.items():
                            window.setdefault(k, []).append(v)
                iteration += 1
                with warnings.catch_warnings():
                    # The schedule follows iterations, also when a skipped (non-finite) step made no update.
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                    scheduler.step()
                if iteration % cfg.train.log_period == 0 or iteration == max_iters:
                    losses = dist.reduce_mean({k: torch.tensor(sum(v) / len(v)) for k, v in window.items()})
                    window = {}
                    record = progress.update(iteration, losses, optimizer.param_groups[0]["lr"], force=True)
                    if jsonl is not None and record is not None:
                        jsonl.write({"type": "train", "epoch": epoch, **record})
                if cfg.train.checkpoint_period and iteration % cfg.train.checkpoint_period == 0 and iteration < max_iters:
                    snapshot = state(iteration, epoch)
                    if run.main:
                        checkpointer.save_numbered(iteration, snapshot)
                if cfg.train.eval_period and iteration % cfg.train.eval_period == 0 and iteration < max_iters and val_set is not None:
                    progress.newline()
                    metrics = run.evaluate(ddp_model, val_set, categories.to_cat_id, tag=f"iteration {iteration}", iteration=iteration)
                    if jsonl is not None:
                        jsonl.write({"type": "eval", "iteration": iteration, **_finite(metrics)})
                    score = dist.all_gather_object(metrics.get("bbox/AP", -math.inf))[0]  # rank 0 holds the metrics
                    if score > best:
                        best = score
                        snapshot = state(iteration, epoch)
                        if run.main:
                            checkpointer.save("model_best", snapshot, update_last=False)
                    model.train()
                if iteration >= max_iters:
                    break
            total_skipped = int(sum(dist.all_gather_object(skipped_in_epoch)))
            if total_skipped:
                progress.newline()
                run.log(f"epoch {epoch}: skipped {total_skipped} unreadable image(s) in total (data.on_bad_image: skip)")
            epoch += 1
    except KeyboardInterrupt:
        progress.newline()
        path = None
        if run.main:
            # No collective calls here: other ranks may already be gone.
            snapshot = state(iteration, iteration // iters_per_epoch, collective=False)
            path = checkpointer.save_numbered(iteration, snapshot)
        message = f"interrupted at iteration {iteration}; checkpoint saved to {path}. Continue with --resume."
        run.log(message)
        if jsonl is not None:
            jsonl.close()
        raise TrainingInterrupted(message, path) from None

    train_seconds = time.perf_counter() - t_start
    snapshot = state(iteration, epoch)
    if run.main:
        final = checkpointer.save("model_final", snapshot)
        run.log(f"training done in {format_duration(train_seconds)}; saved {final}")
    metrics: dict[str, float] = {}
    if val_set is not None:
        metrics = run.evaluate(ddp_model, val_set, categories.to_cat_id, tag="final", iteration=iteration, write_outputs=True)
        if jsonl is not None:
            jsonl.write({"type": "eval", "iteration": iteration, **_finite(metrics)})
        if run.main and metrics.get("bbox/AP", -math.inf) > best:
            best = metrics["bbox/AP"]
            checkpointer.save("model_best", {**snapshot, "best_metric": best}, update_last=False)
    else:
        run.log("no validation set configured (data.val.ann_file); skipping evaluation")
    if run.main:
        images_seen = (iteration - start_iter) * cfg.train.batch_size * run.world
        extra = {"train/iterations": iteration, "train/seconds": train_seconds,
                 "train/img_per_s": images_seen / max(train_seconds, 1e-9)}
        if val_set is not None:
            from .coco_eval import write_metrics

            write_metrics(run.output_dir / "metrics.json", {**metrics, **extra})
        if jsonl is not None:
            jsonl.close()
        from .visualize import save_curves

        curves = save_curves(read_jsonl(run.output_dir / "metrics.jsonl"), run.output_dir / "curves.png")
        if curves is not None:
            run.log(f"wrote {curves}")
    return metrics


def _finite(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}


# -- evaluation only ------------------------------------------------------------------------------
def evaluate_only(
    cfg: ExperimentConfig,
    weights: str | os.PathLike[str],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
    optimize: str | None = None,
) -> dict[str, float]:
    """Evaluate a checkpoint on ``cfg``'s validation set; writes ``metrics.json``, ``results.json`` and
    ``predictions.png`` into the output folder and returns the metrics.

    ``optimize`` (``"fp32"``, ``"bf16"`` or ``"fp16"``) evaluates through
    :func:`detection.optimize_for_inference` at that backbone precision.

    ``weights`` is one of our checkpoints (its stored category mapping is used) or a torchvision
    detector state dict. A torchvision COCO model predicts original COCO category ids as labels, so
    when the model has ``max(category id) + 1`` classes and the checkpoint stores no mapping, labels
    are taken to be category ids.
    """
    run = _Run(cfg, output_dir, log)
    try:
        return _evaluate_only(run, Path(weights).expanduser(), optimize)
    finally:
        dist.cleanup()


def _evaluate_only(run: _Run, weights: Path, optimize: str | None = None) -> dict[str, float]:
    from backbone import read_checkpoint_and_extras

    from .data import CategoryMapping
    from .weights import load_weights, num_classes_in_state_dict

    cfg = run.cfg
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    paths = _data_paths(cfg, run.log)
    if paths.get("val_ann") is None:
        raise ConfigError("evaluation needs data.val.ann_file and data.val.img_dir (or data.source: shapes)")
    state_dict, saved = read_checkpoint_and_extras(weights)
    categories = CategoryMapping.from_state_dict(saved["categories"]) if saved.get("categories") else None
    _, val_set = _datasets(run, paths, train=False, categories=categories)
    categories = val_set.categories
    cat_ids = [c["id"] for c in val_set.coco.dataset["categories"]]
    num_classes = cfg.model.num_classes or num_classes_in_state_dict(state_dict) or categories.num_classes
    label_to_cat: Any = categories.to_cat_id
    if not saved.get("categories") and num_classes == max(cat_ids) + 1 and num_classes != categories.num_classes:
        run.log(f"{weights} stores no category mapping and has {num_classes} classes = max category id + 1: "
                "treating predicted labels as COCO category ids (torchvision's COCO models)")
        label_to_cat = {i: i for i in range(1, num_classes)}
    model = build_model(cfg, num_classes)
    load_weights(model, state_dict)
    model.to(run.device)
    run.log(f"loaded {weights}")
    if optimize is not None:
        from .inference import optimize_for_inference

        optimize_for_inference(model, precision=optimize)  # type: ignore[arg-type]
        run.log(f"fast inference path: BN folded, channels-last backbone, {optimize} backbone/FPN")
    return run.evaluate(model, val_set, label_to_cat, tag=str(weights), write_outputs=True)
