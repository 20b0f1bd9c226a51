"""Tests for detection/coco_eval.py: COCO results conversion, COCOeval metrics, gathering, JSON writing."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.coco_eval import (
    CocoEvaluator,
    evaluate_coco_results,
    load_coco_gt,
    predictions_to_coco_results,
    write_metrics,
    write_results,
)

REPO = Path(__file__).resolve().parents[2]
COCO128_ANN = REPO.parent / "shared" / "data" / "coco128-instances" / "annotations" / "instances.json"
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
KP_SUMMARY = ("AP", "AP50", "AP75", "APm", "APl")
HAS_FASTER = importlib.util.find_spec("faster_coco_eval") is not None


def _quiet(_: str) -> None:
    """A log sink: the tables are checked through the returned metrics, not the console."""


# --------------------------------------------------------------------------------------------------------
# helpers (shared by the tests and the distributed worker, which re-imports this module)
# --------------------------------------------------------------------------------------------------------


def _coco128_path() -> Path:
    if not COCO128_ANN.is_file():
        pytest.skip(f"coco128 annotations not found at {COCO128_ANN}")
    return COCO128_ANN


def _gt_as_results(dataset: dict, *, shift_half_width: bool = False) -> list[dict]:
    """Non-crowd ground truth as score-1.0 COCO results, polygons encoded as compressed RLE."""
    from pycocotools import mask as mask_utils

    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    results = []
    for ann in dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        h, w = sizes[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        rle["counts"] = rle["counts"].decode("ascii")
        x, y, bw, bh = ann["bbox"]
        if shift_half_width:
            x += bw / 2
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x, y, bw, bh],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return results


def _label_maps(coco) -> tuple[dict[int, int], dict[int, int]]:
    """torchvision-style contiguous labels 1..K over the categories sorted by id, both directions."""
    cat_ids = sorted(coco.getCatIds())
    label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
    return label_to_cat, {c: label for label, c in label_to_cat.items()}


def _torchvision_outputs(coco, image_ids, cat_to_label, *, jitter: bool = False) -> dict[int, dict]:
    """Ground truth (non-crowd) as torchvision detector outputs: xyxy boxes, labels, N×1×H×W masks.

    With ``jitter`` the boxes move by a few pixels and the scores vary, deterministically per annotation,
    so that the AP depends on every image.
    """
    from pycocotools import mask as mask_utils

    outputs = {}
    for image_id in image_ids:
        img = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        scores = torch.ones(len(anns))
        if jitter:
            ids = torch.tensor([a["id"] for a in anns], dtype=torch.float64)
            boxes += ((ids % 9) - 4).to(torch.float32)[:, None]
            scores = (0.2 + 0.8 * ((ids * 7919) % 101) / 100).to(torch.float32)
        if anns:  # annToMask for all objects at once: one decode call returning [H, W, N]
            masks = torch.from_numpy(mask_utils.decode([coco.annToRLE(a) for a in anns])).permute(2, 0, 1)
        else:
            masks = torch.zeros(0, img["height"], img["width"], dtype=torch.uint8)
        outputs[image_id] = {
            "boxes": boxes,
            "scores": scores,
            "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks.to(torch.float32, memory_format=torch.contiguous_format)[:, None],
        }
    return outputs


def _summary(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "/AP-" not in k}


def _nan_equal(a: dict[str, float], b: dict[str, float], tol: float = 0.0) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if math.isnan(a[k]) or math.isnan(b[k]):
            if not (math.isnan(a[k]) and math.isnan(b[k])):
                return False
        elif abs(a[k] - b[k]) > tol:
            return False
    return True


@pytest.fixture(scope="module")
def coco128() -> tuple[Path, dict]:
    path = _coco128_path()
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def gt_fed_back(coco128) -> tuple[list[dict], dict[str, float]]:
    path, dataset = coco128
    results = _gt_as_results(dataset)
    return results, evaluate_coco_results(path, results, ("bbox", "segm"), log=_quiet)


# --------------------------------------------------------------------------------------------------------
# ground truth fed back, negative control
# --------------------------------------------------------------------------------------------------------


def test_ground_truth_fed_back_gives_ap_100(coco128, gt_fed_back):
    _, dataset = coco128
    _, metrics = gt_fed_back
    for iou_type in ("bbox", "segm"):
        for name in SUMMARY:
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(100.0), (iou_type, name)
        per_cat = {k: v for k, v in metrics.items() if k.startswith(f"{iou_type}/AP-")}
        name = {c["id"]: c["name"] for c in dataset["categories"]}
        with_gt = {name[a["category_id"]] for a in dataset["annotations"] if not a["iscrowd"]}
        assert len(with_gt) == 71
        assert set(per_cat) == {f"{iou_type}/AP-{n}" for n in name.values()}
        assert {k for k, v in per_cat.items() if v == pytest.approx(100.0)} == {
            f"{iou_type}/AP-{n}" for n in with_gt
        }
        # categories without ground truth in coco128 (e.g. 'toaster') are undefined, not 0
        assert math.isnan(metrics[f"{iou_type}/AP-toaster"])


def test_flat_summary_keys_are_exact(gt_fed_back):
    _, metrics = gt_fed_back
    assert set(_summary(metrics)) == {f"{t}/{n}" for t in ("bbox", "segm") for n in SUMMARY}
    assert "bbox/AP-person" in metrics and "segm/AP-traffic light" in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_negative_control_shifted_boxes(coco128):
    path, dataset = coco128
    shifted = _gt_as_results(dataset, shift_half_width=True)
    metrics = evaluate_coco_results(path, shifted, ("bbox",), log=_quiet)
    assert metrics["bbox/AP"] < 5.0
    assert metrics["bbox/AP50"] < 20.0


def test_crowd_only_detections_are_ignored(coco128):
    # Detections on crowd regions are neither true nor false positives: adding them keeps AP at 100.
    path, dataset = coco128
    results = _gt_as_results(dataset)
    results += [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in dataset["annotations"]
        if a["iscrowd"]
    ]
    metrics = evaluate_coco_results(path, results, ("bbox",), log=_quiet)
    assert metrics["bbox/AP"] == pytest.approx(100.0)


def test_image_ids_restricts_the_evaluation(coco128):
    path, dataset = coco128
    results = _gt_as_results(dataset)
    first_half = sorted({img["id"] for img in dataset["images"]})[:64]
    only_half = [r for r in results if r["image_id"] in first_half]
    # Scored on all images the missing half are misses; scored on the half that was processed it is perfect.
    assert evaluate_coco_results(path, only_half, ("bbox",), log=_quiet)["bbox/AP"] < 90.0
    scoped = evaluate_coco_results(path, results, ("bbox",), image_ids=first_half, log=_quiet)
    assert scoped["bbox/AP"] == pytest.approx(100.0)


def test_log_receives_summary_and_per_category_tables(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    lines: list[str] = []
    evaluate_coco_results(path, results[:50], ("bbox",), log=lines.append)
    text = "\n".join(lines)
    assert sum(1 for line in lines if line.lstrip().startswith("Average")) == 12
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in text
    assert re.search(r"\| person +\| +[0-9.]+ \|", text)
    assert "Per-category bbox AP:" in text


# --------------------------------------------------------------------------------------------------------
# CocoEvaluator with tensors
# --------------------------------------------------------------------------------------------------------


def test_evaluator_with_torchvision_outputs_gives_ap_100(coco128):
    path, _ = coco128
    coco = load_coco_gt(path)
    label_to_cat, cat_to_label = _label_maps(coco)
    assert len(label_to_cat) == 80 and label_to_cat[1] == 1 and label_to_cat[80] == 90
    image_ids = sorted(coco.getImgIds())
    outputs = _torchvision_outputs(coco, image_ids, cat_to_label)

    evaluator = CocoEvaluator(path, label_to_cat, ("bbox", "segm"), log=_quiet)
    for start in range(0, len(image_ids), 16):
        evaluator.update({i: outputs[i] for i in image_ids[start : start + 16]})
    evaluator.synchronize()  # no process group: a no-op
    metrics = evaluator.evaluate()

    for iou_type in ("bbox", "segm"):
        for name in SUMMARY:
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(100.0), (iou_type, name)
    # category ids round-trip through the label mapping
    for image_id in image_ids:
        expected = Counter(a["category_id"] for a in coco.imgToAnns[image_id] if not a["iscrowd"])
        got = Counter(r["category_id"] for r in evaluator.results if r["image_id"] == image_id)
        assert got == expected, image_id
    assert evaluator.image_ids == image_ids  # includes 250 and 508, which have no objects
    assert 250 in evaluator.image_ids and 508 in evaluator.image_ids


def test_evaluator_skips_repeated_image_ids(coco128):
    path, _ = coco128
    coco = load_coco_gt(path)
    label_to_cat, cat_to_label = _label_maps(coco)
    outputs = _torchvision_outputs(coco, [9, 25], cat_to_label)
    evaluator = CocoEvaluator(coco, label_to_cat, ("bbox",))
    evaluator.update(outputs)
    n = len(evaluator.results)
    shifted = {9: {**outputs[9], "boxes": outputs[9]["boxes"] + 50.0}}
    evaluator.update(shifted)  # a padded shard repeats image 9: the first output is kept
    assert len(evaluator.results) == n
    first = [r["bbox"] for r in evaluator.results if r["image_id"] == 9]
    assert first == [r["bbox"] for r in predictions_to_coco_results(9, outputs[9], label_to_cat)]


def test_evaluator_segm_without_masks_raises(coco128):
    path, _ = coco128
    evaluator = CocoEvaluator(path, {1: 1}, ("bbox", "segm"))
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.ones(1),
        "labels": torch.ones(1).long(),
    }
    with pytest.raises(
        ValueError, match=re.escape("iou_types contains 'segm' but the output for image_id 9 has no 'masks'")
    ):
        evaluator.update({9: output})


def test_evaluator_with_no_predictions_warns_once_and_reports_nan(coco128):
    path, _ = coco128
    coco = load_coco_gt(path)
    label_to_cat, _ = _label_maps(coco)
    lines: list[str] = []
    evaluator = CocoEvaluator(coco, label_to_cat, ("bbox", "segm"), log=lines.append)
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    evaluator.update({9: empty, 25: empty})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluator.evaluate()
    assert [str(w.message) for w in caught if "No predictions" in str(w.message)] == [
        "No predictions were made: there are no COCO results for the selected images; all AP values of "
        "['bbox', 'segm'] are reported as nan"
    ]
    assert not [line for line in lines if "No predictions" in line]
    # nothing to score: NaN everywhere, as detectron2 reports it (0.0 would read as a score)
    assert all(math.isnan(v) for v in metrics.values()), metrics


# --------------------------------------------------------------------------------------------------------
# empty predictions, errors
# --------------------------------------------------------------------------------------------------------


def test_empty_predictions_give_nan_and_a_warning(coco128):
    path, dataset = coco128
    with pytest.warns(UserWarning, match=re.escape("No predictions were made: there are no COCO results")):
        metrics = evaluate_coco_results(path, [], ("bbox", "segm"), log=_quiet)
    assert all(math.isnan(v) for v in metrics.values())
    assert "bbox/AP-person" in metrics and "segm/AP-toaster" in metrics
    assert len(metrics) == 2 * (6 + len(dataset["categories"]))


def test_unknown_image_id_is_reported(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    bad = copy.deepcopy(results[:10]) + [
        {"image_id": 999999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}
    ]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "1 of 11 results have an image_id that is not in the ground truth (1 distinct ids, first [999999]; "
            "the ground truth has 128 images)"
        ),
    ):
        evaluate_coco_results(path, bad, ("bbox",), log=_quiet)


def test_unknown_category_id_is_reported(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    bad = copy.deepcopy(results[:10])
    for r in bad[:3]:
        r["category_id"] = 12  # one of COCO's unused ids
    bad[3]["category_id"] = 0  # a contiguous label mistaken for a category id (0 = background)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "4 of 10 results have a category_id that is not in the ground truth categories (2 distinct ids, "
            "first [0, 12];"
        )
        + ".*not contiguous labels",
    ):
        evaluate_coco_results(path, bad, ("bbox",), log=_quiet)


def test_segm_without_segmentation_is_reported(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results[:5]]
    with pytest.raises(
        ValueError, match=re.escape("iou_types contains 'segm' but 5 of 5 results have no 'segmentation'")
    ):
        evaluate_coco_results(path, boxes_only, ("bbox", "segm"), log=_quiet)


def test_bad_arguments_are_reported(coco128, tmp_path):
    path, _ = coco128
    with pytest.raises(ValueError, match=re.escape("unknown iou type(s) ['mask']")):
        evaluate_coco_results(path, [], ("bbox", "mask"))
    with pytest.raises(FileNotFoundError, match=re.escape("COCO results file not found")):
        evaluate_coco_results(path, tmp_path / "missing.json", ("bbox",))
    with pytest.raises(FileNotFoundError, match=re.escape("COCO annotation file not found")):
        evaluate_coco_results(tmp_path / "missing_ann.json", [], ("bbox",))
    with pytest.raises(
        ValueError, match=re.escape("backend must be one of ('pycocotools', 'faster_coco_eval')")
    ):
        CocoEvaluator(path, {1: 1}, backend="detectron2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("keyed by COCO category id")):
        evaluate_coco_results(path, [], ("bbox",), class_names={1000: "x"})


def test_missing_faster_backend_names_the_pip_command(coco128, monkeypatch):
    path, _ = coco128
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape("pip install faster-coco-eval")):
        CocoEvaluator(path, {1: 1}, backend="faster_coco_eval")


def test_class_names_override_per_category_keys(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    metrics = evaluate_coco_results(path, results[:20], ("bbox",), class_names={1: "human"}, log=_quiet)
    assert "bbox/AP-human" in metrics and "bbox/AP-person" not in metrics


# --------------------------------------------------------------------------------------------------------
# predictions_to_coco_results
# --------------------------------------------------------------------------------------------------------


def test_bf16_outputs_are_converted_to_float32():
    big_id = 2**33 + 5  # crowd-style ids exceed int32
    boxes = torch.tensor([[10.3, 20.7, 600.2, 470.9], [1.0, 2.0, 3.5, 4.5]])
    probs = torch.rand(2, 1, 48, 64, generator=torch.Generator().manual_seed(0))
    out = {
        "boxes": boxes.to(torch.bfloat16),
        "scores": torch.tensor([0.91, 0.33]).to(torch.bfloat16),
        "labels": torch.tensor([1, 2]),
        "masks": probs.to(torch.bfloat16),
    }
    results = predictions_to_coco_results(big_id, out, lambda label: {1: 18, 2: 90}[label])
    ref = out["boxes"].float()  # what bf16 holds, widened exactly
    assert [r["image_id"] for r in results] == [big_id, big_id]
    assert all(type(r["image_id"]) is int for r in results)
    assert [r["category_id"] for r in results] == [18, 90]
    for r, b in zip(results, ref.tolist(), strict=True):
        assert all(type(v) is float for v in r["bbox"])
        assert r["bbox"] == pytest.approx([b[0], b[1], b[2] - b[0], b[3] - b[1]], abs=0)
        assert type(r["score"]) is float
    assert results[0]["score"] == out["scores"][0].float().item()

    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode(
        [dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()) for r in results]
    )
    expected = (out["masks"].float()[:, 0] > 0.5).numpy().transpose(1, 2, 0)
    assert decoded.shape == (48, 64, 2)
    assert np.array_equal(decoded.astype(bool), expected)
    assert isinstance(results[0]["segmentation"]["counts"], str)
    assert json.loads(json.dumps(results))[0]["image_id"] == big_id


def test_prediction_errors_are_reported():
    out = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.ones(1),
        "labels": torch.tensor([81]),
    }
    with pytest.raises(
        ValueError,
        match=re.escape(
            "label 81 (image_id 7) has no entry in label_to_cat_id, which maps 80 labels (1..80)"
        ),
    ):
        predictions_to_coco_results(7, out, {i: i for i in range(1, 81)})
    with pytest.raises(
        ValueError, match=re.escape("prediction['boxes'] for image_id 7 must be [N, 4], got (1, 5)")
    ):
        predictions_to_coco_results(7, {**out, "boxes": torch.zeros(1, 5)}, {81: 1})
    with pytest.raises(KeyError, match=re.escape("prediction for image_id 7 has no 'scores'")):
        predictions_to_coco_results(7, {"boxes": out["boxes"], "labels": out["labels"]}, {81: 1})
    with pytest.raises(TypeError, match=re.escape("image_id must be an integer, got a bool (True)")):
        predictions_to_coco_results(True, out, {81: 1})  # type: ignore[arg-type]


def test_empty_prediction_gives_no_results():
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    assert predictions_to_coco_results(3, empty, {}) == []


# --------------------------------------------------------------------------------------------------------
# JSON writing
# --------------------------------------------------------------------------------------------------------


def test_write_metrics_round_trip_with_nan_as_null(tmp_path, gt_fed_back):
    _, metrics = gt_fed_back
    path = tmp_path / "out" / "metrics.json"
    path.parent.mkdir()
    path.write_text("stale")  # replaced, not appended to
    write_metrics(path, metrics)
    text = path.read_text()
    loaded = json.loads(text)
    assert list(loaded) == sorted(metrics)
    assert loaded["bbox/AP-toaster"] is None and "NaN" not in text
    assert set(loaded) == set(metrics)
    assert all(loaded[k] == v for k, v in metrics.items() if not math.isnan(v))
    assert os.listdir(path.parent) == ["metrics.json"]  # no temp file left behind


def test_write_results_round_trip_scores_the_same(tmp_path, coco128, gt_fed_back):
    path, _ = coco128
    results, metrics = gt_fed_back
    out = tmp_path / "results.json"
    write_results(out, results)
    assert json.loads(out.read_text()) == results
    again = evaluate_coco_results(str(path), out, ("segm",), log=_quiet)
    assert _nan_equal(again, {k: v for k, v in metrics.items() if k.startswith("segm/")})
    assert os.listdir(tmp_path) == ["results.json"]


# --------------------------------------------------------------------------------------------------------
# keypoints
# --------------------------------------------------------------------------------------------------------

_KP_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
    "left_ankle", "right_ankle",
]  # fmt: skip


def _keypoint_gt(tmp_path: Path) -> Path:
    """Three 640×480 images with medium and large persons, some keypoints unlabelled, one without any."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    annotations = []
    for ann_id, (image_id, x, y, side, labelled) in enumerate(
        [
            (1, 20, 30, 60, 17),
            (1, 200, 100, 180, 12),
            (2, 50, 60, 150, 17),
            (3, 300, 200, 70, 9),
            (3, 10, 10, 40, 0),
        ],
        start=1,
    ):
        kps = np.zeros((17, 3))
        kps[:, 0] = x + rng.uniform(0, side, 17)
        kps[:, 1] = y + rng.uniform(0, side, 17)
        kps[:labelled, 2] = 2
        kps[labelled:] = 0  # unlabelled keypoints are (0, 0, 0) in COCO
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [x, y, side, side],
                "area": float(side * side),
                "iscrowd": 0,
                "keypoints": kps.ravel().round(2).tolist(),
                "num_keypoints": labelled,
                "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]],
            }
        )
    category = {
        "id": 1,
        "name": "person",
        "supercategory": "person",
        "keypoints": _KP_NAMES,
        "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7]],
    }
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [category]}))
    return path


