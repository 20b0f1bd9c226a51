"""Tests of the config loader: inheritance, overrides, strict conversion, messages, dumps, diffs and origins."""

from __future__ import annotations

import dataclasses
import logging
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from backbone.config import BackboneConfig, FPNConfig
from detection.config import (
    AmpConfig,
    ConfigError,
    ConfigFileNotFoundError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    HeadConfig,
    ModelConfig,
    ScheduleConfig,
    TrainConfig,
    config_to_dict,
    diff_configs,
    dump_config,
    format_config,
    from_dict,
    load_config,
    load_config_with_origins,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def backbone_keys() -> str:
    return ", ".join(f.name for f in dataclasses.fields(BackboneConfig))


# ----------------------------------------------------------------------------------------------- defaults


def test_no_file_gives_the_dataclass_defaults():
    assert load_config(None) == ExperimentConfig()
    cfg = load_config(None, ["train.batch_size=4"])
    assert cfg.train.batch_size == 4
    assert cfg.model == ModelConfig()


def test_public_dotted_keys_exist():
    cfg = load_config(
        None,
        [
            "data.train.ann_file=a.json",
            "data.train.img_dir=imgs",
            "data.val.ann_file=b.json",
            "data.val.img_dir=val",
            "model.arch=faster_rcnn",
            "model.backbone.name=resnet18",
            "train.max_iters=10",
            "train.batch_size=3",
            "train.amp.enabled=true",
            "train.amp.dtype=float16",
        ],
    )
    assert (cfg.data.train.ann_file, cfg.data.train.img_dir) == ("a.json", "imgs")
    assert (cfg.data.val.ann_file, cfg.data.val.img_dir) == ("b.json", "val")
    assert (cfg.model.arch, cfg.model.backbone.name) == ("faster_rcnn", "resnet18")
    assert (cfg.train.max_iters, cfg.train.batch_size) == (10, 3)
    assert cfg.train.amp == AmpConfig(enabled=True, dtype="float16")


# ----------------------------------------------------------------------------------------------- inheritance


def test_child_wins_and_bases_load_depth_first_in_order(tmp_path):
    write(
        tmp_path,
        "base/root.yaml",
        """\
        model: {arch: retinanet, max_size: 1000, min_size: 600}
        train: {batch_size: 1, seed: 1}
        """,
    )
    write(
        tmp_path,
        "base/first.yaml",
        """\
        base: root.yaml
        model: {max_size: 900}
        train: {batch_size: 4, seed: 2}
        """,
    )
    write(
        tmp_path,
        "base/second.yaml",
        """\
        train: {batch_size: 8}
        """,
    )
    child = write(
        tmp_path,
        "child.yaml",
        """\
        base: [base/first.yaml, base/second.yaml]
        train: {seed: 3}
        """,
    )
    cfg = load_config(child)
    assert cfg.model.arch == "retinanet"  # root, untouched
    assert cfg.model.min_size == 600  # root, untouched
    assert cfg.model.max_size == 900  # first.yaml overrides its own base
    assert cfg.train.batch_size == 8  # later base in the list wins
    assert cfg.train.seed == 3  # the child wins over every base


def test_mappings_merge_lists_replace(tmp_path):
    write(
        tmp_path,
        "base.yaml",
        """\
        model:
          anchor_sizes: [[16], [32], [64]]
          head: {box_detections_per_img: 50, box_nms_thresh: 0.6}
        data:
          train:
            augment: [{name: horizontal_flip, p: 0.5}, {name: color_jitter, brightness: 0.2}]
        """,
    )
    child = write(
        tmp_path,
        "child.yaml",
        """\
        base: base.yaml
        model:
          anchor_sizes: [[8], [16], [32], [64], [128]]
          head: {box_nms_thresh: 0.5}
        data:
          train:
            augment: [{name: vertical_flip}]
        """,
    )
    cfg = load_config(child)
    assert cfg.model.anchor_sizes == ((8,), (16,), (32,), (64,), (128,))
    assert cfg.model.head == HeadConfig(box_detections_per_img=50, box_nms_thresh=0.5)
    assert cfg.data.train.augment == ({"name": "vertical_flip"},)


def test_base_cycle_is_reported_with_the_chain(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"'base' cycle: {tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml"),
    ):
        load_config(tmp_path / "a.yaml")


def test_self_include_is_a_cycle(tmp_path):
    path = write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: 'base' cycle: {path} -> {path}")):
        load_config(path)


