"""``CocoEvaluator``: collect detector outputs during an evaluation loop, gather across ranks, score."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checks import check_iou_types, to_index
from .cocoeval import Backend, backend_api, evaluate_coco_results, load_coco_gt
from .results import predictions_to_coco_results

if TYPE_CHECKING:  # pragma: no cover - typing only; pycocotools is imported lazily at run time
    from pycocotools.coco import COCO

__all__ = ["CocoEvaluator"]


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CocoEvaluator:
    """Collects torchvision detector outputs and scores them with COCOeval.

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``, or the path to the annotation JSON; loaded on the
            first :meth:`evaluate`).
        label_to_cat_id: contiguous label (1..K) → COCO category id, as a mapping or a callable.
        iou_types: any of ``"bbox"``, ``"segm"`` (needs ``masks`` in the outputs), ``"keypoints"``.
        backend: ``"pycocotools"`` (default) or ``"faster_coco_eval"`` (optional package).
        class_names: COCO category id → name overrides for the per-category metric keys.
        mask_threshold: mask probability threshold for the RLE masks.
        log: where the evaluation tables go (default ``print``).

    Usage: call :meth:`update` with each batch's outputs, :meth:`synchronize` on every rank once the loop
    is done, then :meth:`evaluate` (the metrics are computed on rank 0; other ranks get ``{}``).
    Only the images passed to :meth:`update` are evaluated, so a partial pass over a dataset is scored on
    the images it saw.
    """

    def __init__(
        self,
        coco_gt: COCO | str | Path,
        label_to_cat_id: Callable[[int], int] | Mapping[int, int],
        iou_types: Sequence[str] = ("bbox",),
        *,
        backend: Backend = "pycocotools",
        class_names: Mapping[int, str] | None = None,
        mask_threshold: float = 0.5,
        log: Callable[[str], None] = print,
    ) -> None:
        self.iou_types = check_iou_types(iou_types)
        backend_api(backend)  # fail now, not after a whole evaluation pass, if the backend is missing
        self.backend = backend
        self.label_to_cat_id = label_to_cat_id
        self.class_names = class_names
        self.mask_threshold = mask_threshold
        self.log = log
        self._coco_gt_source = coco_gt
        self._coco_gt: Any = None
        self._results_by_image: dict[int, list[dict]] = {}
        self._synchronized = True

    def update(self, predictions: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add one batch of outputs.

        Args:
            predictions: image id → torchvision output for that image (see
                :func:`predictions_to_coco_results`). An image id seen before is skipped: distributed
                samplers pad shards by repeating images.

        Raises:
            ValueError: an output lacks ``masks`` (for ``"segm"``) or ``keypoints`` (for ``"keypoints"``).
        """
        needed = {"segm": "masks", "keypoints": "keypoints"}
        for raw_id, prediction in predictions.items():
            image_id = to_index(raw_id, "image id")
            if image_id in self._results_by_image:
                continue
            for iou_type, key in needed.items():
                if (
                    iou_type in self.iou_types
                    and key not in prediction
                    and len(prediction.get("boxes", ())) > 0
                ):
                    raise ValueError(
                        f"iou_types contains {iou_type!r} but the output for image_id {image_id} has no "
                        f"{key!r} (keys: {sorted(prediction)}); use a model that predicts them or drop "
                        f"{iou_type!r} from iou_types"
                    )
            self._results_by_image[image_id] = predictions_to_coco_results(
                image_id, prediction, self.label_to_cat_id, mask_threshold=self.mask_threshold
            )
        self._synchronized = False

    def synchronize(self) -> None:
        """Gather every rank's results (``all_gather_object``); a no-op outside ``torch.distributed``.

        Must be called on every rank. Images seen by several ranks are kept once.
        """
        _, world_size = _dist_info()
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, self._results_by_image)
            merged: dict[int, list[dict]] = {}
            for per_rank in gathered:
                for image_id, results in per_rank.items():
                    merged.setdefault(image_id, results)
            self._results_by_image = merged
        self._synchronized = True

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images seen so far (after :meth:`synchronize`: on all ranks)."""
        return sorted(self._results_by_image)

    @property
    def results(self) -> list[dict]:
        """The COCO result dicts, ordered by image id (for :func:`write_results`)."""
        return [r for image_id in self.image_ids for r in self._results_by_image[image_id]]

    def evaluate(self) -> dict[str, float]:
        """Run COCOeval on the collected results (see :func:`evaluate_coco_results` for the keys).

        Returns:
            The flat metric dict on rank 0 and ``{}`` on the other ranks.

        Raises:
            RuntimeError: running distributed and :meth:`synchronize` was not called after the last update.
        """
        rank, world_size = _dist_info()
        if world_size > 1 and not self._synchronized:
            raise RuntimeError(
                "CocoEvaluator.evaluate() in a distributed run needs the results of every rank: call "
                "synchronize() on all ranks after the last update()"
            )
        if rank != 0:
            return {}
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self._coco_gt_source, self.backend)
        return evaluate_coco_results(
            self._coco_gt,
            self.results,
            self.iou_types,
            backend=self.backend,
            image_ids=self.image_ids or None,
            class_names=self.class_names,
            log=self.log,
        )
