"""Tests of the config schema: names declared once, model.head against torchvision and the archs, docs."""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from backbone.config import BackboneConfig, FPNConfig
from detection import build_detector
from detection.archs import ARCHS, EVAL_BACKENDS, IOU_TYPES
from detection.config import (
    AmpConfig,
    ConfigError,
    EvalConfig,
    ExperimentConfig,
    FieldError,
    HeadConfig,
    ModelConfig,
    OptimizerConfig,
    config_reference,
    load_config,
)
from detection.models import OWN_OPTIONS, detector_class
from detection.precision import AUTOCAST_DTYPES

# Keywords of torchvision's detector classes that are modules, not config values.
MODULE_KEYWORDS = {
    "backbone",
    "rpn_anchor_generator",
    "anchor_generator",
    "rpn_head",
    "head",
    "box_roi_pool",
    "box_head",
    "box_predictor",
    "mask_roi_pool",
    "mask_head",
    "mask_predictor",
    "keypoint_roi_pool",
    "keypoint_head",
    "keypoint_predictor",
    "proposal_matcher",
}
# Keywords that have their own keys under model.
MODEL_KEYS = {"num_classes", "min_size", "max_size"}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def torchvision_keywords(arch: str) -> set[str]:
    params = inspect.signature(detector_class(ARCHS[arch]).__init__).parameters
    return {p for p in params if p not in ("self", "kwargs")}


def head_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(HeadConfig))


# ----------------------------------------------------------------------------------------------- declared once


def test_names_come_from_the_arch_table_and_the_precision_vocabulary():
    model_hints = get_type_hints(ModelConfig)
    assert get_origin(model_hints["arch"]) is not None and get_args(model_hints["arch"]) == tuple(ARCHS)
    assert get_args(get_type_hints(AmpConfig)["dtype"]) == AUTOCAST_DTYPES
    iou_item = get_args(get_args(get_type_hints(EvalConfig)["iou_types"])[0])[0]
    assert get_args(iou_item) == IOU_TYPES
    assert get_args(get_type_hints(EvalConfig)["backend"]) == EVAL_BACKENDS
    for name, spec in ARCHS.items():
        assert EvalConfig().resolved_iou_types(name) == spec.iou_types()


def test_no_second_list_of_arch_names_in_the_config_package():
    source = "\n".join(p.read_text() for p in Path(inspect.getfile(ModelConfig)).parent.glob("*.py"))
    assert '"faster_rcnn_v2"' not in source and '"keypoint_rcnn"' not in source
    assert '"bfloat16", "float16"' not in source and '"float16", "bfloat16"' not in source
    assert '"bbox", "segm"' not in source


# ----------------------------------------------------------------------------------------------- model.head


def test_head_covers_every_plain_keyword_of_torchvision_and_build_detector():
    plain = set().union(*(torchvision_keywords(a) for a in ARCHS)) - MODULE_KEYWORDS - MODEL_KEYS
    own = set(OWN_OPTIONS) - {"anchor_sizes", "aspect_ratios"}
    assert {f.name for f in head_fields()} == plain | own


def test_each_head_option_applies_exactly_where_torchvision_takes_it():
    for f in head_fields():
        needs = f.metadata["needs"]
        for arch, spec in ARCHS.items():
            if f.name in OWN_OPTIONS:
                continue
            assert needs.test(spec) == (f.name in torchvision_keywords(arch)), (f.name, arch)


def test_every_head_option_defaults_to_none_and_is_documented():
    for f in head_fields():
        assert f.default is None, f.name
        assert len(f.metadata["doc"]) > 20, f.name
    assert HeadConfig().to_kwargs() == {}


def _sample(tp: Any, bound: Any) -> Any:
    """A valid value for a head option: inside its bound, of its type."""
    inner = [a for a in get_args(tp) if a is not type(None)][0]
    if get_origin(inner) is tuple:
        item = get_args(inner)[0]
        n = 1 if get_args(inner)[-1] is Ellipsis else len(get_args(inner))
        return (_sample(item | None, bound),) * n
    if inner is int:
        return 8
    return 0.5 if bound.high == 1 else 1.5


@pytest.mark.parametrize("arch", ["mask_rcnn", "keypoint_rcnn", "retinanet", "fcos"])
def test_every_applicable_option_builds_and_takes_effect(arch):
    hints = get_type_hints(HeadConfig)
    values = {
        f.name: _sample(hints[f.name], f.metadata["bound"])
        for f in head_fields()
        if f.metadata["needs"].test(ARCHS[arch])
    }
    head = HeadConfig(**values)
    cfg = ModelConfig(arch=arch, head=head)
    assert head.to_kwargs() == values
    backbone = BackboneConfig(name="resnet18", base_channels=32, fpn=FPNConfig(out_channels=32))
    model = build_detector(cfg.arch, backbone, 3, **cfg.head.to_kwargs())
    assert tuple(model.transform.image_mean) == (0.5, 0.5, 0.5)
    if arch.endswith("rcnn"):
        assert model.roi_heads.detections_per_img == 8
        assert model.rpn.nms_thresh == 0.5
        assert model.roi_heads.box_roi_pool.canonical_scale == 1
    else:
        assert (model.detections_per_img, model.topk_candidates, model.nms_thresh) == (8, 8, 0.5)