def test_missing_base_names_the_including_file(tmp_path):
    child = write(tmp_path, "child.yaml", "base: [nowhere/missing.yaml]\n")
    looked = tmp_path / "nowhere" / "missing.yaml"
    expected = f"{child}: base file 'nowhere/missing.yaml' not found (looked for '{looked}')"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(child)


def test_bad_base_value(tmp_path):
    child = write(tmp_path, "child.yaml", "base: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{child}: 'base' must be a path or a list of paths")):
        load_config(child)


def test_missing_config_file_is_a_config_error_and_a_file_not_found_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        ConfigFileNotFoundError, match=re.escape(f"config file '{missing}' not found")
    ) as info:
        load_config(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ConfigError)


def test_invalid_yaml_and_duplicate_keys_name_the_file_and_line(tmp_path):
    broken = write(tmp_path, "broken.yaml", "model:\n  arch: [faster_rcnn\n")
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: invalid YAML at line 3")):
        load_config(broken)
    duplicate = write(tmp_path, "dup.yaml", "train:\n  batch_size: 2\n  batch_size: 4\n")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{duplicate}: invalid YAML at line 3, column 3: found duplicate key 'batch_size'"),
    ):
        load_config(duplicate)
    top_list = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{top_list}: the top level must be a mapping")):
        load_config(top_list)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "empty.yaml", "# nothing\n")) == ExperimentConfig()


# ----------------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_a_file_gives_file_path_suggestion_and_valid_keys(tmp_path):
    path = write(tmp_path, "exp.yaml", "model:\n  backbone:\n    trainable_layers: 3\n")
    expected = (
        f"{path}: unknown key 'model.backbone.trainable_layers' (did you mean 'trainable_stages'?). "
        f"Valid keys under 'model.backbone': {backbone_keys()}"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_unknown_key_names_the_base_file_that_holds_it(tmp_path):
    base = write(tmp_path, "base.yaml", "train:\n  bach_size: 2\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel: {arch: fcos}\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{base}: unknown key 'train.bach_size' (did you mean 'batch_size'?)")
    ):
        load_config(child)


def test_unknown_key_via_set_fails_the_same_way(tmp_path):
    path = write(tmp_path, "exp.yaml", "model: {arch: faster_rcnn}\n")
    expected = (
        "--set: unknown key 'model.backbone.trainable_layers' (did you mean 'trainable_stages'?). "
        f"Valid keys under 'model.backbone': {backbone_keys()}"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path, ["model.backbone.trainable_layers=2"])


def test_set_creates_no_keys_and_points_to_the_right_level():
    with pytest.raises(
        ConfigError, match=re.escape("--set: unknown key 'train.lr' (did you mean 'train.optimizer.lr'?)")
    ):
        load_config(None, ["train.lr=0.01"])
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "--set: unknown key 'colour'. Valid keys at the top level: model, data, train, eval, output_dir"
        ),
    ):
        load_config(None, ["colour=red"])


def test_non_string_key_gets_the_boolean_hint(tmp_path):
    path = write(tmp_path, "exp.yaml", "train:\n  on: 3\n")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{path}: keys under 'train' must be strings; got True (bool); YAML reads unquoted"),
    ):
        load_config(path)


# ----------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("train: {batch_size: two}", "train.batch_size: expected int, got 'two' (str)"),
        (
            "train: {batch_size: true}",
            "train.batch_size: expected int, got True (bool); true/false is not a number",
        ),
        ("train: {batch_size: [2]}", "train.batch_size: expected int, got [2] (list)"),
        ("train: {batch_size: 2.0}", "train.batch_size: expected int, got 2.0 (float)"),
        ("train: {optimizer: {lr: false}}", "train.optimizer.lr: expected float, got False (bool)"),
        ("train: {deterministic: 1}", "train.deterministic: expected bool, got 1 (int); write true or false"),
        ("output_dir: 5", "output_dir: expected str, got 5 (int)"),
        (
            "train: {optimizer: {name: adam}}",
            "train.optimizer.name: expected one of 'sgd', 'adamw', got 'adam' (str); did you mean 'adamw'?",
        ),
        (
            "data: {on_bad_image: off}",
            "data.on_bad_image: expected one of 'error', 'skip', got False (bool); "
            "YAML reads unquoted on/off/yes/no as booleans; quote it",
        ),
        (
            "model: {backbone: {weights: no}}",
            "model.backbone.weights: expected str or null, got False (bool); YAML reads unquoted on/off/yes/no",
        ),
        ("model: {num_classes: many}", "model.num_classes: expected int or null, got 'many' (str)"),
        ("model: {min_size: [640, big]}", "model.min_size[1]: expected int, got 'big' (str)"),
        ("model: {min_size: {a: 1}}", "model.min_size: expected int or list of int, got {'a': 1} (mapping)"),
        ("model: {anchor_sizes: [32, 64]}", "model.anchor_sizes[0]: expected list of int, got 32 (int)"),
        (
            "model: {head: [1, 2]}",
            "model.head: expected mapping (HeadConfig), got [1, 2] (list); valid keys: ",
        ),
        (
            "model: {backbone: resnet18}",
            "model.backbone: expected mapping (BackboneConfig), got 'resnet18' (str)",
        ),
        (
            "train: {optimizer: {betas: [0.9]}}",
            "train.optimizer.betas: expected list of 2 float, got [0.9] (list); it has 1 items",
        ),
        (
            "data: {train: {augment: [horizontal_flip]}}",
            "data.train.augment[0]: expected mapping, got 'horizontal_flip' (str)",
        ),
    ],
)
def test_type_errors_name_file_key_expected_and_received(tmp_path, yaml_text, message):
    path = write(tmp_path, "exp.yaml", yaml_text + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)


