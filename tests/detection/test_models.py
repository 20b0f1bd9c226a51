"""build_detector and load_weights: torchvision parity for every detector, train steps, build-time checks."""

import copy
import re

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign

from backbone import WeightsError, build_backbone
from detection import build_detector, load_weights

TORCHVISION_BUILDERS = {
    "faster_rcnn": tvd.fasterrcnn_resnet50_fpn,
    "faster_rcnn_v2": tvd.fasterrcnn_resnet50_fpn_v2,
    "mask_rcnn": tvd.maskrcnn_resnet50_fpn,
    "mask_rcnn_v2": tvd.maskrcnn_resnet50_fpn_v2,
    "retinanet": tvd.retinanet_resnet50_fpn,
    "retinanet_v2": tvd.retinanet_resnet50_fpn_v2,
    "fcos": tvd.fcos_resnet50_fpn,
    "keypoint_rcnn": tvd.keypointrcnn_resnet50_fpn,
}

LOSS_KEYS = {
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    "keypoint_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_keypoint"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
}


def loss_keys(arch: str) -> set[str]:
    return LOSS_KEYS[arch.removesuffix("_v2")]


def score_option(arch: str) -> dict:
    return {"box_score_thresh": 0.0} if "rcnn" in arch else {"score_thresh": 0.0}


def small_heads(arch: str) -> dict:
    """Fewer proposals and sampled RoIs: the same code paths at a fraction of the CPU time."""
    if "rcnn" in arch:
        return {
            "rpn_pre_nms_top_n_train": 200,
            "rpn_post_nms_top_n_train": 100,
            "rpn_pre_nms_top_n_test": 200,
            "rpn_post_nms_top_n_test": 50,
            "box_batch_size_per_image": 32,
            "box_detections_per_img": 20,
        }
    return {"detections_per_img": 20}


@pytest.mark.parametrize("arch", list(TORCHVISION_BUILDERS))
def test_torchvision_checkpoint_loads_and_outputs_match(arch, tmp_path):
    torch.manual_seed(0)
    options = {"min_size": 128, "max_size": 160, **score_option(arch), **small_heads(arch)}
    tv = TORCHVISION_BUILDERS[arch](weights=None, weights_backbone=None, **options)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), path)
    ours = build_detector(arch, backbone="resnet50", num_classes=2 if arch == "keypoint_rcnn" else 91, **options)
    load_weights(ours, path)
    image = torch.rand(3, 96, 128)
    exact = copy.deepcopy(tv).double().eval()
    with torch.no_grad():
        expected = tv.eval()([image])[0]
        got = ours.eval()([image])[0]
        truth = exact([image.double()])[0]
    assert set(got) == set(expected)
    assert len(got["boxes"]) > 0
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert got[key].dtype == value.dtype, key
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key
            continue
        # Our poolers sum RoIAlign's terms in another order, and the untrained heads amplify float32
        # rounding (masks: ~1e-4): ours must be as close to the float64 result as torchvision's float32.
        tv_error = (value.double() - truth[key]).abs().max().item()
        our_error = (got[key].double() - truth[key]).abs().max().item()
        assert our_error <= 4 * tv_error + 1e-6 * max(1.0, value.abs().max().item()), (key, our_error, tv_error)


def make_targets(arch: str, size: int = 128) -> list[dict]:
    targets = []
    for i in range(2):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [50.0, 40.0, 120.0, 110.0]]) + i
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if arch.startswith("mask_rcnn"):
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if arch == "keypoint_rcnn":
            kp = torch.zeros(2, 17, 3)
            kp[:, :, 0] = boxes[:, :1] + 5
            kp[:, :, 1] = boxes[:, 1:2] + 5
            kp[:, :, 2] = 1
            target["keypoints"] = kp
        targets.append(target)
    return targets