@pytest.mark.parametrize(
    ("arch", "option", "message"),
    [
        (
            "fcos",
            "box_score_thresh: 0.1",
            "model.head.box_score_thresh applies to the R-CNN archs (faster_rcnn, ",
        ),
        (
            "faster_rcnn",
            "mask_head_channels: [8]",
            "model.head.mask_head_channels applies to the Mask R-CNN archs",
        ),
        ("mask_rcnn", "num_keypoints: 5", "model.head.num_keypoints applies to the Keypoint R-CNN arch"),
        (
            "retinanet",
            "center_sampling_radius: 1.0",
            "model.head.center_sampling_radius applies to the FCOS arch",
        ),
        ("fcos", "fg_iou_thresh: 0.5", "model.head.fg_iou_thresh applies to the RetinaNet archs"),
        ("mask_rcnn", "score_thresh: 0.1", "model.head.score_thresh applies to the one-stage archs"),
        (
            "retinanet",
            "roi_canonical_scale: 112",
            "model.head.roi_canonical_scale applies to the R-CNN archs",
        ),
    ],
)
def test_an_option_the_arch_does_not_take_fails_at_load_time(tmp_path, arch, option, message):
    path = write(tmp_path, "exp.yaml", f"model:\n  arch: {arch}\n  head: {{{option}}}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")) as info:
        load_config(path)
    assert str(info.value).endswith(f"not to arch {arch!r}; remove it or change the arch")
    assert "\n" not in str(info.value)


def test_options_the_arch_takes_load():
    cfg = load_config(None, ["model.arch=fcos", "model.head={score_thresh: 0.3, center_sampling_radius: 2}"])
    assert cfg.model.head.to_kwargs() == {"score_thresh": 0.3, "center_sampling_radius": 2.0}
    cfg = load_config(None, ["model.arch=keypoint_rcnn", "model.head.num_keypoints=5"])
    assert cfg.model.head.num_keypoints == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.head.box_score_tresh=0.1",
            "unknown key 'model.head.box_score_tresh' (did you mean 'box_score_thresh'?)",
        ),
        ("model.head.min_size=600", "unknown key 'model.head.min_size' (did you mean 'model.min_size'?)"),
        ("model.head.backbone={}", "unknown key 'model.head.backbone' (did you mean 'model.backbone'?)"),
        (
            "model.head.rpn_head=1",
            "unknown key 'model.head.rpn_head'. Valid keys under 'model.head': image_mean",
        ),
        (
            "model.head.box_detections_per_img=many",
            "model.head.box_detections_per_img: expected int or null, got 'many'",
        ),
        ("model.head.box_nms_thresh=1.5", "model.head.box_nms_thresh must be in [0, 1]; got 1.5"),
        ("model.head.rpn_batch_size_per_image=0", "model.head.rpn_batch_size_per_image must be >= 1; got 0"),
        (
            "model.head.box_head_convs=[64, 0]",
            "model.head.box_head_convs must hold numbers >= 1; got [64, 0]",
        ),
        (
            "model.head.image_std=[0.2, 0.2]",
            "model.head.image_std: expected list of 3 float or null, got [0.2, 0.2] (list); it has 2 items",
        ),
        ("model.head.roi_canonical_scale=0", "model.head.roi_canonical_scale must be > 0; got 0.0"),
        (
            "model.head={rpn_fg_iou_thresh: 0.6, rpn_bg_iou_thresh: 0.7}",
            "model.head.rpn_bg_iou_thresh (0.7) must be <= rpn_fg_iou_thresh (0.6)",
        ),
    ],
)
def test_head_errors_name_the_source_and_dotted_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(f"--set: {message}")):
        load_config(None, [override])


def test_head_typo_in_a_base_file_names_that_file(tmp_path):
    base = write(tmp_path, "base.yaml", "model:\n  head: {box_score_tresh: 0.1}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel: {arch: faster_rcnn}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{base}: unknown key 'model.head.box_score_tresh'")):
        load_config(child)


# ----------------------------------------------------------------------------------------------- errors


def test_validate_raises_field_errors_that_carry_the_field():
    with pytest.raises(FieldError) as info:
        OptimizerConfig(lr=0)
    assert (info.value.field, info.value.problem) == ("lr", "must be > 0; got 0")
    with pytest.raises(FieldError) as info:
        ModelConfig(arch="fcos", head=HeadConfig(box_nms_thresh=0.5))
    assert info.value.field == "head.box_nms_thresh"
    with pytest.raises(FieldError) as info:
        ModelConfig(arch="mask_rnn")
    assert info.value.field == "arch"


# ----------------------------------------------------------------------------------------------- docs


def _sections(cls: type) -> list[type]:
    found = [cls]
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.extend(s for s in _sections(hints[f.name]) if s not in found)
    return found


def test_every_field_of_the_experiment_sections_has_a_description():
    sections = [s for s in _sections(ExperimentConfig) if s not in (BackboneConfig, FPNConfig)]
    assert {ModelConfig, HeadConfig, AmpConfig, EvalConfig} <= set(sections)
    for section in sections:
        missing = [f.name for f in dataclasses.fields(section) if not f.metadata.get("doc")]
        assert missing == [], f"{section.__name__} lacks descriptions for {missing}"


def test_reference_describes_every_key_from_field_metadata():
    reference = config_reference()
    entries = reference.split("\n\n")
    keys = [e.split("  (", 1)[0] for e in entries[2:]]
    assert "model.head.rpn_nms_thresh" in keys and "train.amp.dtype" in keys and "model.backbone.fpn" in keys
    undocumented = [e.split("  (", 1)[0] for e in entries if "(no description)" in e]
    assert all(k.startswith("model.backbone") for k in undocumented), undocumented
    assert "train.amp.dtype  (one of 'float16', 'bfloat16'; default: bfloat16)" in reference
    assert "model.backbone.trainable_stages  (int or null; default: null)" in reference
