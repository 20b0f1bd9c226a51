"""Config mistakes that need another module's table (pyramid levels, transforms) are caught at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from backbone.config import BackboneConfig, FPNConfig
from detection import build_detector
from detection.archs import ARCHS
from detection.config import ConfigError, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/smoke/tiny_cpu.yaml"
SMALL = {"name": "resnet18", "base_channels": 32, "fpn": FPNConfig(out_channels=32)}


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [(arch, {}) for arch in ARCHS]
    + [
        ("faster_rcnn", {"out_features": ("c3", "c4", "c5")}),
        ("faster_rcnn", {"fpn": FPNConfig(out_channels=32, extra="p6p7_p5")}),
        ("retinanet", {"fpn": FPNConfig(out_channels=32, extra="none")}),
        ("fcos", {"out_features": ("c4", "c5"), "fpn": FPNConfig(out_channels=32, extra="maxpool")}),
    ],
)
def test_pyramid_levels_are_those_of_the_built_detector(arch, backbone):
    cfg = ModelConfig(arch=arch, backbone=BackboneConfig(**{**SMALL, **backbone}))
    model = build_detector(arch, cfg.backbone, num_classes=3)
    assert cfg.pyramid_levels() == model.backbone.feature_info.names()


def test_anchor_sizes_for_the_wrong_number_of_levels_fail_at_load():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["model.anchor_sizes=[[16],[32]]"])
    message = str(info.value)
    assert message.startswith("--set: model.anchor_sizes has 2 size list(s)")
    assert "5 pyramid levels (p2, p3, p4, p5, p6)" in message
    assert "[[16], [32], [64], [128], [256]]" in message  # the closest valid value
    ok = load_config(TINY, ["model.anchor_sizes=[[16],[32],[64],[128],[256]]"])
    assert len(ok.model.anchor_sizes) == 5
    cut = "model.backbone.out_features=[c4, c5]"
    assert len(load_config(TINY, [cut, "model.anchor_sizes=[[16],[32],[64]]"]).model.pyramid_levels()) == 3


def test_anchor_sizes_name_the_file_that_set_them(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"base: {TINY}\nmodel:\n  anchor_sizes: [[16], [32], [64], [128], [256], [512]]\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.anchor_sizes has 6 size list\(s\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.aspect_ratios=[0.5, -1]", "--set: model.aspect_ratios must hold numbers > 0; got [0.5, -1.0]"),
        ("model.aspect_ratios=[]", "--set: model.aspect_ratios must not be empty"),
        ("model.aspect_ratios=wide", "--set: model.aspect_ratios: expected list of float or null, got 'wide'"),
    ],
)
def test_aspect_ratios_fail_at_load(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert str(info.value).startswith(expected)


def test_augment_is_checked_against_the_transform_table_naming_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"base: {TINY}\ndata:\n  train:\n    augment: [{{name: scale_jitter, size: 64}}, {{name: vflip}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(
        f"{path}: data.train.augment[1].name is 'vflip', not a known transform (did you mean 'vertical_flip'?)"
    )
    with pytest.raises(ConfigError, match=r"data.train.augment\[0\] is invalid: 'scale_jitter': missing required"):
        load_config(TINY, ["data.train.augment=[{name: scale_jitter}]"])
    cfg = load_config(TINY, ["data.train.augment=[{name: scale_jitter, size: 64}, {name: color_jitter, hue: 0.1}]"])
    assert [spec["name"] for spec in cfg.data.train.augment] == ["scale_jitter", "color_jitter"]


def test_closest_transform_name():
    from detection.config.augment import closest_name
    from detection.data.transforms import transform_names

    names = transform_names()
    assert closest_name("hflip", names) == "horizontal_flip"
    assert closest_name("HFlip", names) == "horizontal_flip"
    assert closest_name("colour_jitter", names) == "color_jitter"
    assert closest_name("rrcrop", names) == "random_resized_crop"
    assert closest_name("blur", names) is None