def test_keypoints_ground_truth_fed_back_gives_ap_100(tmp_path):
    path = _keypoint_gt(tmp_path)
    dataset = json.loads(path.read_text())
    outputs: dict[int, dict] = {}
    for image_id in (1, 2, 3):
        anns = [a for a in dataset["annotations"] if a["image_id"] == image_id and a["num_keypoints"] > 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        kps = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        kps[:, :, 2] = 1.0  # torchvision marks every predicted keypoint visible
        outputs[image_id] = {
            "boxes": boxes,
            "scores": torch.ones(len(anns)),
            "labels": torch.ones(len(anns), dtype=torch.int64),
            "keypoints": kps,
        }
    evaluator = CocoEvaluator(path, {1: 1}, ("bbox", "keypoints"), log=_quiet)
    evaluator.update(outputs)
    metrics = evaluator.evaluate()
    assert set(_summary(metrics)) == {f"bbox/{n}" for n in SUMMARY} | {f"keypoints/{n}" for n in KP_SUMMARY}
    for name in KP_SUMMARY:
        assert metrics[f"keypoints/{name}"] == pytest.approx(100.0), name
    assert metrics["keypoints/AP-person"] == pytest.approx(100.0)
    assert len(evaluator.results[0]["keypoints"]) == 51

    # a negative control: keypoints moved by 15 px no longer match at OKS 0.75
    moved = copy.deepcopy(evaluator.results)
    for r in moved:
        r["keypoints"] = [v + 15.0 if i % 3 != 2 else v for i, v in enumerate(r["keypoints"])]
    assert evaluate_coco_results(path, moved, ("keypoints",), log=_quiet)["keypoints/AP75"] < 50.0


def test_keypoints_on_instances_gt_is_reported(coco128, gt_fed_back):
    path, _ = coco128
    results, _ = gt_fed_back
    with_kps = [dict(r, keypoints=[0.0] * 51) for r in results[:3]]
    with pytest.raises(
        ValueError, match=re.escape("ground-truth annotations have no 'keypoints'/'num_keypoints'")
    ):
        evaluate_coco_results(path, with_kps, ("keypoints",), log=_quiet)


# --------------------------------------------------------------------------------------------------------
# optional backend
# --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_FASTER, reason="faster-coco-eval is not installed")
def test_faster_backend_matches_pycocotools(coco128):
    path, dataset = coco128
    rng = np.random.default_rng(0)
    results = _gt_as_results(dataset)
    cat_ids = [c["id"] for c in dataset["categories"]]
    for r in results:  # perturb: move boxes, shuffle scores, relabel some
        r["bbox"] = [v + float(rng.normal(0, 3)) for v in r["bbox"][:2]] + r["bbox"][2:]
        r["score"] = float(rng.random())
        if rng.random() < 0.1:
            r["category_id"] = int(rng.choice(cat_ids))
    reference = evaluate_coco_results(path, results, ("bbox", "segm"), log=_quiet)
    faster = evaluate_coco_results(path, results, ("bbox", "segm"), backend="faster_coco_eval", log=_quiet)
    assert 20.0 < reference["bbox/AP"] < 95.0
    assert _nan_equal(faster, reference, tol=1e-2)  # 1e-4 on COCOeval's 0..1 scale


# --------------------------------------------------------------------------------------------------------
# distributed gathering
# --------------------------------------------------------------------------------------------------------

_DIST_IMAGES = 24
_DIST_TIMEOUT_S = 90


def _evaluate_shard(rank: int, world_size: int, init_file: str, ann_path: str) -> dict:
    """One rank of a gloo group: convert this rank's shard, try evaluate() early, synchronize, evaluate."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=_DIST_TIMEOUT_S),
    )
    try:
        coco = load_coco_gt(ann_path)
        label_to_cat, cat_to_label = _label_maps(coco)
        image_ids = sorted(coco.getImgIds())[:_DIST_IMAGES]
        # DistributedSampler-style shards; rank 1's is padded by repeating an image of rank 0
        shard = image_ids[rank::world_size]
        if rank == 1:
            shard = [*shard, image_ids[0]]
        outputs = _torchvision_outputs(coco, shard, cat_to_label, jitter=True)
        evaluator = CocoEvaluator(ann_path, label_to_cat, ("bbox", "segm"), log=_quiet)
        for start in range(0, len(shard), 8):
            evaluator.update({i: outputs[i] for i in shard[start : start + 8]})
        try:
            evaluator.evaluate()
            early_error = None
        except RuntimeError as exc:
            early_error = str(exc)
        evaluator.synchronize()
        metrics = evaluator.evaluate()
        return {
            "metrics": metrics,
            "image_ids": evaluator.image_ids,
            "num_results": len(evaluator.results),
            "early_error": early_error,
        }
    finally:
        dist.destroy_process_group()


def _dist_worker(index: int, init_file: str, ann_path: str, out_dir: str) -> None:
    """Spawned process: rank 1 of the group (the test process itself is rank 0)."""
    record = _evaluate_shard(index + 1, 2, init_file, ann_path)
    metrics = {k: (None if math.isnan(v) else v) for k, v in record["metrics"].items()}
    Path(out_dir, "rank1.json").write_text(json.dumps({**record, "metrics": metrics}))


def test_synchronize_merges_two_gloo_ranks(coco128, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    path, _ = coco128
    # the spawned process unpickles _dist_worker by module name: make this module importable by it there
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[__name__.count(".")]))
    tic = time.perf_counter()
    init_file = str(tmp_path / "dist_init")
    # Rank 1 runs in a spawned process, rank 0 in this one: a real two-process gloo group that starts only
    # one extra interpreter (importing torch dominates the cost of this test).
    context = mp.spawn(_dist_worker, args=(init_file, str(path), str(tmp_path)), nprocs=1, join=False)
    try:
        # the single-process reference runs while the spawned interpreter is still starting
        coco = load_coco_gt(path)
        label_to_cat, cat_to_label = _label_maps(coco)
        image_ids = sorted(coco.getImgIds())[:_DIST_IMAGES]
        single = CocoEvaluator(coco, label_to_cat, ("bbox", "segm"), log=_quiet)
        single.update(_torchvision_outputs(coco, image_ids, cat_to_label, jitter=True))
        expected = single.evaluate()
        rank0 = _evaluate_shard(0, 2, init_file, str(path))
    finally:
        deadline = time.monotonic() + _DIST_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the rank-1 process did not finish within {_DIST_TIMEOUT_S} s")
    elapsed = time.perf_counter() - tic
    rank1 = json.loads((tmp_path / "rank1.json").read_text())

    assert rank1["metrics"] == {}  # only rank 0 computes metrics
    assert rank0["early_error"] is not None and "call synchronize() on all ranks" in rank0["early_error"]

    assert rank0["image_ids"] == rank1["image_ids"] == image_ids
    assert rank0["num_results"] == rank1["num_results"] == len(single.results)  # the repeat is kept once
    assert _nan_equal(rank0["metrics"], expected)
    assert 10.0 < expected["bbox/AP"] < 95.0  # the jitter makes every image count
    assert not torch.distributed.is_initialized()
    assert elapsed < 60.0