@pytest.mark.parametrize("arch", list(TORCHVISION_BUILDERS))
def test_train_step_and_eval_outputs(arch):
    torch.manual_seed(0)
    model = build_detector(
        arch,
        backbone={"name": "resnet18", "norm": "frozen_bn", "trainable_stages": 3, "fpn": {"out_channels": 64}},
        num_classes=3,
        min_size=128,
        max_size=128,
        **small_heads(arch),
    )
    model.train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    losses = model(images, make_targets(arch))
    assert set(losses) == loss_keys(arch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    frozen = {id(p) for m in (body.conv1, body.layer1) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
    assert body.layer4[0].conv1.weight.grad is not None
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images[:1])[0]
    float_keys = {"boxes", "scores", "masks", "keypoints"} & set(out)
    assert all(out[k].dtype == torch.float32 for k in float_keys)


@pytest.mark.parametrize("arch", list(TORCHVISION_BUILDERS))
def test_anchors_and_poolers_match_torchvision_defaults(arch):
    tv = TORCHVISION_BUILDERS[arch](weights=None, weights_backbone=None)
    ours = build_detector(arch, backbone="resnet50", num_classes=2 if arch == "keypoint_rcnn" else 91)
    tv_gen = tv.rpn.anchor_generator if "rcnn" in arch else tv.anchor_generator
    our_gen = ours.rpn.anchor_generator if "rcnn" in arch else ours.anchor_generator
    assert our_gen.sizes == tv_gen.sizes
    assert our_gen.aspect_ratios == tv_gen.aspect_ratios
    if "rcnn" in arch:
        assert ours.roi_heads.box_roi_pool.featmap_names == ["p2", "p3", "p4", "p5"]
        assert ours.roi_heads.box_roi_pool.output_size == tv.roi_heads.box_roi_pool.output_size
        if arch.startswith("mask"):
            assert ours.roi_heads.mask_roi_pool.output_size == (14, 14)


def test_retinanet_by_name_has_torchvisions_architecture():
    tv = tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    ours = build_detector("retinanet", backbone="resnet50", num_classes=91)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    assert ours.backbone.feature_info.names() == ("p3", "p4", "p5", "p6", "p7")


def test_pooler_naming_a_missing_level_fails_at_build_time():
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    with pytest.raises(ValueError, match=re.escape("box_roi_pool pools feature(s) ['0', '1', '2', '3'], which the backbone does not produce; it produces ['p2', 'p3', 'p4', 'p5', 'p6']")):
        build_detector("faster_rcnn", backbone="resnet18", num_classes=3, box_roi_pool=pool)


def test_anchor_sizes_for_the_wrong_number_of_levels():
    with pytest.raises(ValueError, match=re.escape("anchor_sizes has 3 entries but the backbone produces 5 levels ['p2', 'p3', 'p4', 'p5', 'p6']")):
        build_detector("faster_rcnn", backbone="resnet18", num_classes=3, anchor_sizes=((16,), (32,), (64,)))
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    gen = AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match=re.escape("rpn_anchor_generator has 2 size tuple(s) and 2 aspect-ratio tuple(s), but the backbone produces 5 levels")):
        build_detector("faster_rcnn", backbone="resnet18", num_classes=3, rpn_anchor_generator=gen)


def test_custom_anchor_sizes_and_ratios():
    model = build_detector(
        "faster_rcnn", backbone="resnet18", num_classes=3, anchor_sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=(1.0,)
    )
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert model.rpn.anchor_generator.aspect_ratios == ((1.0,),) * 5
    assert model.rpn.head.cls_logits.out_channels == 1


def test_a_torchvision_backbone_is_accepted_and_probed():
    tv_backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = build_detector("faster_rcnn", backbone=tv_backbone, num_classes=3, min_size=128, max_size=128)
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120)])
    assert out[0]["boxes"].shape[1] == 4


def test_build_time_errors():
    with pytest.raises(ValueError, match=re.escape("unknown detector arch 'mask_rcn'; choose one of")):
        build_detector("mask_rcn")
    with pytest.raises(TypeError, match=re.escape("unknown option 'box_score_threshold' for FasterRCNN (did you mean 'box_score_thresh'?)")):
        build_detector("faster_rcnn", backbone="resnet18", box_score_threshold=0.1)
    with pytest.raises(ValueError, match=re.escape("num_classes counts the background too, so it must be >= 2; got 1")):
        build_detector("faster_rcnn", backbone="resnet18", num_classes=1)
    with pytest.raises(ValueError, match=re.escape("the detector heads need every level to have out_channels=512 channels, but [('c2', 64), ('c3', 128), ('c4', 256)] differ")):
        build_detector("faster_rcnn", backbone=build_backbone("resnet18", fpn=False), num_classes=3)
    with pytest.raises(TypeError, match=re.escape("the backbone module Sequential has no 'out_channels' attribute")):
        build_detector("faster_rcnn", backbone=nn.Sequential(nn.Conv2d(3, 8, 3)), num_classes=3)


