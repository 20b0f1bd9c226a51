import re

import pytest

from backbone import FeatureInfo, FeatureSpec, ShapeSpec


def make_info() -> FeatureInfo:
    return FeatureInfo([FeatureSpec("c2", 256, 4), ("c3", 512, 8), FeatureSpec("c4", 1024, 16)])


def test_accessors_follow_timm_and_detectron2_conventions():
    info = make_info()
    assert info.names() == ("c2", "c3", "c4")
    assert info.channels() == (256, 512, 1024)
    assert info.reduction() == (4, 8, 16)
    assert info.strides() == (4, 8, 16)
    assert info.channels(1) == 512 and info.reduction([0, 2]) == (4, 16)
    assert info.get_dicts() == [
        {"name": "c2", "num_chs": 256, "reduction": 4},
        {"name": "c3", "num_chs": 512, "reduction": 8},
        {"name": "c4", "num_chs": 1024, "reduction": 16},
    ]
    assert info.output_shape()["c3"] == ShapeSpec(channels=512, stride=8)
    assert info.output_shape()["c3"].channels == 512 and info.output_shape()["c3"].stride == 8


def test_iteration_yields_name_channels_stride_triples():
    assert [(n, c, s) for n, c, s in make_info()] == [("c2", 256, 4), ("c3", 512, 8), ("c4", 1024, 16)]


def test_lookup_by_name_and_select():
    info = make_info()
    assert info["c3"] == FeatureSpec("c3", 512, 8)
    assert "c4" in info and "c5" not in info
    assert info.select(["c4", "c2"]).names() == ("c2", "c4")
    assert isinstance(info[1:], FeatureInfo) and info[1:].names() == ("c3", "c4")
    with pytest.raises(KeyError, match=re.escape("no feature named 'p3'; available: ['c2', 'c3', 'c4']")):
        info["p3"]
    with pytest.raises(KeyError, match=re.escape("unknown feature name(s) ['c9']")):
        info.select(["c9"])


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match=re.escape("feature names must be unique, got duplicates ['p3']")):
        FeatureInfo([("p3", 8, 8), ("p3", 8, 16)])


def test_decreasing_strides_rejected():
    with pytest.raises(ValueError, match=re.escape("'c3' has stride 16 but the next one, 'c4', has stride 8")):
        FeatureInfo([("c3", 8, 16), ("c4", 8, 8)])


def test_equal_strides_allowed_for_dilated_stages():
    assert FeatureInfo([("c4", 8, 16), ("c5", 8, 16)]).strides() == (16, 16)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (("c3", 8, 12), "feature 'c3' must have a power-of-two stride, got 12"),
        (("c3", 0, 8), "feature 'c3' must have a positive channel count, got 0"),
        (("", 8, 8), "feature names must be non-empty strings"),
    ],
)
def test_invalid_specs_rejected(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FeatureInfo([spec])


def test_equality_and_hash():
    assert make_info() == make_info()
    assert hash(make_info()) == hash(make_info())
    assert make_info() != make_info()[:2]
