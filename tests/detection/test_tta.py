"""Test-time augmentation: identity views reproduce the model, views map back and merge, masks and
keypoints average across mirrored views, outputs stay float32, every arch runs, and eval_det uses it."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou

from detection import ARCHS, TTADetector, build_detector, optimize_for_inference
from detection.config import ConfigError, load_config
from detection.heads import Float32KeypointRCNNPredictor
from detection.tta import COCO_KEYPOINT_FLIP_MAP

REPO = Path(__file__).resolve().parents[2]
BACKBONE = {"name": "resnet18", "base_channels": 16, "fpn": {"out_channels": 64}}
RCNN = {"rpn_pre_nms_top_n_test": 40, "rpn_post_nms_top_n_test": 20, "box_score_thresh": 0.0,
        "box_detections_per_img": 8, "box_head_dim": 32}
ONE_STAGE = {"score_thresh": 0.0, "topk_candidates": 20, "detections_per_img": 8}


def tiny(arch: str, min_size: int = 64, max_size: int = 96, seed: int = 0, **options) -> nn.Module:
    """A seeded, randomly initialised ``arch`` with small heads, in eval mode."""
    torch.manual_seed(seed)
    spec = ARCHS[arch]
    opts = dict(RCNN if spec.family == "rcnn" else ONE_STAGE)
    if spec.family == "rcnn" and spec.v2:
        opts["box_head_convs"] = (16,)
    if spec.masks:
        opts["mask_head_channels"] = (16,)
    if spec.keypoints:  # torchvision's default head is eight 512-channel convs
        opts["keypoint_head"] = KeypointRCNNHeads(64, (16,))
        opts["keypoint_predictor"] = Float32KeypointRCNNPredictor(16, options.pop("num_keypoints", 17))
    return build_detector(arch, BACKBONE, num_classes=3, min_size=min_size, max_size=max_size,
                          **{**opts, **options}).eval()


def image(h: int = 64, w: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merged(outputs: list[dict[str, torch.Tensor]], iou: float, top: int) -> dict[str, torch.Tensor]:
    """What merging ``outputs`` (one dict per view, already in the image's pixels) must give."""
    cat = {k: torch.cat([o[k] for o in outputs]) for k in ("boxes", "scores", "labels")}
    keep = batched_nms(cat["boxes"], cat["scores"], cat["labels"], iou)[:top]
    return {k: v[keep] for k, v in cat.items()}


def same_size_model(model: nn.Module, arch: str, min_size: int, max_size: int) -> nn.Module:
    """``model``'s weights in a model resizing to ``min_size`` / ``max_size``."""
    other = tiny(arch, min_size=min_size, max_size=max_size)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_identity_view_equals_the_model_and_augmented_views_run(arch):
    size = 64
    model = tiny(arch, min_size=size, max_size=size + 32)
    x = [image(size, size + 16)]
    with torch.inference_mode():
        plain = model(x)[0]
        same = TTADetector(model)(x)[0]
        tta = TTADetector(model, flip=True, scales=(size + 32,))(x)[0]
    assert set(same) == set(plain) and all(torch.equal(same[k], plain[k]) for k in plain), arch
    assert set(tta) == set(plain) and len(plain["boxes"]) > 0
    n = len(tta["boxes"])
    assert 0 < n <= 8 and tta["boxes"].dtype == tta["scores"].dtype == torch.float32
    assert tta["labels"].dtype == torch.int64 and bool(((tta["labels"] >= 0) & (tta["labels"] <= 2)).all())
    assert bool((tta["boxes"] >= 0).all()) and bool((tta["boxes"][:, [0, 2]] <= size + 16).all())
    assert bool((tta["scores"][:-1] >= tta["scores"][1:]).all())  # best first
    if "masks" in tta:
        assert tta["masks"].shape == (n, 1, size, size + 16) and tta["masks"].dtype == torch.float32
        assert 0 <= float(tta["masks"].min()) and float(tta["masks"].max()) <= 1
    if "keypoints" in tta:
        assert tta["keypoints"].shape == (n, 17, 3) and tta["keypoints_scores"].shape == (n, 17)


def test_a_scale_view_maps_boxes_and_masks_back_to_the_original_image():
    model = tiny("mask_rcnn", min_size=64, max_size=96)
    x = [image(60, 76)]  # resize ratios that do not round-trip exactly in float
    tta = TTADetector(model, scales=(100,))
    with torch.inference_mode():
        out = tta(x)[0]
        expected = same_size_model(model, "mask_rcnn", 100, 150)(x)[0]  # the cap scales with the side
    assert tta.view_transforms[0].min_size == (100,) and tta.view_transforms[0].max_size == 150
    assert model.transform.min_size == (64,) and model.transform.max_size == 96  # the model is left alone
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    assert out["masks"].shape[-2:] == (60, 76) and float(out["boxes"][:, 2].max()) <= 76


class RecordingRoIAlign(MultiScaleRoIAlign):
    """torchvision's pooler, keeping the boxes of each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[torch.Tensor] = []

    def forward(self, x, boxes, image_shapes):
        self.calls.append(boxes[0].clone())
        return super().forward(x, boxes, image_shapes)


def test_the_mask_head_reads_the_merged_boxes_mapped_into_every_view():
    model = tiny("mask_rcnn", min_size=64, max_size=96)
    pool = model.roi_heads.mask_roi_pool
    model.roi_heads.mask_roi_pool = RecordingRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio)
    with torch.inference_mode():
        out = TTADetector(model, flip=True, scales=(64, 96))([image(64, 80)])[0]
    boxes = out["boxes"]
    expected = [boxes, mirror(boxes, 80), boxes * 1.5, mirror(boxes * 1.5, 120)]
    assert len(model.roi_heads.mask_roi_pool.calls) == 4
    for seen, want in zip(model.roi_heads.mask_roi_pool.calls, expected):
        torch.testing.assert_close(seen, want, rtol=0, atol=1e-4)


def test_views_at_two_scales_and_mirrored_are_merged_by_per_class_nms():
    model = tiny("faster_rcnn", min_size=64, max_size=96)
    x = image(64, 80)
    tta = TTADetector(model, flip=True, scales=(64, 96))
    with torch.inference_mode():
        out = tta([x])[0]
        views = []
        for m in (model, same_size_model(model, "faster_rcnn", 96, 144)):
            views.append(m([x])[0])
            flipped = m([x.flip(-1)])[0]
            views.append({**flipped, "boxes": mirror(flipped["boxes"], 80)})
    expected = merged(views, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img)
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    assert len(out["boxes"]) == 8 < sum(len(v["boxes"]) for v in views)
    iou = box_iou(out["boxes"], out["boxes"]) * (out["labels"][:, None] == out["labels"][None, :])
    assert float(iou.fill_diagonal_(0).max()) <= model.roi_heads.nms_thresh
    assert "4 views (shorter side 64, 96 px, each also mirrored)" in tta.describe()


def test_a_mirror_symmetric_image_gives_the_mirrored_boxes_of_the_plain_model():
    model = tiny("retinanet", min_size=64, max_size=96)
    r = image(64, 80)
    x = (r + r.flip(-1)) / 2
    assert torch.equal(x, x.flip(-1))
    with torch.inference_mode():
        plain = model([x])[0]
        out = TTADetector(model, flip=True)([x])[0]
    mirrored = {**plain, "boxes": mirror(plain["boxes"], 80)}
    expected = merged([plain, mirrored], model.nms_thresh, model.detections_per_img)
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    assert not torch.equal(plain["boxes"], mirrored["boxes"])


class RampMaskPredictor(nn.Module):
    """Mask probabilities rising linearly from 0.1 (left) to 0.9 (right) of every box, for every class."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.linspace(0.1, 0.9, 28).expand(len(x), self.num_classes, 28, 28)
        return torch.logit(probs)


def test_masks_of_mirrored_views_are_mirrored_back_then_averaged_before_pasting():
    model = tiny("mask_rcnn", min_size=64, max_size=96)
    model.roi_heads.mask_predictor = RampMaskPredictor(3)
    x = [image(64, 80)]
    with torch.inference_mode():
        plain = model(x)[0]
        one = TTADetector(model)(x)[0]
        both = TTADetector(model, flip=True, scales=(64, 96))(x)[0]
    assert torch.equal(one["masks"], plain["masks"]) and float(plain["masks"].max()) > 0.8
    # Each box's ramp and its mirror image average to 0.5 everywhere inside the box.
    assert float(both["masks"].max()) == pytest.approx(0.5, abs=1e-5)
    big = ((both["boxes"][:, 2:] - both["boxes"][:, :2]) >= 6).all(dim=1)
    assert bool(big.any())
    for box, mask in zip(both["boxes"][big], both["masks"][big]):
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert float(mask[0, cy, cx]) == pytest.approx(0.5, abs=1e-5)


class SidedKeypointPredictor(nn.Module):
    """Heatmaps peaking at each box's left edge for the left keypoints, right edge for the right, centre for the nose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(len(x), 17, 56, 56)
        for k in range(17):
            maps[:, k, 28, 28 if k == 0 else 2 if k % 2 == 1 else 53] = 10.0
        return maps


def test_keypoint_heatmaps_of_mirrored_views_swap_left_and_right_before_averaging():
    model = tiny("keypoint_rcnn", min_size=64, max_size=96)
    model.roi_heads.keypoint_predictor = SidedKeypointPredictor()
    with torch.inference_mode():
        out = TTADetector(model, flip=True)([image(64, 80)])[0]
    boxes, kps = out["boxes"], out["keypoints"]
    big = (boxes[:, 2] - boxes[:, 0]) >= 8
    assert bool(big.any())
    rel = (kps[big, :, 0] - boxes[big, None, 0]) / (boxes[big, None, 2] - boxes[big, None, 0])
    left, right = list(range(1, 17, 2)), list(range(2, 17, 2))
    assert bool((rel[:, left] < 0.15).all()) and bool((rel[:, right] > 0.85).all())
    assert bool((rel[:, 0] - 0.5).abs().max() < 0.1)
    assert [COCO_KEYPOINT_FLIP_MAP[COCO_KEYPOINT_FLIP_MAP[i]] for i in range(17)] == list(range(17))


def test_outputs_stay_float32_under_bf16_autocast_and_on_the_fast_path():
    model = tiny("mask_rcnn", min_size=64, max_size=96)
    x = [image(64, 80)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native kernels warns that it is slow
        fast_bf16 = optimize_for_inference(copy.deepcopy(model), precision="bf16")
    fast = optimize_for_inference(copy.deepcopy(model))
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = TTADetector(model, flip=True)(x)[0]
        inner = TTADetector(fast_bf16, flip=True, scales=(64, 80))(x)[0]
        assert all(torch.equal(a, b) for a, b in zip(TTADetector(fast)(x)[0].values(), fast(x)[0].values()))
    for out in (outer, inner):
        assert len(out["boxes"]) > 0
        assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32


def test_bad_arguments_are_one_line_errors():
    model = tiny("faster_rcnn")
    with pytest.raises(TypeError, match=re.escape("TTADetector takes a torchvision GeneralizedRCNN, RetinaNet or "
                                                  "FCOS detector (from detection.build_detector), or an "
                                                  "AutocastDetector holding one; got Conv2d")):
        TTADetector(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=re.escape("TTA scales must be positive pixel sizes without repeats; "
                                                   "got [64, 64]")):
        TTADetector(model, scales=(64, 64))
    with pytest.raises(RuntimeError, match=re.escape("TTADetector is for inference only: call it in eval mode")):
        TTADetector(model).train()([image()])
    keypoints = tiny("keypoint_rcnn", num_keypoints=5)
    with pytest.raises(ValueError, match=re.escape("flip TTA of a model with 5 keypoints needs keypoint_flip_map")):
        TTADetector(keypoints, flip=True)
    with pytest.raises(ValueError, match=re.escape("keypoint_flip_map must swap pairs among the model's 5 keypoints")):
        TTADetector(keypoints, flip=True, keypoint_flip_map=(0, 2, 3, 1, 4))
    with pytest.raises(ValueError, match=re.escape("keypoint_flip_map has 3 entries but the model predicts 5 keypoints")):
        TTADetector(keypoints, flip=True, keypoint_flip_map=(0, 2, 1))
    assert TTADetector(keypoints, flip=True, keypoint_flip_map=(0, 2, 1, 4, 3)).keypoint_flip_map == (0, 2, 1, 4, 3)


def test_the_config_declares_eval_tta_and_checks_scales():
    smoke = REPO / "configs" / "smoke" / "tiny_cpu.yaml"
    cfg = load_config(smoke)
    assert (cfg.eval.tta.flip, cfg.eval.tta.scales, cfg.eval.tta.enabled) == (False, (), False)
    assert load_config(smoke, ["eval.tta.scales=[96,128]"]).eval.tta.enabled
    with pytest.raises(ConfigError, match=re.escape("eval.tta.scales must hold positive pixel sizes without repeats, "
                                                    "e.g. [160, 192, 224], or [] for the model's own size; got [0]")):
        load_config(smoke, ["eval.tta.scales=[0]"])


def test_eval_only_wraps_the_model_when_eval_tta_asks(tmp_path):
    from detection.trainer import build_model, evaluate_only

    smoke = REPO / "configs" / "smoke" / "tiny_cpu.yaml"
    cfg = load_config(smoke, [f"data.shapes.cache_dir={tmp_path / 'shapes'}", "eval.max_images=1",
                              "eval.num_vis_images=0", "model.backbone.base_channels=16", "model.backbone.gn_groups=16",
                              "eval.tta.flip=true"])
    torch.manual_seed(0)
    torch.save(build_model(cfg, 4).state_dict(), tmp_path / "weights.pth")
    logged: list[str] = []
    metrics = evaluate_only(cfg, tmp_path / "weights.pth", output_dir=tmp_path / "eval", log=logged.append)
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    assert ("test-time augmentation: 2 views (shorter side 128 px, each also mirrored), merged by per-class NMS "
            "at IoU 0.5, top 20 per image") in logged
