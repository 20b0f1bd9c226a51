"""torchvision detectors on the ``backbone`` package, with a COCO data pipeline, training and evaluation.

Public entry points::

    from detection import build_detector, load_weights
    model = build_detector("mask_rcnn", backbone="resnet50", num_classes=91)
    load_weights(model, "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    model = optimize_for_inference(model)    # BN folded, channels-last: a faster eval-mode model
    model = TTADetector(model, flip=True, scales=(640, 800))   # test-time augmentation, views merged

    from detection import load_run
    run = load_run("output/quickstart")       # a run folder or a checkpoint file: model, names, config
    run.predict(["photo.jpg"], score_threshold=0.5)[0]   # boxes, labels, names, scores (, masks)
"""

from .archs import ARCHS
from .inference import optimize_for_inference
from .models import build_detector, feature_info_of
from .run import LoadedRun, load_run
from .tta import TTADetector
from .weights import load_weights

__all__ = [
    "ARCHS", "LoadedRun", "TTADetector", "build_detector", "feature_info_of", "load_run", "load_weights",
    "optimize_for_inference",
]
