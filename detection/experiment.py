"""What an experiment runs on: its processes, device and output folder (:class:`Run`), its datasets,
and the training data position (:class:`TrainBatches`) that checkpoints store and resume from."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .archs import arch_spec
from .config import ConfigError, ExperimentConfig, dump_config
from .io import make_output_dir

__all__ = ["Run", "TrainBatches", "build_datasets", "data_paths", "select_device", "train_loader"]


def select_device(name: str) -> torch.device:
    """The device for ``train.device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use train.device: auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


class Run:
    """One process of an experiment: device, rank and world size (from ``torchrun``), output folder, log.

    Creating it joins the process group, seeds ``random``, NumPy and torch with ``train.seed + rank``,
    applies ``train.num_threads`` / ``train.deterministic`` only when the config sets them (and logs
    it), and on rank 0 writes ``config.yaml`` (with ``output_dir`` set to the folder used).
    """

    def __init__(self, cfg: ExperimentConfig, output_dir: str | os.PathLike[str] | None, log: Callable[[str], None]) -> None:
        if output_dir is not None:  # config.yaml (and each checkpoint's config) names the folder actually used
            cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
        self.cfg = cfg
        self.log_fn = log
        self.device = select_device(cfg.train.device)
        self.rank, self.world, local_rank = dist.init_from_env(self.device.type, cfg.train.dist_timeout)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
        self.main = self.rank == 0
        self.output_dir = Path(output_dir if output_dir is not None else cfg.output_dir).expanduser()
        self._apply_process_settings()
        seed = cfg.train.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.main:
            make_output_dir(self.output_dir)
            dump_config(cfg, self.output_dir / "config.yaml")

    def _apply_process_settings(self) -> None:
        t = self.cfg.train
        if t.num_threads and self.device.type == "cpu":
            torch.set_num_threads(t.num_threads)
            self.log(f"torch.set_num_threads({t.num_threads}) (train.num_threads)")
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            self.log("torch.use_deterministic_algorithms(True, warn_only=True) (train.deterministic)")

    def log(self, message: str) -> None:
        if self.main:
            self.log_fn(message)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- data -----------------------------------------------------------------------------------------
def data_paths(run: Run) -> dict[str, Path | None]:
    """Train/val annotation files and image folders; generates the built-in shapes dataset if asked."""
    cfg = run.cfg
    if cfg.data.source == "shapes":
        return _shapes_paths(run)
    out: dict[str, Path | None] = {}
    for split in ("train", "val"):
        ds = getattr(cfg.data, split)
        for key, field, what, value in (("ann", "ann_file", "annotation file", ds.ann_file),
                                        ("img", "img_dir", "image folder", ds.img_dir)):
            path = None if value is None else Path(os.path.expanduser(value))
            if path is not None and not path.exists():
                raise FileNotFoundError(f"data.{split}.{field}: {what} not found: {path}")
            out[f"{split}_{key}"] = path
    for split in ("train", "val"):
        if out[f"{split}_ann"] is not None:
            run.log(f"data.{split}: annotations {out[f'{split}_ann']}, images {out[f'{split}_img']}")
    return out


def _shapes_paths(run: Run) -> dict[str, Path | None]:
    from .data import ensure_shapes_dataset

    shapes = run.cfg.data.shapes
    if run.main:  # rank 0 generates; the others wait, then find it in the cache
        t0 = time.perf_counter()
        paths = ensure_shapes_dataset(config=shapes)
        run.log(f"shapes dataset ready in {time.perf_counter() - t0:.1f}s: {paths['train_ann'].parent.parent}")
    dist.barrier()
    paths = ensure_shapes_dataset(config=shapes)
    return {"train_ann": paths["train_ann"], "train_img": paths["train_img_dir"],
            "val_ann": paths.get("val_ann"), "val_img": paths.get("val_img_dir")}


