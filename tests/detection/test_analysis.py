"""detection.analysis: per-group params and FLOPs add up, match the formulas and torchvision's same model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detection import build_detector
from detection.analysis import analysis_model, analyze_config, analyze_model, module_groups
from detection.config import load_config

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES, DETS, SIZE = 5, 10, 64
TINY_HEADS = {"mask_head_channels": [16], "box_head_dim": 64, "rpn_post_nms_top_n_test": 50,
              "box_detections_per_img": DETS, "min_size": SIZE, "max_size": SIZE}


@pytest.fixture(scope="module")
def tiny():
    """A 16-wide ResNet-18 Mask R-CNN with a 32-channel FPN, and its analyses at 64 px (max / no detections)."""
    torch.manual_seed(0)
    backbone = {"name": "resnet18", "base_channels": 16, "fpn": {"out_channels": 32}}
    model = build_detector("mask_rcnn", backbone, num_classes=NUM_CLASSES, **TINY_HEADS)
    return model, analyze_model(model, (SIZE, SIZE)), analyze_model(model, (SIZE, SIZE), detections="none")


def conv(c_in: int, c_out: int, k: int, h: int, w: int, n: int = 1) -> int:
    """FLOPs of a k x k convolution producing [n, c_out, h, w]: 2 per multiply-add."""
    return 2 * n * c_out * c_in * k * k * h * w


def test_groups_add_up_to_the_totals(tiny):
    model, analysis, _ = tiny
    names = [g.name for g in analysis.groups]
    assert names == ["backbone.stem", "backbone.c2", "backbone.c3", "backbone.c4", "backbone.c5", "fpn", "rpn",
                     "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_head",
                     "roi_heads.mask_predictor", "other"]
    assert sum(g.flops for g in analysis.groups) == analysis.flops > 0
    assert sum(g.params for g in analysis.groups) == analysis.params == sum(p.numel() for p in model.parameters())
    assert sum(g.trainable_params for g in analysis.groups) == analysis.trainable_params
    assert all(g.flops > 0 for g in analysis.groups if g.name != "other")
    assert analysis.group("other").flops == 0  # nothing outside the groups does conv / matmul work
    assert sum(analysis.flops_by_op.values()) == analysis.flops
    assert set(analysis.flops_by_op) == {"aten.convolution", "aten.addmm"}
    backbone = analysis.group("backbone")
    assert backbone.flops == sum(g.flops for g in analysis.groups if g.name.startswith("backbone."))
    assert [(d, g.name) for d, g in analysis.rows()][:2] == [(0, "backbone"), (1, "backbone.stem")]
    assert analysis.to_dict()["total"]["macs"] == analysis.macs == analysis.flops // 2
    with pytest.raises(KeyError, match=re.escape("no group 'neck'; the groups are ['backbone.stem'")):
        analysis.group("neck")


def test_known_layers_equal_their_formulas(tiny):
    _, analysis, _ = tiny
    assert analysis.input_size == analysis.padded_size == (SIZE, SIZE)
    assert analysis.group("backbone.stem").flops == conv(3, 16, 7, 32, 32)  # conv1, stride 2; BN counts none
    assert analysis.group("backbone.c2").flops == 4 * conv(16, 16, 3, 16, 16)  # two basic blocks, two 3x3 each
    # RPN head: a 3x3 conv, 3 objectness and 12 box outputs per location of p2..p6 (16, 8, 4, 2, 1 px wide)
    locations = sum(s * s for s in (16, 8, 4, 2, 1))
    assert analysis.group("rpn").flops == locations * (conv(32, 32, 3, 1, 1) + conv(32, 3, 1, 1, 1) + conv(32, 12, 1, 1, 1))
    # box head: fc 32*7*7 -> 64 -> 64, predictor 64 -> 5 scores + 20 box values, on all 50 proposals kept
    assert analysis.group("roi_heads.box_head").flops == 2 * 50 * (32 * 49 * 64 + 64 * 64)
    assert analysis.group("roi_heads.box_predictor").flops == 2 * 50 * 64 * (NUM_CLASSES + 4 * NUM_CLASSES)
    # mask head: one 3x3 conv 32 -> 16 on 14 x 14 per detection; predictor: 2x2 transposed conv to 28 x 28, 1x1 to classes
    assert analysis.detections == DETS
    assert analysis.group("roi_heads.mask_head").flops == conv(32, 16, 3, 14, 14, DETS)
    assert analysis.group("roi_heads.mask_predictor").flops == conv(16, 16, 2, 14, 14, DETS) + conv(16, NUM_CLASSES, 1, 28, 28, DETS)


def test_detections_none_skips_the_mask_head_and_restores_the_model(tiny):
    model, full, none = tiny
    assert none.detections == 0
    assert none.group("roi_heads.mask_head").flops == none.group("roi_heads.mask_predictor").flops == 0
    unchanged = [g for g in none.groups if not g.name.startswith("roi_heads.mask")]
    assert unchanged == [g for g in full.groups if not g.name.startswith("roi_heads.mask")]
    assert model.training  # the fixture's model was built in train mode
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.rpn.nms_thresh) == (0.05, 0.5, 0.7)


def _torchvision_backbone(returned: list[int], extra_blocks: torch.nn.Module | None = None) -> torch.nn.Module:
    """torchvision's ResNet-18-FPN with a 32-channel FPN and frozen BN (its pretrained-weights recipe)."""
    body = resnet18(norm_layer=FrozenBatchNorm2d)
    return BackboneWithFPN(body, {f"layer{i}": str(n) for n, i in enumerate(returned)},
                           [64 * 2 ** (i - 1) for i in returned], 32, extra_blocks=extra_blocks)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_ours_counts_like_torchvisions_same_model(arch):
    torch.manual_seed(0)
    ours_backbone = {"name": "resnet18", "norm": "frozen_bn", "fpn": {"out_channels": 32}}
    options = {"min_size": SIZE, "max_size": SIZE, "num_classes": NUM_CLASSES}
    if arch == "faster_rcnn":
        options.update(rpn_post_nms_top_n_test=50, box_detections_per_img=DETS)
        theirs = FasterRCNN(_torchvision_backbone([1, 2, 3, 4]), **options)
    else:
        theirs = RetinaNet(_torchvision_backbone([2, 3, 4], LastLevelP6P7(32, 32)), **options)
    ours = build_detector(arch, ours_backbone, **options)
    ours.load_state_dict(theirs.state_dict())  # the same weights, so the same detections too
    mine, tv = analyze_model(ours, (SIZE, SIZE)), analyze_model(theirs, (SIZE, SIZE))
    assert [g.name for g in tv.groups] == [g.name for g in mine.groups]
    assert mine.groups == tv.groups and mine.flops == tv.flops > 0 and mine.params == tv.params