def test_numeric_strings_and_ints_are_accepted_for_floats(tmp_path, caplog):
    path = write(
        tmp_path,
        "exp.yaml",
        "train:\n  optimizer: {lr: 1e-4, weight_decay: 0, momentum: '0.5'}\n  clip_grad_norm: 5\n",
    )
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # the PyYAML trap this guards against
    with caplog.at_level(logging.DEBUG, logger="detection.config"):
        cfg = load_config(path)
    assert cfg.train.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.train.optimizer.weight_decay == 0.0 and isinstance(cfg.train.optimizer.weight_decay, float)
    assert cfg.train.optimizer.momentum == 0.5
    assert cfg.train.clip_grad_norm == 5.0 and isinstance(cfg.train.clip_grad_norm, float)
    assert "reading the string '1e-4' as a float" in caplog.text
    # ... but never for int fields: no silent coercion there.
    with pytest.raises(
        ConfigError, match=re.escape("--set: train.max_iters: expected int or null, got '1e4' (str)")
    ):
        load_config(None, ["train.max_iters=1e4"])


def test_tuple_fields_become_tuples(tmp_path):
    path = write(tmp_path, "exp.yaml", "model:\n  min_size: [640, 800]\n  aspect_ratios: [0.5, 1, 2]\n")
    cfg = load_config(path)
    assert cfg.model.min_size == (640, 800)
    assert cfg.model.aspect_ratios == (0.5, 1.0, 2.0)
    assert all(isinstance(r, float) for r in cfg.model.aspect_ratios)


# ----------------------------------------------------------------------------------------------- overrides


