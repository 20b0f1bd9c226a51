"""torchvision detector outputs -> COCO result dicts (original category ids, xywh boxes, RLE masks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

from .checks import to_index

__all__ = ["predictions_to_coco_results"]


def _cat_ids_for(
    labels: list[int], label_to_cat_id: Callable[[int], int] | Mapping[int, int], image_id: int
) -> dict[int, int]:
    table: dict[int, int] = {}
    for label in set(labels):
        if isinstance(label_to_cat_id, Mapping):
            if label not in label_to_cat_id:
                known = sorted(label_to_cat_id)
                span = f"{known[0]}..{known[-1]}" if known else "none"
                raise ValueError(
                    f"label {label} (image_id {image_id}) has no entry in label_to_cat_id, which maps "
                    f"{len(known)} labels ({span}). torchvision labels are contiguous 1..K with 0 for "
                    "background; build the table from the dataset's category ids sorted ascending."
                )
            cat_id = label_to_cat_id[label]
        else:
            cat_id = label_to_cat_id(label)
        table[label] = to_index(cat_id, f"category id of label {label}")
    return table


def _float_cpu(t: Tensor) -> Tensor:
    # Outputs under autocast may be bf16/fp16 (4 px spacing at 512..1024 in bf16): report them in fp32.
    return t.detach().to(device="cpu", dtype=torch.float32)


def predictions_to_coco_results(
    image_id: int,
    prediction: Mapping[str, Tensor],
    label_to_cat_id: Callable[[int], int] | Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Convert one image's torchvision detector output into COCO result dicts.

    Args:
        image_id: the COCO image id (may exceed 2**31; kept as a Python int).
        prediction: torchvision ``GeneralizedRCNN`` output for one image, in original-image pixels:
            ``boxes`` float [N, 4] (x1, y1, x2, y2), ``scores`` float [N], ``labels`` int64 [N] in 1..K,
            optional ``masks`` float [N, 1, H, W] (or [N, H, W]) probabilities in [0, 1], optional
            ``keypoints`` float [N, 17, 3]. Any device and any float dtype (bf16/fp16 from autocast are
            cast to float32 first).
        label_to_cat_id: contiguous label → original COCO category id, as a mapping or a callable.
        mask_threshold: a mask pixel is foreground when its probability is > this value.

    Returns:
        N dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
        ``"segmentation"`` (compressed RLE, ``counts`` as str, JSON-serialisable) when masks are present and
        ``"keypoints"`` (flat [x1, y1, v1, ...]) when keypoints are present. All values are Python types.

    Raises:
        KeyError: a required key is missing from ``prediction``.
        ValueError: shapes disagree, or a label has no category id.

    Example::

        >>> out = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]), "scores": torch.tensor([0.9]),
        ...        "labels": torch.tensor([1])}
        >>> predictions_to_coco_results(42, out, {1: 1})[0]["bbox"]
        [10.0, 20.0, 40.0, 60.0]
    """
    image_id = to_index(image_id, "image_id")
    boxes, scores, labels = _boxes_scores_labels(image_id, prediction)
    n = boxes.shape[0]
    if n == 0:
        return []
    label_list = [int(v) for v in labels.tolist()]
    cat_ids = _cat_ids_for(label_list, label_to_cat_id, image_id)
    xywh = box_convert(boxes, "xyxy", "xywh").tolist()
    results = [
        {"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score}
        for label, box, score in zip(label_list, xywh, scores.tolist(), strict=True)
    ]
    if prediction.get("masks") is not None:
        rles = _mask_rles(image_id, prediction["masks"], n, mask_threshold)
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = rle
    keypoints = prediction.get("keypoints")
    if keypoints is not None:
        keypoints = _float_cpu(keypoints)
        if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
            raise ValueError(
                f"prediction['keypoints'] for image_id {image_id} must be [N, K, 3] with N = {n}, "
                f"got {tuple(keypoints.shape)}"
            )
        for result, kps in zip(results, keypoints.reshape(n, -1).tolist(), strict=True):
            result["keypoints"] = kps
    return results


def _boxes_scores_labels(image_id: int, prediction: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 CPU ``boxes [N, 4]``, ``scores [N]`` and CPU ``labels [N]``, checked."""
    for key in ("boxes", "scores", "labels"):
        if key not in prediction:
            raise KeyError(
                f"prediction for image_id {image_id} has no {key!r}; expected torchvision detector output "
                f"with 'boxes', 'scores', 'labels' (got keys {sorted(prediction)})"
            )
    boxes = _float_cpu(prediction["boxes"])
    scores = _float_cpu(prediction["scores"])
    labels = prediction["labels"].detach().cpu()
    n = boxes.shape[0]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"prediction['boxes'] for image_id {image_id} must be [N, 4], got {tuple(boxes.shape)}"
        )
    if tuple(scores.shape) != (n,) or tuple(labels.shape) != (n,):
        raise ValueError(
            f"prediction for image_id {image_id}: 'scores' {tuple(scores.shape)} and 'labels' "
            f"{tuple(labels.shape)} must both be [N] with N = {n} boxes"
        )
    return boxes, scores, labels


def _mask_rles(image_id: int, masks: Tensor, n: int, threshold: float) -> list[dict]:
    """Compressed RLEs (``counts`` as str) of ``masks > threshold``, ``masks`` [N, 1, H, W] or [N, H, W]."""
    from pycocotools import mask as mask_utils

    shape = tuple(masks.shape)
    masks = _float_cpu(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(
            f"prediction['masks'] for image_id {image_id} must be [N, 1, H, W] with N = {n}, got {shape}"
        )
    # pycocotools wants uint8 [H, W, N] in Fortran order: the memory layout of a C-contiguous
    # [N, W, H], so one transpose copy of the boolean masks is all that is needed.
    binary = (masks > threshold).transpose(1, 2).contiguous().numpy().view(np.uint8)
    rles = mask_utils.encode(binary.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
