"""torchvision detectors on the ``backbone`` package, with a COCO data pipeline, training and evaluation.

Public entry points::

    from detection import build_detector, load_weights
    model = build_detector("mask_rcnn", backbone="resnet50", num_classes=91)
    load_weights(model, "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    model = optimize_for_inference(model)    # BN folded, channels-last: a faster eval-mode model
"""

from .archs import ARCHS
from .inference import optimize_for_inference
from .models import build_detector, feature_info_of
from .weights import load_weights

__all__ = ["ARCHS", "build_detector", "feature_info_of", "load_weights", "optimize_for_inference"]
