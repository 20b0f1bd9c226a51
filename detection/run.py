"""``load_run``: a finished training run (or one checkpoint file) as a ready-to-use detector.

The counterpart of detectron2's ``DefaultPredictor(cfg)`` and mmdet's ``init_detector(config, checkpoint)``::

    from detection import load_run
    run = load_run("output/quickstart")              # config.yaml + model_final.pth
    run = load_run("output/quickstart/model_best.pth")  # a checkpoint alone: its stored config is used
    out = run.predict(["photo.jpg"], score_threshold=0.5)[0]
    out["boxes"], out["labels"], out["names"], out["scores"]    # out["masks"] for Mask R-CNN
    fast = run.optimize_for_inference()              # BN folded, channels-last: use the returned object

Built from the same pieces as the tools: :func:`detection.trainer.build_model`,
:func:`detection.weights.read_detector_checkpoint` / :func:`~detection.weights.load_weights` and the
checkpoint's :class:`~detection.data.CategoryMapping`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ConfigError, ExperimentConfig, from_dict, load_config

__all__ = ["FINAL_CHECKPOINT", "ImageInput", "LoadedRun", "load_run"]

#: The checkpoint :func:`load_run` reads from a run folder (then the one ``last_checkpoint`` names).
FINAL_CHECKPOINT = "model_final.pth"

#: What :meth:`LoadedRun.predict` accepts per image: a float tensor ``[3, H, W]`` in [0, 1] (uint8
#: tensors are scaled), an image file path, or a numpy ``[H, W, 3]`` uint8 RGB array.
ImageInput = Tensor | np.ndarray | str | os.PathLike


@dataclasses.dataclass
class LoadedRun:
    """A detector loaded from a run, in eval mode on its device, with its class names and config.

    Attributes:
        model: the detector (eval mode).
        config: the run's :class:`~detection.config.ExperimentConfig`.
        class_names: label-indexed names (``class_names[0]`` is ``"__background__"``).
        label_to_cat_id: contiguous label -> COCO category id of the training annotations.
        checkpoint: the file the weights came from.
        device: where the model runs.
        categories: the category mapping the checkpoint stores (``None`` for a plain state dict).
    """

    model: nn.Module
    config: ExperimentConfig
    class_names: list[str]
    label_to_cat_id: Callable[[int], int]
    checkpoint: Path
    device: torch.device
    categories: Any = None

    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, score_threshold: float | None = None, batch_size: int = 1
    ) -> list[dict[str, Any]]:
        """Detect objects; one dict per image, on the CPU, in the image's own pixels.

        Args:
            images: one image or a list of them (see :data:`ImageInput`).
            score_threshold: drop detections scoring below it (default: the config's ``eval.score_threshold``).
            batch_size: images per forward pass.

        Returns:
            Per image: ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2), ``labels`` int64 ``[N]`` in 1..K,
            ``names`` (list of N class names), ``scores`` float ``[N]``, and for mask architectures
            ``masks`` float ``[N, 1, H, W]`` probabilities (torchvision's format; threshold at 0.5).
        """
        if isinstance(images, (Tensor, np.ndarray, str, os.PathLike)):
            images = [images]
        threshold = self.config.eval.score_threshold if score_threshold is None else score_threshold
        tensors = [as_image_tensor(image) for image in images]
        outputs: list[dict[str, Any]] = []
        with torch.inference_mode():
            for start in range(0, len(tensors), batch_size):
                batch = [t.to(self.device) for t in tensors[start : start + batch_size]]
                outputs += [self._finish(out, threshold) for out in self.model(batch)]
        return outputs

    __call__ = predict

    def _finish(self, out: dict[str, Tensor], threshold: float) -> dict[str, Any]:
        keep = out["scores"] >= threshold
        result: dict[str, Any] = {k: v[keep].float().cpu() if v.is_floating_point() else v[keep].cpu()
                                  for k, v in out.items()}
        result["names"] = [self.class_names[int(i)] for i in result["labels"]]
        return result

    def optimize_for_inference(self, precision: str = "fp32") -> LoadedRun:
        """This run with the model of :func:`detection.optimize_for_inference` (in place; use the returned object)."""
        from .inference import optimize_for_inference

        return dataclasses.replace(self, model=optimize_for_inference(self.model, precision=precision))


def as_image_tensor(image: ImageInput) -> Tensor:
    """A float ``[3, H, W]`` tensor in [0, 1] from a tensor, an image file path or an HWC uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        from .data import read_rgb_image

        image = read_rgb_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a numpy [H, W, 3] uint8 RGB image, got {image.dtype} {list(image.shape)}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"expected an image [3, H, W] tensor, a file path or an [H, W, 3] uint8 array, got {shape}")
    return image.float().div(255) if image.dtype == torch.uint8 else image.float()


