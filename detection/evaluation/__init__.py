"""COCO evaluation of torchvision detectors; :mod:`detection.coco_eval` is the public entry point.

- :mod:`.results`: detector outputs -> COCO result dicts;
- :mod:`.cocoeval`: ground truth, backends and COCOeval -> flat metric dict;
- :mod:`.evaluator`: :class:`CocoEvaluator` for evaluation loops, distributed;
- :mod:`.writing`: ``metrics.json`` and results files;
- :mod:`.checks`, :mod:`.tables`: argument checks and log tables.
"""

from .checks import ResultsError
from .cocoeval import BACKENDS, evaluate_coco_results, load_coco_gt, run_cocoeval
from .evaluator import CocoEvaluator
from .results import predictions_to_coco_results
from .writing import write_metrics, write_results

__all__ = [
    "BACKENDS",
    "CocoEvaluator",
    "ResultsError",
    "evaluate_coco_results",
    "load_coco_gt",
    "predictions_to_coco_results",
    "run_cocoeval",
    "write_metrics",
    "write_results",
]