def test_torchvision_body_groups_by_resnet_names():
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None).body
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.body, model.backbone.fpn = body, torch.nn.Identity()
    groups = module_groups(model)
    assert list(groups) == ["backbone.stem", "backbone.c2", "backbone.c3", "backbone.c4", "backbone.c5", "fpn"]
    assert groups["backbone.stem"] == [body.conv1, body.bn1, body.relu, body.maxpool]
    assert groups["backbone.c5"] == [body.layer4]


def test_analysis_model_drops_weights_and_follows_the_size():
    cfg = load_config(REPO / "configs/mask_rcnn_r18_fpn_1x_coco.yaml")
    assert cfg.model.backbone.weights  # the recipe names ImageNet weights; nothing is read or downloaded
    model, size = analysis_model(cfg)
    assert size == (800, 800) and isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())  # trainable_stages 3
    model, size = analysis_model(cfg, (96, 128))
    assert size == (96, 128) and model.transform.min_size == (96,) and model.transform.max_size == 128


def test_bad_arguments_raise_with_the_expected_values(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match=re.escape("image_size must be (height, width) in positive whole pixels; got (64,)")):
        analyze_model(model, (64,))
    with pytest.raises(ValueError, match=re.escape("detections must be one of ['max', 'none']; got 'some'")):
        analyze_model(model, (64, 64), detections="some")


PUBLISHED = [  # torchvision's weights meta: "_ops" in GMACs at 800 x 800, "num_params" with frozen BN
    ("faster_rcnn_r50_fpn_1x_coco.yaml", "FasterRCNN_ResNet50_FPN_Weights"),
    ("mask_rcnn_r50_fpn_1x_coco.yaml", "MaskRCNN_ResNet50_FPN_Weights"),
    ("retinanet_r50_fpn_1x_coco.yaml", "RetinaNet_ResNet50_FPN_Weights"),
    ("fcos_r50_fpn_1x_coco.yaml", "FCOS_ResNet50_FPN_Weights"),
]


@pytest.mark.slow
@pytest.mark.parametrize("config, weights", PUBLISHED)
def test_r50_recipes_match_torchvisions_published_counts(config, weights):
    import torchvision.models.detection as tvd

    meta = getattr(tvd, weights).COCO_V1.meta
    analysis = analyze_config(load_config(REPO / "configs" / config), (800, 800), detections="none")
    assert analysis.params == meta["num_params"]
    assert round(analysis.macs / 1e9, 3) == pytest.approx(meta["_ops"], abs=1e-3)