def build_datasets(run: Run, paths: Mapping[str, Path | None], *, train: bool, categories: Any = None) -> tuple[Any, Any]:
    """``(train_set, val_set)``: ``CocoDetection`` datasets (``None`` where not needed or not configured).

    ``categories`` (a ``CategoryMapping``, e.g. from a checkpoint) fixes the label of each category;
    otherwise the training set's annotation file defines it, and the validation set follows it. When
    evaluation scores ``segm``, the validation file's segmentations are checked as the training file's
    are (``data.on_bad_annotation``), though the validation targets carry no masks.
    """
    from .data import CocoDetection, build_transforms
    from .data.copy_paste import with_copy_paste

    cfg = run.cfg
    checks = dict(on_bad_image=cfg.data.on_bad_image, on_bad_annotation=cfg.data.on_bad_annotation,
                  allow_paths_outside_img_dir=cfg.data.allow_paths_outside_img_dir)
    train_set = None
    if train:
        augment = cfg.data.train.augment
        train_set = CocoDetection(paths["train_ann"], paths["train_img"], train=True,
                                  transforms=build_transforms(augment, train=True) if augment else None,
                                  filter_empty=cfg.data.train.filter_empty, with_masks=arch_spec(cfg.model.arch).masks,
                                  category_mapping=categories, **checks)
        train_set = with_copy_paste(train_set, cfg.data.train.copy_paste)
        categories = train_set.categories
    val_set = None
    if paths.get("val_ann") is not None:
        scores_masks = "segm" in cfg.eval.resolved_iou_types(cfg.model.arch)  # COCOeval decodes the file's masks
        val_set = CocoDetection(paths["val_ann"], paths["val_img"], train=False, with_masks=False,
                                check_masks=scores_masks, category_mapping=categories, **checks)
    return train_set, val_set


def train_loader(run: Run, dataset: Any) -> torch.utils.data.DataLoader:
    """The training ``DataLoader`` (its ``batch_sampler`` shuffles per epoch and shards across ranks)."""
    from .data import build_dataloader

    cfg = run.cfg
    return build_dataloader(
        dataset, batch_size=cfg.train.batch_size, train=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
        num_replicas=run.world, rank=run.rank, aspect_ratio_grouping=cfg.data.aspect_ratio_grouping,
        pin_memory=run.device.type == "cuda",
    )


class TrainBatches:
    """The training loader's position: the epoch and the batches of it already consumed.

    Each batch is one training iteration. ``state_dict()`` is ``{"epoch", "start_batch"}`` (the next
    batch to read); after ``load_state_dict`` the epoch continues from there, the sampler skipping the
    earlier batches without reading their images (per-sample augmentation seeds keep their positions).
    """

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        sampler = loader.batch_sampler
        self.per_epoch: int = sampler.batches_per_epoch
        self.epoch = 0
        self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        if self.consumed >= self.per_epoch:
            return {"epoch": self.epoch + 1, "start_batch": 0}
        return {"epoch": self.epoch, "start_batch": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["start_batch"])

    def position_before_last(self) -> dict[str, int]:
        """The position at which the batch most recently read was the next one (inside :meth:`epoch_batches`)."""
        return {"epoch": self.epoch, "start_batch": max(self.consumed - 1, 0)}

    def position_at(self, iteration: int) -> dict[str, int]:
        """The position after ``iteration`` batches from the start (for checkpoints that store no position)."""
        epoch, batch = divmod(iteration, self.per_epoch)
        return {"epoch": epoch, "start_batch": batch}

    def epoch_batches(self) -> Iterator[Any]:
        """The rest of the current epoch's batches; once they are all read the position moves to the next epoch."""
        for batch in _start_epoch(self.loader, self.epoch, self.consumed):
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0


def _start_epoch(loader: torch.utils.data.DataLoader, epoch: int, start_batch: int) -> Iterator[Any]:
    """Iterate ``loader`` over ``epoch`` from batch ``start_batch`` on."""
    sampler = loader.batch_sampler
    sampler.set_epoch(epoch, start_batch=start_batch)
    return iter(loader)