def test_single_level_backbone_without_fpn_works():
    bb = build_backbone("resnet18", fpn=False, out_features=("c5",))
    model = build_detector("faster_rcnn", backbone=bb, num_classes=3, min_size=128, max_size=128)
    assert model.roi_heads.box_roi_pool.featmap_names == ["c5"]
    assert model.rpn.anchor_generator.sizes == ((256,),)
    model.train()
    losses = model([torch.rand(3, 128, 128)], make_targets("faster_rcnn")[:1])
    assert all(torch.isfinite(v) for v in losses.values())


def test_load_weights_reports_shape_mismatches_with_the_file(tmp_path):
    small = build_detector("faster_rcnn", backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=3)
    path = tmp_path / "three_classes.pth"
    torch.save(small.state_dict(), path)
    other = build_detector("faster_rcnn", backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=5)
    with pytest.raises(WeightsError, match=re.escape(f"{path}: 4 tensor(s) have the wrong shape for this model, first: roi_heads.box_predictor.cls_score.weight: checkpoint (3, 1024) vs model (5, 1024)")):
        load_weights(other, path)


def test_load_weights_accepts_ddp_prefix_and_training_checkpoints(tmp_path):
    model = build_detector("fcos", backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=3)
    wrapped = {"module." + k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": wrapped, "iteration": 10}, path)
    fresh = build_detector("fcos", backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=3)
    load_weights(fresh, path)
    assert torch.equal(fresh.head.classification_head.cls_logits.bias, model.head.classification_head.cls_logits.bias + 1)


def test_roi_canonical_scale_moves_small_boxes_to_coarser_levels():
    def levels(model, sides):
        pool = model.roi_heads.box_roi_pool
        feats = {name: torch.zeros(1, 64, 128 // s, 128 // s) for name, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])}
        boxes = [torch.tensor([[0.0, 0.0, s, s] for s in sides])]
        pool(feats, boxes, [(128, 128)])  # the first call infers the level strides from the feature sizes
        return pool.map_levels(boxes).tolist()

    kwargs = dict(backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=4)
    default = build_detector("mask_rcnn", **kwargs)
    small = build_detector("mask_rcnn", roi_canonical_scale=112, **kwargs)
    assert default.roi_heads.box_roi_pool.canonical_scale == 224
    assert small.roi_heads.box_roi_pool.canonical_scale == small.roi_heads.mask_roi_pool.canonical_scale == 112
    # level index 0 = p2: with torchvision's 224 every box up to 111 px reads p2; with 112, 56-111 px read p3
    assert levels(default, [30, 60, 100]) == [0, 0, 0]
    assert levels(small, [30, 60, 100]) == [0, 1, 1]
    with pytest.raises(ValueError, match="roi_canonical_scale must be a positive box side in pixels for an R-CNN arch"):
        build_detector("retinanet", backbone="resnet18", num_classes=4, roi_canonical_scale=112)


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn", "keypoint_rcnn"])
def test_default_heads_start_from_the_values_torchvisions_class_gives_them(arch):
    """Heads are made in torchvision's order, so the same seed gives the same initial parameters."""
    from torchvision.ops import MultiScaleRoIAlign

    from backbone import build_backbone
    from detection.archs import ARCHS
    from detection.models import detector_class

    spec = {"name": "resnet18", "fpn": {"out_channels": 64}}
    torch.manual_seed(0)
    ours = build_detector(arch, spec, num_classes=3)
    torch.manual_seed(0)
    names = ["p2", "p3", "p4", "p5"]
    pools = {"box_roi_pool": MultiScaleRoIAlign(names, 7, 2)}
    if arch == "mask_rcnn":
        pools["mask_roi_pool"] = MultiScaleRoIAlign(names, 14, 2)
    if arch == "keypoint_rcnn":
        pools["keypoint_roi_pool"] = MultiScaleRoIAlign(names, 14, 2)
    reference = detector_class(ARCHS[arch])(
        build_backbone(spec), num_classes=3, rpn_anchor_generator=ours.rpn.anchor_generator, **pools
    )
    expected = reference.state_dict()
    got = ours.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