def load_run(
    path: str | os.PathLike[str],
    *,
    config: ExperimentConfig | str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> LoadedRun:
    """Load a finished run, or one checkpoint, as a :class:`LoadedRun` (model in eval mode).

    Args:
        path: a run folder (its ``config.yaml`` and ``model_final.pth``, else the checkpoint
            ``last_checkpoint`` names), or a checkpoint file (ours, whose stored config is used, or a
            torchvision state dict, which needs ``config``). Use ``path/model_best.pth`` for the best one.
        config: the config to build the model from instead (an ``ExperimentConfig`` or a YAML file).
        overrides: ``--set``-style ``"dotted.key=value"`` strings applied to a YAML config.
        device: where to run (default: the config's ``train.device``).
        log: where the one line about a missing category mapping goes.

    Raises:
        FileNotFoundError: no such folder / file, or a folder without a checkpoint.
        ConfigError: no config to build the model from, or an invalid one.
        backbone.WeightsError: an unreadable file, or weights that do not fit the config's model.
    """
    from .data import CategoryMapping
    from .trainer import build_model
    from .weights import load_weights, num_classes_in_state_dict, read_detector_checkpoint

    checkpoint, folder_config = _locate(Path(path).expanduser())
    state_dict, extras = read_detector_checkpoint(checkpoint)
    cfg = _config(config if config is not None else folder_config, overrides, extras, checkpoint)
    mapping = CategoryMapping.from_state_dict(extras["categories"]) if extras.get("categories") else None
    num_classes = cfg.model.num_classes or num_classes_in_state_dict(state_dict) or (mapping and mapping.num_classes)
    if not num_classes:
        raise ConfigError(f"{checkpoint}: cannot tell the number of classes; set model.num_classes")
    names, to_cat_id = class_labels(mapping, num_classes, str(checkpoint), log)
    from .experiment import select_device

    target = torch.device(device) if device is not None else select_device(cfg.train.device)
    model = load_weights(build_model(cfg, num_classes), state_dict).eval().to(target)
    return LoadedRun(model, cfg, names, to_cat_id, checkpoint, target, mapping)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """``(checkpoint file, the folder's config.yaml or None)`` for a run folder or a checkpoint file."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"no such run folder or checkpoint file: {path}")
    from .checkpoint import Checkpointer

    checkpoint = path / FINAL_CHECKPOINT if (path / FINAL_CHECKPOINT).is_file() else Checkpointer(path).last()
    if checkpoint is None:
        raise FileNotFoundError(f"{path}: no {FINAL_CHECKPOINT} or other checkpoint in this folder; "
                                "pass a checkpoint file instead")
    yaml = path / "config.yaml"
    return checkpoint, yaml if yaml.is_file() else None


def _config(given: ExperimentConfig | str | os.PathLike[str] | None, overrides: Sequence[str],
            extras: dict[str, Any], checkpoint: Path) -> ExperimentConfig:
    if isinstance(given, ExperimentConfig):
        return given
    if given is not None:
        return load_config(given, overrides)
    stored = extras.get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{checkpoint}: the file stores no config; give the config the model was built from "
                          "(load_run(..., config=FILE), or --config FILE)")
    if not overrides:
        return from_dict(ExperimentConfig, stored, source=f"{checkpoint} (stored config)")
    # The loader's own override rules (dotted keys, YAML values, the same strict converter).
    from .config.loader import OVERRIDE_SOURCE, _apply_overrides

    tree, origins = copy.deepcopy(stored), {}
    _apply_overrides(tree, origins, overrides)
    return from_dict(ExperimentConfig, tree, source=f"{checkpoint} (stored config) with {OVERRIDE_SOURCE}",
                     origins=origins)


def class_labels(mapping: Any, num_classes: int, source: str,
                 log: Callable[[str], None] = print) -> tuple[list[str], Callable[[int], int]]:
    """Class names by label, and label -> category id, from a checkpoint's ``CategoryMapping``.

    Without one (e.g. a torchvision checkpoint), labels are named ``class i`` and written as category id
    ``i``; one line says so.
    """
    if mapping is not None:
        return list(mapping.names), mapping.to_cat_id
    k = num_classes - 1
    log(f"{source}: no category mapping stored; labels are named 'class 1'..'class {k}' and written as "
        f"category ids 1..{k}")
    return ["__background__"] + [f"class {i}" for i in range(1, num_classes)], int
