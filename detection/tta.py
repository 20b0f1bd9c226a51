"""Test-time augmentation: a detector run on flipped and rescaled views of each image, the views merged.

:class:`TTADetector` wraps a detector from :func:`detection.build_detector` (any torchvision
``GeneralizedRCNN``, ``RetinaNet`` or ``FCOS``), optionally inside the
:class:`~detection.inference.AutocastDetector` that :func:`detection.optimize_for_inference`
returns. Following detectron2's ``GeneralizedRCNNWithTTA``:

1. each view resizes the image to its own shorter side (``scales``; the model's size when none are
   given) and, with ``flip``, runs a second time on the mirrored image. Each view has its own
   ``GeneralizedRCNNTransform`` (the model's mean, std and padding), built once; the wrapped
   detector is never modified;
2. the detector's parts (backbone, RPN and box head; or the one-stage head) give each view's
   detections, which are mapped back to the original image (resized back, mirrored back);
3. the union is merged with per-class NMS (``torchvision.ops.batched_nms`` at the model's NMS IoU),
   keeping the model's ``detections_per_img`` best;
4. masks: the mask head runs on the merged boxes in every view (mapped into it, mirrored when the
   view is); the mask probabilities are mirrored back, averaged, and then pasted into the image;
5. keypoints: likewise the keypoint head's heatmaps of every view are averaged (a mirrored view's
   heatmaps mirrored back with left and right keypoints swapped, :data:`COCO_KEYPOINT_FLIP_MAP` for
   COCO's 17) and decoded once.

Boxes, scores, masks and keypoints come out float32, also under autocast. With no flip and the
model's own size as the only scale, the outputs equal the plain model's.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import keypointrcnn_inference, maskrcnn_inference
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms

from ._torchvision import resize_boxes, resize_keypoints
from .heads import upcast_reduced
from .inference import AutocastDetector

__all__ = ["COCO_KEYPOINT_FLIP_MAP", "TTADetector"]

Prediction = dict[str, Tensor]
Size = tuple[int, int]

#: For each of COCO's 17 person keypoints, the index of its mirror image (nose, eyes, ears, shoulders,
#: elbows, wrists, hips, knees, ankles; left and right swapped).
COCO_KEYPOINT_FLIP_MAP: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


@dataclass
class _ViewOutput:
    """One view's results for a batch: per image, the boxes in the view's pixels and the detections
    (boxes in the original image's pixels); the feature maps where a mask or keypoint head reads them."""

    image_sizes: list[Size]
    view_boxes: list[Tensor]
    detections: list[Prediction]
    features: OrderedDict[str, Tensor] | None


@dataclass
class _Merged:
    """One image's merged detections, and for each the view it came from and its box in that view."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    source: Tensor
    source_boxes: Tensor


def _flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """xyxy boxes mirrored in an image ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _check_flip_map(flip_map: Sequence[int], num: int, default: bool) -> None:
    """Raise ``ValueError`` unless ``flip_map`` swaps pairs among ``num`` keypoints."""
    if len(flip_map) != num:
        if default:
            raise ValueError(f"flip TTA of a model with {num} keypoints needs keypoint_flip_map (the index of each "
                             f"keypoint's mirror image); the default is COCO's, for 17")
        raise ValueError(f"keypoint_flip_map has {len(flip_map)} entries but the model predicts {num} keypoints")
    if sorted(flip_map) != list(range(num)) or any(flip_map[j] != i for i, j in enumerate(flip_map)):
        raise ValueError(f"keypoint_flip_map must swap pairs among the model's {num} keypoints (a permutation of "
                         f"0..{num - 1} that is its own inverse); got {list(flip_map)}")


def _view_transform(transform: GeneralizedRCNNTransform, scale: int) -> GeneralizedRCNNTransform:
    """``transform`` resizing to shorter side ``scale``, its longer-side cap scaled alike."""
    min_size = transform.min_size[-1]
    return type(transform)(scale, round(transform.max_size * scale / min_size), transform.image_mean,
                           transform.image_std, size_divisible=transform.size_divisible,
                           fixed_size=transform.fixed_size, _skip_resize=transform._skip_resize)


class TTADetector(nn.Module):
    """A detector evaluated on flipped and rescaled views of each image, the detections merged.

    Args:
        model: a detector from :func:`detection.build_detector` (torchvision ``FasterRCNN``,
            ``MaskRCNN``, ``KeypointRCNN``, ``RetinaNet`` or ``FCOS``), or the
            :class:`~detection.inference.AutocastDetector` that
            :func:`detection.optimize_for_inference` returns (its views then run under its autocast).
            It is left unchanged; the wrapper starts in the model's mode (``.eval()`` switches both).
        flip: also run every scale on the horizontally mirrored image.
        scales: shorter image side of each view, in pixels (detectron2's ``TEST.AUG.MIN_SIZES``); each
            view caps the longer side at ``max_size * scale / min_size`` of the model's transform.
            Empty: the model's own (test) ``min_size`` only.
        keypoint_flip_map: for a keypoint model with ``flip``, the index of each keypoint's mirror
            image; default :data:`COCO_KEYPOINT_FLIP_MAP` for 17 keypoints.

    Call it like the detector in eval mode (in training mode it raises ``RuntimeError``):
    ``model(images)`` with ``images`` a list of float ``[3, H, W]`` tensors in [0, 1]. It returns per image ``boxes`` [N, 4] float32 xyxy in input
    pixels, ``scores`` [N] float32, ``labels`` [N] int64 and, where the arch has them, ``masks``
    [N, 1, H, W] float32 in [0, 1] or ``keypoints`` [N, K, 3] and ``keypoints_scores`` [N, K] float32.
    ``N`` is at most the model's ``detections_per_img``. The views' feature maps are kept until the
    mask or keypoint head has run on every view (memory grows with the number of views).

    The wrapped model is the ``model`` attribute (state-dict keys gain a ``model.`` prefix).

    Example:
        >>> tta = TTADetector(build_detector("mask_rcnn", "resnet18", 4, min_size=192), flip=True,
        ...                   scales=(160, 192, 224))  # doctest: +SKIP
        >>> tta([torch.rand(3, 192, 256)])[0]["masks"].shape  # doctest: +SKIP
        torch.Size([N, 1, 192, 256])
    """

    def __init__(self, model: nn.Module, *, flip: bool = False, scales: Sequence[int] = (),
                 keypoint_flip_map: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        detector = self.detector
        if not isinstance(detector, (GeneralizedRCNN, RetinaNet, FCOS)):
            raise TypeError("TTADetector takes a torchvision GeneralizedRCNN, RetinaNet or FCOS detector (from "
                            "detection.build_detector), or an AutocastDetector holding one; got "
                            f"{type(detector).__name__}")
        if not isinstance(detector.transform, GeneralizedRCNNTransform):
            raise TypeError(f"TTADetector needs the detector's transform to be a GeneralizedRCNNTransform; got "
                            f"{type(detector.transform).__name__}")
        sizes = tuple(int(s) for s in scales) or (int(detector.transform.min_size[-1]),)
        if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"TTA scales must be positive pixel sizes without repeats; got {list(scales)}")
        self.scales, self.flip = sizes, bool(flip)
        # The views in order: each scale as is, then mirrored. View 0 is never mirrored.
        views = [(s, f) for s in sizes for f in ((False, True) if flip else (False,))]
        self.view_flips = tuple(f for _, f in views)
        self.view_transforms = nn.ModuleList(_view_transform(detector.transform, s) for s, _ in views)
        self.keypoint_flip_map = self._keypoint_flip_map(keypoint_flip_map)
        self.train(model.training)

    @property
    def detector(self) -> nn.Module:
        """The torchvision detector whose parts run each view (inside the autocast wrapper, if any)."""
        return self.model.detector if isinstance(self.model, AutocastDetector) else self.model

    def _keypoint_flip_map(self, given: Sequence[int] | None) -> tuple[int, ...] | None:
        roi_heads = getattr(self.detector, "roi_heads", None)
        if roi_heads is None or not roi_heads.has_keypoint() or not self.flip:
            return None
        flip_map = COCO_KEYPOINT_FLIP_MAP if given is None else tuple(int(i) for i in given)
        self._default_flip_map = given is None
        # torchvision's predictor says how many keypoints it predicts; any other is checked at its first call.
        lowres = getattr(roi_heads.keypoint_predictor, "kps_score_lowres", None)
        _check_flip_map(flip_map, int(getattr(lowres, "out_channels", len(flip_map))), self._default_flip_map)
        return flip_map

    def describe(self) -> str:
        """One phrase for the log, e.g. ``6 views (shorter side 160, 192, 224 px, each also mirrored) ...``."""
        sizes = ", ".join(str(s) for s in self.scales)
        nms, top = self._nms_settings()
        return (f"{len(self.view_flips)} views (shorter side {sizes} px{', each also mirrored' if self.flip else ''}), "
                f"merged by per-class NMS at IoU {nms:g}, top {top} per image")

    def _nms_settings(self) -> tuple[float, int]:
        owner = getattr(self.detector, "roi_heads", self.detector)
        return float(owner.nms_thresh), int(owner.detections_per_img)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.model.policy.autocast() if isinstance(self.model, AutocastDetector) else contextlib.nullcontext()

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> list[Prediction]:
        if self.training or targets is not None:
            raise RuntimeError("TTADetector is for inference only: call it in eval mode without targets "
                               "(train the wrapped model instead)")
        if not images:
            return []
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        with self._autocast():
            views = [self._detect(v, images, sizes) for v in range(len(self.view_flips))]
        with torch.autocast(images[0].device.type, enabled=False):
            merged = [self._merge(views, i) for i in range(len(images))]
            results = [{"boxes": m.boxes, "labels": m.labels, "scores": m.scores} for m in merged]
        roi_heads = getattr(self.detector, "roi_heads", None)
        if roi_heads is not None and roi_heads.has_mask():
            self._add_masks(views, merged, results, sizes)
        if roi_heads is not None and roi_heads.has_keypoint():
            self._add_keypoints(views, merged, results, sizes)
        return results

    # -- one view -------------------------------------------------------------------------------
    def _detect(self, view: int, images: list[Tensor], sizes: list[Size]) -> _ViewOutput:
        """The view's detections, as the detector's eval forward computes them before postprocessing."""
        detector, flip = self.detector, self.view_flips[view]
        batch, _ = self.view_transforms[view]([img.flip(-1) for img in images] if flip else list(images))
        features = detector.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        if isinstance(detector, GeneralizedRCNN):
            detections = self._rcnn_boxes(batch, features)
            roi_heads = detector.roi_heads
            keep_features = roi_heads.has_mask() or roi_heads.has_keypoint()
        else:
            detections = self._one_stage_boxes(batch, list(features.values()))
            keep_features = False
        view_boxes = [upcast_reduced(d["boxes"]) for d in detections]
        for det, boxes, view_size, size in zip(detections, view_boxes, batch.image_sizes, sizes):
            boxes = resize_boxes(boxes, view_size, size)
            det["boxes"] = _flip_boxes(boxes, size[1]) if flip else boxes
            det["scores"] = upcast_reduced(det["scores"])
        return _ViewOutput(list(batch.image_sizes), view_boxes, detections, features if keep_features else None)

    def _rcnn_boxes(self, batch: ImageList, features: OrderedDict[str, Tensor]) -> list[Prediction]:
        """RPN and box branch of ``RoIHeads.forward`` in eval mode (the mask and keypoint heads run later)."""
        detector = self.detector
        roi_heads = detector.roi_heads
        proposals, _ = detector.rpn(batch, features)
        box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, box_regression = roi_heads.box_predictor(box_features)
        boxes, scores, labels = roi_heads.postprocess_detections(class_logits, box_regression, proposals,
                                                                 batch.image_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]

    def _one_stage_boxes(self, batch: ImageList, features: list[Tensor]) -> list[Prediction]:
        """The eval branch of ``RetinaNet.forward`` / ``FCOS.forward`` (FCOS has one anchor per location)."""
        detector = self.detector
        head_outputs = detector.head(features)
        anchors = detector.anchor_generator(batch, features)
        locations = [x.size(2) * x.size(3) for x in features]
        per_location = head_outputs["cls_logits"].size(1) // sum(locations)
        per_level = [n * per_location for n in locations]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return detector.postprocess_detections(split_outputs, split_anchors, batch.image_sizes)

    # -- merging --------------------------------------------------------------------------------
    def _merge(self, views: list[_ViewOutput], image: int) -> _Merged:
        """Image ``image``'s detections of every view, merged by per-class NMS, best first, top-k."""
        dets = [v.detections[image] for v in views]
        boxes = torch.cat([d["boxes"] for d in dets])
        scores = torch.cat([d["scores"] for d in dets])
        labels = torch.cat([d["labels"] for d in dets])
        source = torch.cat([torch.full_like(d["labels"], v) for v, d in enumerate(dets)])
        source_boxes = torch.cat([v.view_boxes[image] for v in views])
        nms_thresh, top = self._nms_settings()
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:top]
        return _Merged(boxes[keep], scores[keep], labels[keep], source[keep], source_boxes[keep])

    def _rois(self, views: list[_ViewOutput], merged: list[_Merged], view: int, sizes: list[Size]) -> list[Tensor]:
        """Each image's merged boxes in ``view``'s pixels (exactly the view's own box where one came from it)."""
        flip, rois = self.view_flips[view], []
        for m, view_size, size in zip(merged, views[view].image_sizes, sizes):
            boxes = resize_boxes(_flip_boxes(m.boxes, size[1]) if flip else m.boxes, size, view_size)
            rois.append(torch.where((m.source == view)[:, None], m.source_boxes, boxes))
        return rois

    # -- masks and keypoints --------------------------------------------------------------------
    def _add_masks(self, views: list[_ViewOutput], merged: list[_Merged], results: list[Prediction],
                   sizes: list[Size]) -> None:
        """Mask probabilities of the merged boxes in every view, mirrored back and averaged, then pasted."""
        roi_heads = self.detector.roi_heads
        labels = [m.labels for m in merged]
        per_view = []  # [view][image] -> (N, 1, M, M) probabilities
        for v, out in enumerate(views):
            with self._autocast():
                features = roi_heads.mask_roi_pool(out.features, self._rois(views, merged, v, sizes), out.image_sizes)
                logits = upcast_reduced(roi_heads.mask_predictor(roi_heads.mask_head(features)))
            probs = maskrcnn_inference(logits, labels)
            per_view.append([p.flip(-1) for p in probs] if self.view_flips[v] else probs)
        with torch.autocast(results[0]["boxes"].device.type, enabled=False):
            for i, (result, size) in enumerate(zip(results, sizes)):
                mean = torch.stack([probs[i] for probs in per_view]).mean(dim=0)
                # The model's own postprocess pastes the masks; the boxes are already in the image's pixels.
                pasted = self.detector.transform.postprocess([{"boxes": result["boxes"], "masks": mean}], [size], [size])
                result["masks"] = pasted[0]["masks"]

    def _add_keypoints(self, views: list[_ViewOutput], merged: list[_Merged], results: list[Prediction],
                       sizes: list[Size]) -> None:
        """Keypoint heatmaps of the merged boxes in every view, mirrored back and averaged, decoded in view 0."""
        roi_heads = self.detector.roi_heads
        per_view = []  # [view] -> (all images' N, K, 56, 56) heatmaps
        for v, out in enumerate(views):
            with self._autocast():
                features = roi_heads.keypoint_roi_pool(out.features, self._rois(views, merged, v, sizes),
                                                       out.image_sizes)
                heatmaps = upcast_reduced(roi_heads.keypoint_predictor(roi_heads.keypoint_head(features)))
            if self.view_flips[v]:
                _check_flip_map(self.keypoint_flip_map, heatmaps.shape[1], self._default_flip_map)
                heatmaps = heatmaps.flip(-1)[:, list(self.keypoint_flip_map)]
            per_view.append(heatmaps)
        # Decoded against the boxes of view 0 (never mirrored), as the plain model decodes, then resized back.
        with torch.autocast(per_view[0].device.type, enabled=False):
            mean = torch.stack(per_view).mean(dim=0)
            keypoints, scores = keypointrcnn_inference(mean, self._rois(views, merged, 0, sizes))
        for result, kps, kp_scores, view_size, size in zip(results, keypoints, scores, views[0].image_sizes, sizes):
            result["keypoints"] = resize_keypoints(kps, view_size, size)
            result["keypoints_scores"] = kp_scores
