"""Experiment configuration: the typed schema, the strict YAML loader and the renderers.

* :mod:`.schema` (with :mod:`.head` for ``model.head`` and :mod:`.data` for ``data``): frozen
  dataclasses whose defaults are the defaults, each field documented and range-checked where it is
  declared (:mod:`.fields`);
* :mod:`.loader`: YAML files with ``base:`` inheritance and ``--set`` overrides, converted strictly by
  :mod:`.convert`, with the file each value came from; :mod:`.augment` then checks every
  ``data.<split>.augment`` entry against the transform table of :mod:`detection.data.transforms`;
* :mod:`.render`: plain dicts, YAML dumps (optionally annotated with origins), diffs, the reference.

Example::

    cfg = load_config("configs/mask_rcnn_r50_fpn_1x_coco.yaml", ["train.batch_size=4"])
    cfg.model.backbone.name        # "resnet50"
    build_detector(cfg.model.arch, cfg.model.backbone, **cfg.model.head.to_kwargs())
    dump_config(cfg, "output/config.yaml")   # load_config("output/config.yaml") == cfg

Every user error raises :class:`ConfigError` with the file (or ``--set``), the full dotted key, what
was expected and what was received.
"""

from .convert import from_dict
from .data import CopyPasteConfig, DataConfig, DatasetConfig, ShapesConfig, TrainDatasetConfig
from .errors import ConfigError, ConfigFileNotFoundError, FieldError
from .head import HeadConfig
from .loader import load_config, load_config_with_origins, parse_overrides
from .render import config_reference, config_to_dict, diff_configs, dump_config, format_config
from .schema import (
    AmpConfig,
    EmaConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TTAConfig,
)

__all__ = [
    "AmpConfig",
    "ConfigError",
    "ConfigFileNotFoundError",
    "CopyPasteConfig",
    "DataConfig",
    "DatasetConfig",
    "EmaConfig",
    "TrainDatasetConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FieldError",
    "HeadConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "ShapesConfig",
    "TrainConfig",
    "TTAConfig",
    "config_reference",
    "config_to_dict",
    "diff_configs",
    "dump_config",
    "format_config",
    "from_dict",
    "load_config",
    "load_config_with_origins",
    "parse_overrides",
]
