"""COCO evaluation of a model during or after training: inference over the validation set, metrics,
and on request the outputs ``metrics.json``, ``results.json`` and ``predictions.png``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .engine import run_inference
from .experiment import Run
from .logger import format_duration
from .precision import PrecisionPolicy

__all__ = ["evaluate"]

Prediction = dict[str, torch.Tensor]
LabelToCatId = Mapping[int, int] | Callable[[int], int]


def evaluate(run: Run, model: nn.Module, val_set: Any, label_to_cat_id: LabelToCatId, *, tag: str,
             write_outputs: bool = False, tta: bool = False) -> dict[str, float]:
    """COCO metrics of ``model`` on ``val_set`` (every rank runs its shard; rank 0 returns them, the others ``{}``).

    Runs at ``eval.amp`` precision. With ``write_outputs`` rank 0 writes ``metrics.json``,
    ``results.json`` and ``predictions.png`` into the output folder. With ``tta`` the model is
    wrapped in a :class:`~detection.tta.TTADetector` when ``eval.tta`` asks for flips or scales.
    """
    from .coco_eval import CocoEvaluator, write_metrics, write_results
    from .data import build_dataloader

    cfg = run.cfg
    loader = build_dataloader(val_set, batch_size=cfg.eval.batch_size, train=False, num_workers=cfg.data.num_workers,
                              num_replicas=run.world, rank=run.rank, aspect_ratio_grouping=False)
    names = {c["id"]: c["name"] for c in val_set.coco.dataset["categories"]}
    evaluator = CocoEvaluator(val_set.coco, label_to_cat_id, cfg.eval.resolved_iou_types(cfg.model.arch),
                              backend=cfg.eval.backend, class_names=names, log=run.log)
    keep_vis = cfg.eval.num_vis_images if (write_outputs and run.main) else 0
    vis: list[tuple[torch.Tensor, Prediction]] = []
    threshold = cfg.eval.score_threshold

    def on_batch(images: list[torch.Tensor], targets: list[dict[str, Any]], outputs: list[Prediction]) -> None:
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
    run.log(f"evaluating on {total} images ({tag}) ...")
    t0 = time.perf_counter()
    precision = PrecisionPolicy.resolve(cfg.eval.amp.enabled, cfg.eval.amp.dtype, run.device)
    model = run.unwrap(model)
    if tta and cfg.eval.tta.enabled:
        from .tta import TTADetector

        model = TTADetector(model, flip=cfg.eval.tta.flip, scales=cfg.eval.tta.scales)
        run.log(f"test-time augmentation: {model.describe()}")
    run_inference(model, loader, run.device, precision, on_batch=on_batch,
                  max_images=None if limit is None else -(-limit // run.world), total_images=total, log=run.log)
    evaluator.synchronize()
    metrics = evaluator.evaluate() if run.main else {}
    run.log(f"evaluation took {format_duration(time.perf_counter() - t0)}")
    if run.main and write_outputs:
        write_metrics(run.output_dir / "metrics.json", metrics)
        write_results(run.output_dir / "results.json", evaluator.results)
        if vis:
            _save_predictions(run, vis, names, label_to_cat_id)
    return metrics


def _save_predictions(run: Run, vis: list[tuple[torch.Tensor, Prediction]], names: Mapping[int, str],
                      label_to_cat_id: LabelToCatId) -> None:
    from .visualize import save_prediction_grid

    top = max((int(out["labels"].max()) for _, out in vis if len(out["labels"])), default=0)
    class_names = ["__background__"] + [names.get(_cat_id(label_to_cat_id, k), str(k)) for k in range(1, top + 1)]
    path = save_prediction_grid([image for image, _ in vis], [out for _, out in vis], class_names,
                                run.output_dir / "predictions.png", score_threshold=run.cfg.eval.vis_score_threshold)
    run.log(f"wrote {path}")


def _cat_id(mapping: LabelToCatId, label: int) -> int:
    try:
        return mapping(label) if callable(mapping) else mapping[label]
    except (KeyError, ValueError, IndexError):
        return -1
