"""COCO evaluation: torchvision detector outputs → COCO results → COCOeval metrics.

The pieces, from the bottom up:

- :func:`predictions_to_coco_results` turns one image's torchvision output (``boxes`` xyxy, ``scores``,
  contiguous ``labels`` 1..K, optional ``masks`` and ``keypoints``) into COCO result dicts with the
  original category ids, ``bbox`` in xywh and masks as compressed RLE.
- :func:`evaluate_coco_results` scores a list of COCO result dicts (or a results JSON file written by any
  detector) against a COCO annotation file with ``COCOeval`` for ``"bbox"``, ``"segm"`` and
  ``"keypoints"``. It prints pycocotools' 12-line summary and a per-category AP table and returns a flat
  dict of metrics in percent, as detectron2 reports them (``bbox/AP``, ``bbox/AP50``, ...,
  ``bbox/AP-person``).
- :class:`CocoEvaluator` collects outputs during an evaluation loop, gathers them across ranks and calls
  :func:`evaluate_coco_results`.
- :func:`write_metrics` / :func:`write_results` write JSON atomically.

The implementation lives in :mod:`detection.evaluation` (one module per piece); this module is its
public face.

pycocotools (and the optional ``faster-coco-eval``) are imported inside the functions that need them, so
importing this module costs nothing on a machine without them.

Example::

    evaluator = CocoEvaluator("annotations/instances_val2017.json", label_to_cat_id, ("bbox", "segm"))
    for images, targets in loader:
        outputs = model(images)
        evaluator.update({int(t["image_id"]): o for t, o in zip(targets, outputs)})
    evaluator.synchronize()
    metrics = evaluator.evaluate()  # {"bbox/AP": 37.9, ..., "segm/AP-person": 46.1}
"""

from __future__ import annotations

from . import evaluation
from .archs import IOU_TYPES
from .evaluation import *  # noqa: F403 - this module is the public face of the package

__all__ = ["IOU_TYPES", *evaluation.__all__]
