"""Each vocabulary, default and range check of the backbone options is declared once, and used everywhere."""

import inspect
import re
import typing

import pytest

from backbone import FPN, BackboneConfig, FeatureInfo, FPNConfig, build_backbone
from backbone import config as cfg_module
from backbone import fpn as fpn_module
from backbone import norm as norm_module
from backbone import resnet as resnet_module


def literal_choices(cls: type, field: str) -> tuple:
    """The values the config loader accepts for ``cls.field`` (read from its annotation)."""
    hint = typing.get_type_hints(cls)[field]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    literal = args[0] if typing.get_origin(hint) is not typing.Literal else hint
    return typing.get_args(literal)


def test_annotations_and_tuples_are_one_vocabulary():
    assert literal_choices(FPNConfig, "extra") == cfg_module.FPN_EXTRAS
    assert literal_choices(FPNConfig, "norm") == cfg_module.FPN_NORMS
    assert literal_choices(BackboneConfig, "norm") == cfg_module.NORMS
    assert literal_choices(BackboneConfig, "style") == cfg_module.STYLES
    assert literal_choices(BackboneConfig, "output_stride") == cfg_module.OUTPUT_STRIDES
    assert {spec.block for spec in cfg_module.ARCHITECTURES.values()} == set(cfg_module.BLOCKS)


def test_modules_cover_exactly_the_vocabulary():
    assert set(norm_module.NORM_LAYERS) == set(cfg_module.NORMS)
    assert set(cfg_module.FPN_NORMS) <= set(cfg_module.NORMS) | {"none"}
    assert set(cfg_module.FPN_EXTRA_LEVELS) == set(cfg_module.FPN_EXTRAS)
    assert set(resnet_module._BLOCK_CLASSES) == set(cfg_module.BLOCKS)
    assert set(resnet_module._DILATED) == set(cfg_module.OUTPUT_STRIDES)
    assert not hasattr(fpn_module, "EXTRA_CHOICES")
    for kind in (*cfg_module.NORMS, "none"):
        norm_module.make_norm(kind)(32)
    with pytest.raises(ValueError, match=re.escape("unknown norm 'layer'; choose one of bn, frozen_bn, gn, sync_bn (or 'none')")):
        norm_module.make_norm("layer")


@pytest.mark.parametrize("extra", ["none", "maxpool", "p6p7_c5", "p6p7_p5"])
def test_every_extra_builds_the_levels_it_declares(extra):
    fpn = FPN(FeatureInfo([("c4", 32, 16), ("c5", 64, 32)]), 16, extra=extra)
    assert len(fpn.feature_info) == 2 + cfg_module.FPN_EXTRA_LEVELS[extra]


def test_unknown_choices_list_the_vocabulary():
    with pytest.raises(ValueError, match=re.escape("fpn.extra must be one of ['none', 'maxpool', 'p6p7_c5', 'p6p7_p5'], got 'p6p7'")):
        FPNConfig(extra="p6p7")
    with pytest.raises(ValueError, match=re.escape("extra must be one of ['none', 'maxpool', 'p6p7_c5', 'p6p7_p5'], got 'pool'")):
        FPN(FeatureInfo([("c5", 64, 32)]), 16, extra="pool")
    with pytest.raises(ValueError, match=re.escape("norm must be one of ['bn', 'frozen_bn', 'gn', 'sync_bn'], got 'batchnorm'")):
        BackboneConfig(norm="batchnorm")


def test_the_fpn_defaults_are_written_once():
    assert FPNConfig().resolved_extra() == cfg_module.DEFAULT_FPN_EXTRA
    assert FPNConfig().resolved_norm() == cfg_module.DEFAULT_FPN_NORM
    params = inspect.signature(FPN).parameters
    assert params["extra"].default == cfg_module.DEFAULT_FPN_EXTRA and params["norm"].default == cfg_module.DEFAULT_FPN_NORM
    assert build_backbone("resnet18", fpn={"out_channels": 16}).fpn.extra == cfg_module.DEFAULT_FPN_EXTRA


def test_one_trainable_stages_check_for_config_and_body():
    message = "trainable_stages must be in 0..5 (0 freezes everything, 5 trains the stem too); got 7"
    with pytest.raises(ValueError, match=re.escape(message)):
        BackboneConfig(trainable_stages=7)
    body = build_backbone("resnet18", fpn=False).body
    with pytest.raises(ValueError, match=re.escape(message)):
        body.freeze(7)
    with pytest.raises(ValueError, match=re.escape(message)):
        resnet_module.ResNetBody("basic", (1, 1, 1, 1), trainable_stages=7)


def test_every_backbone_option_is_documented_in_its_field_metadata():
    import dataclasses

    from backbone import BackboneConfig, FPNConfig

    for cls in (BackboneConfig, FPNConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("doc")]
        assert not undocumented, f"{cls.__name__} fields without metadata['doc']: {undocumented}"