def test_set_wins_over_the_file_and_merges_mappings(tmp_path):
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        train: {batch_size: 2, optimizer: {lr: 0.01, momentum: 0.8}}
        model: {head: {box_detections_per_img: 50}}
        """,
    )
    cfg = load_config(
        path, ["train.batch_size=6", "train.optimizer.lr=0.5", "model.head.box_score_thresh=0.1"]
    )
    assert cfg.train.batch_size == 6
    assert cfg.train.optimizer.lr == 0.5
    assert cfg.train.optimizer.momentum == 0.8  # untouched sibling survives
    assert cfg.model.head == HeadConfig(box_detections_per_img=50, box_score_thresh=0.1)


def test_later_set_wins_and_lists_replace_with_flow_syntax(tmp_path):
    path = write(
        tmp_path,
        "exp.yaml",
        "data:\n  train:\n    augment: [{name: color_jitter, brightness: 0.2}, {name: vertical_flip}]\n",
    )
    cfg = load_config(
        path,
        [
            "data.train.augment=[{name: horizontal_flip}]",
            "train.seed=1",
            "train.seed=2",
            "model.num_classes=null",
        ],
    )
    assert cfg.data.train.augment == ({"name": "horizontal_flip"},)
    assert cfg.train.seed == 2
    assert cfg.model.num_classes is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.batch_size",
            "--set: malformed override 'train.batch_size'; expected KEY=VALUE with a dotted key, "
            "for example train.optimizer.lr=0.01",
        ),
        ("=3", "--set: malformed override '=3'; expected KEY=VALUE"),
        ("train..seed=3", "--set: malformed key 'train..seed' in 'train..seed=3'; empty part between dots"),
        ("train.seed=", "--set: train.seed: empty value in 'train.seed='; write train.seed=null to set null"),
        ("model.min_size=[1,", "--set model.min_size: invalid YAML at line 1"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_parse_overrides_reads_values_as_yaml():
    assert parse_overrides(["a.b=1", "c='on'", "d=[1, 2]", "e=x=y"]) == [
        ("a.b", 1),
        ("c", "on"),
        ("d", [1, 2]),
        ("e", "x=y"),
    ]
    with pytest.raises(ConfigError, match=re.escape("overrides must be a list of KEY=VALUE strings")):
        parse_overrides("a=1")


# ----------------------------------------------------------------------------------------------- validation


def test_backbone_validation_is_reraised_with_file_and_section(tmp_path):
    # BackboneConfig raises plain ValueErrors (no field attribute): the message names the section.
    path = write(tmp_path, "exp.yaml", "model:\n  backbone:\n    trainable_stages: 7\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: model.backbone: trainable_stages must be in 0..5")
    ) as info:
        load_config(path)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(
        ConfigError, match=re.escape("--set: model.backbone.fpn: fpn.out_channels must be a positive integer")
    ):
        load_config(path, ["model.backbone.trainable_stages=3", "model.backbone.fpn.out_channels=0"])
    with pytest.raises(
        ConfigError,
        match=r"--set: model\.backbone: unknown backbone name 'resnet5'.*Did you mean 'resnet50'\?",
    ):
        load_config(None, ["model.backbone.name=resnet5"])


def test_cross_field_error_names_the_file_that_set_the_section(tmp_path):
    path = write(tmp_path, "exp.yaml", "train:\n  epochs: 12\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: train.max_iters (90000) and epochs (12) are both set")
    ):
        load_config(path)
    cfg = load_config(path, ["train.max_iters=null"])
    assert (cfg.train.max_iters, cfg.train.epochs) == (None, 12)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_iters=null", "train.max_iters and epochs are both null; set one of them"),
        ("train.optimizer.lr=0", "train.optimizer.lr must be > 0; got 0.0"),
        ("train.schedule.gamma=1.5", "train.schedule.gamma must be in (0, 1]; got 1.5"),
        ("train.schedule.warmup_factor=0", "train.schedule.warmup_factor must be in (0, 1]; got 0.0"),
        (
            "train.schedule.milestones=[20, 10]",
            "train.schedule.milestones must be positive and strictly increasing; got [20, 10]",
        ),
        ("train.batch_size=0", "train.batch_size must be >= 1; got 0"),
        ("model.num_classes=1", "model.num_classes must be >= 2; got 1"),
        ("model.min_size=[]", "model.min_size must not be empty; give one or more numbers >= 1"),
        ("model.min_size=[800, 0]", "model.min_size must hold numbers >= 1; got [800, 0]"),
        (
            "model.anchor_sizes=[[32], [0]]",
            "model.anchor_sizes must be a non-empty list with one non-empty list of positive ints",
        ),
        (
            "model.head={num_classes: 3}",
            "unknown key 'model.head.num_classes' (did you mean 'model.num_classes'?)",
        ),
        (
            "data.val.ann_file=val.json",
            "data.val.img_dir is not set but ann_file is; a COCO split needs both",
        ),
        ("data.train.augment=[{p: 0.5}]", "data.train.augment[0] must be a mapping with a 'name'"),
        ("data.shapes.min_objects=9", "data.shapes.min_objects must be in 0..max_objects (6); got 9"),
        (
            "eval.iou_types=[bbox, masks]",
            "eval.iou_types[1]: expected one of 'bbox', 'segm', 'keypoints', got 'masks' (str)",
        ),
        (
            "eval.iou_types=[keypoints]",
            "eval.iou_types asks for ['keypoints'], which model.arch='mask_rcnn' does not predict",
        ),
    ],
)
def test_out_of_range_values_are_reported_with_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(f"--set: {message}")):
        load_config(None, [override])


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(ValueError, match=re.escape("warmup_iters must be >= 0; got -1")):
        ScheduleConfig(warmup_iters=-1)
    with pytest.raises(ValueError, match=re.escape("max_iters (5) and epochs (2) are both set")):
        TrainConfig(max_iters=5, epochs=2)
    assert EvalConfig().resolved_iou_types("mask_rcnn_v2") == ("bbox", "segm")
    assert EvalConfig().resolved_iou_types("keypoint_rcnn") == ("bbox", "keypoints")
    assert EvalConfig(iou_types=("bbox",)).resolved_iou_types("mask_rcnn") == ("bbox",)


def test_validate_for_training_requires_train_paths():
    with pytest.raises(
        ConfigError,
        match=re.escape("data.source is 'coco' but data.train.ann_file and data.train.img_dir are not set"),
    ):
        DataConfig().validate_for_training()
    DataConfig(source="shapes").validate_for_training()
    load_config(None, ["data.train={ann_file: a.json, img_dir: imgs}"]).data.validate_for_training()


def test_from_dict_uses_the_given_source_and_prefix():
    with pytest.raises(ConfigError, match=re.escape("exp.yaml: model.backbone.fpn.extra: expected one of")):
        from_dict(BackboneConfig, {"fpn": {"extra": "p7"}}, source="exp.yaml", prefix="model.backbone")
    cfg = from_dict(
        BackboneConfig,
        {"name": "resnet18", "fpn": {"out_channels": 128}},
        source="x",
        prefix="model.backbone",
    )
    assert cfg == BackboneConfig(name="resnet18", fpn=FPNConfig(out_channels=128))


# ----------------------------------------------------------------------------------------------- output


def test_dump_then_load_round_trips(tmp_path):
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        model:
          arch: faster_rcnn
          backbone: {name: resnet18, out_features: [c3, c4, c5], weights: 'on'}
          min_size: [640, 800]
          anchor_sizes: [[32], [64], [128], [256]]
          aspect_ratios: [0.5, 1, 2]
          head: {box_score_thresh: 0.05, rpn_pre_nms_top_n_test: 500, box_head_convs: [64, 64],
                 bbox_reg_weights: [10, 10, 5, 5]}
        data:
          train: {ann_file: a.json, img_dir: imgs, augment: [{name: horizontal_flip, p: 0.5}]}
        train:
          max_iters: null
          epochs: 3
          optimizer: {lr: 1e-5, betas: [0.8, 0.9]}
          schedule: {milestones: [2]}
        eval: {iou_types: [bbox]}
        """,
    )
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    plain = config_to_dict(cfg)
    assert plain["model"]["min_size"] == [640, 800]
    assert plain["model"]["anchor_sizes"] == [[32], [64], [128], [256]]
    assert plain["model"]["backbone"]["weights"] == "on"
    # model.head holds only the options that are set, as resolved configs and checkpoints always had it
    assert plain["model"]["head"] == {
        "rpn_pre_nms_top_n_test": 500,
        "box_score_thresh": 0.05,
        "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
        "box_head_convs": [64, 64],
    }
    assert config_to_dict(ExperimentConfig())["model"]["head"] == {}
    assert (
        yaml.safe_load(out.read_text()) == plain
    )  # plain data only: safe_dump would fail on tuples otherwise


def test_diff_configs_lists_differing_dotted_keys():
    a = config_to_dict(load_config(None, ["model.backbone.name=resnet18"]))
    b = config_to_dict(
        load_config(None, ["model.backbone.name=resnet50", "model.min_size=[1, 2]", "train.seed=1"])
    )
    assert diff_configs(a, b) == [
        "model.backbone.name: resnet18 != resnet50",
        "model.min_size: 800 != [1, 2]",
        "train.seed: 42 != 1",
    ]
    assert diff_configs(a["model"], b["model"], prefix="model") == [
        "model.backbone.name: resnet18 != resnet50",
        "model.min_size: 800 != [1, 2]",
    ]
    assert diff_configs({"x": None}, {"y": 1}) == ["x: null != <missing>", "y: <missing> != 1"]
    assert diff_configs(a, a) == []


def test_origins_follow_files_overrides_and_defaults(tmp_path):
    base = write(tmp_path, "base/b.yaml", "model: {arch: faster_rcnn, max_size: 900}\n")
    child = write(tmp_path, "child.yaml", "base: base/b.yaml\nmodel: {max_size: 1000}\n")
    cfg, origins = load_config_with_origins(child, ["model.head.box_score_thresh=0.2"])
    assert origins["model.arch"] == str(base)
    assert origins["model.max_size"] == str(child)
    assert origins["model.head.box_score_thresh"] == "--set"
    assert "model.min_size" not in origins
    text = format_config(cfg, origins)
    assert f"  arch: faster_rcnn  # {base}\n" in text
    assert f"  max_size: 1000  # {child}\n" in text
    assert "    box_score_thresh: 0.2  # --set\n" in text
    assert "  min_size: 800  # default\n" in text
    assert yaml.safe_load(text) == config_to_dict(cfg)  # the annotated output is still valid YAML
