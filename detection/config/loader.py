"""Loading a config: YAML files, ``base:`` inheritance, ``--set`` overrides, and where each value came from.

YAML files hold only differences from the dataclass defaults. A file may inherit from others through
the reserved top-level key ``base:`` (a path or a list of paths, relative to the file): bases are
resolved depth-first in order, then the file is deep-merged on top. Mappings merge; lists and scalars
replace. Command-line overrides (``--set train.optimizer.lr=0.01``) are applied after the file merge
and go through the same strict converter (:func:`~detection.config.convert.from_dict`), so a typo on
the command line fails exactly like a typo in a file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml

from .augment import check_augment
from .convert import from_dict, located_error
from .data import check_source_conflict
from .errors import ConfigError, ConfigFileNotFoundError, FieldError
from .fields import is_under, join, type_name
from .schema import ExperimentConfig

__all__ = [
    "BASE_KEY",
    "DEFAULT_SOURCE",
    "OVERRIDE_SOURCE",
    "load_config",
    "load_config_with_origins",
    "parse_overrides",
]

_T = TypeVar("_T")

#: Source label of values that no file and no override set.
DEFAULT_SOURCE = "default"
#: Source label of command-line overrides.
OVERRIDE_SOURCE = "--set"
#: The reserved top-level key naming the files a config inherits from.
BASE_KEY = "base"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"
    return "invalid YAML: " + " ".join(str(exc).split())


def _parse_yaml(text: str, display: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{display}: {_yaml_error(exc)}") from None


def _mark(tree: Any, origin: str, prefix: str, origins: dict[str, str]) -> None:
    """Record ``origin`` for ``prefix`` and every mapping key below it (lists are leaves)."""
    origins[prefix] = origin
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            _mark(value, origin, join(prefix, str(key)), origins)


def _merge(
    dst: dict[Any, Any],
    dst_origins: dict[str, str],
    src: Mapping[Any, Any],
    src_origins: Mapping[str, str],
    prefix: str = "",
) -> None:
    """Deep-merge ``src`` into ``dst``: mappings merge, lists and scalars replace; origins follow the values."""
    for key, value in src.items():
        path = join(prefix, str(key))
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            if path in src_origins:
                dst_origins[path] = src_origins[path]
            _merge(dst[key], dst_origins, value, src_origins, path)
            continue
        for stale in [p for p in dst_origins if is_under(p, path)]:
            del dst_origins[stale]
        dst[key] = copy.deepcopy(value)
        dst_origins.update({p: o for p, o in src_origins.items() if is_under(p, path)})


def _base_paths(raw: Any, display: str) -> list[str]:
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
        raise ConfigError(
            f"{display}: '{BASE_KEY}' must be a path or a list of paths (relative to this file); got {raw!r}"
        )
    return items


def _read_file(path: Path, display: str) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileNotFoundError(f"config file '{display}' not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config path '{display}' is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{display}': {exc}") from None
    data = _parse_yaml(text, display)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{display}: the top level must be a mapping of keys (model:, train:, ...); got {type_name(data)}"
        )
    return data


def _resolve_file(
    path: Path, display: str, chain: list[tuple[Path, str]]
) -> tuple[dict[Any, Any], dict[str, str]]:
    """Load ``path`` with its bases (depth-first, in order), merged; returns the tree and its origins."""
    resolved = path.resolve()
    for previous, _ in chain:
        if previous == resolved:
            names = [name for _, name in chain] + [display]
            raise ConfigError(f"{chain[-1][1]}: '{BASE_KEY}' cycle: {' -> '.join(names)}")
    data = _read_file(path, display)
    bases = _base_paths(data.pop(BASE_KEY, None), display)
    merged: dict[Any, Any] = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_display = os.path.normpath(os.path.join(os.path.dirname(display), os.path.expanduser(base)))
        base_path = path.parent / os.path.expanduser(base)
        if not base_path.is_file():
            raise ConfigError(
                f"{display}: base file '{base}' not found (looked for '{base_path}'); '{BASE_KEY}' paths are "
                "relative to the file that names them"
            )
        tree, tree_origins = _resolve_file(base_path, base_display, [*chain, (resolved, display)])
        _merge(merged, origins, tree, tree_origins)
    own_origins: dict[str, str] = {}
    for key, value in data.items():
        _mark(value, display, str(key), own_origins)
    _merge(merged, origins, data, own_origins)
    return merged, origins


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``"a.b.c=value"`` strings into ``(dotted_key, value)``; values are read as YAML.

    Examples: ``train.optimizer.lr=0.01`` -> 0.01, ``model.min_size=[640,800]`` -> [640, 800],
    ``data.train.augment=[{name: horizontal_flip}]`` -> a list with one mapping, ``model.num_classes=null``
    -> None. Quote text that YAML would read otherwise (``'train.device="on"'``).
    """
    if isinstance(overrides, str):
        raise ConfigError(
            f"{OVERRIDE_SOURCE}: overrides must be a list of KEY=VALUE strings, got the string {overrides!r}"
        )
    parsed = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: malformed override {item!r}; expected KEY=VALUE with a dotted key, "
                "for example train.optimizer.lr=0.01 or model.backbone.name=resnet18"
            )
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: malformed key {key!r} in {item!r}; empty part between dots"
            )
        if not text.strip():
            raise ConfigError(
                f"{OVERRIDE_SOURCE}: {key}: empty value in {item!r}; write {key}=null to set null"
            )
        parsed.append((key, _parse_yaml(text, f"{OVERRIDE_SOURCE} {key}")))
    return parsed


def _apply_overrides(merged: dict[Any, Any], origins: dict[str, str], overrides: Sequence[str]) -> None:
    for key, value in parse_overrides(overrides):
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part.strip(): nested}
        nested_origins: dict[str, str] = {}
        for name, sub in nested.items():
            _mark(sub, OVERRIDE_SOURCE, name, nested_origins)
        _merge(merged, origins, nested, nested_origins)


@overload
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ...
) -> tuple[ExperimentConfig, dict[str, str]]: ...
@overload
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ..., *, cls: type[_T]
) -> tuple[_T, dict[str, str]]: ...
def load_config_with_origins(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, cls: type[Any] = ExperimentConfig
) -> tuple[Any, dict[str, str]]:
    """Like :func:`load_config`, and also return where every value came from.

    Returns:
        ``(config, origins)``: ``origins`` maps each dotted key that a file or override set to that file
        (as displayed: the path given, bases joined to the including file's folder) or ``"--set"``.
        Sections appear too, with the last source that touched them. Keys absent from it hold their default.
    """
    merged: dict[Any, Any] = {}
    origins: dict[str, str] = {}
    source = DEFAULT_SOURCE
    if path is not None:
        source = os.fspath(path)
        merged, origins = _resolve_file(Path(os.path.expanduser(source)), source, [])
    _apply_overrides(merged, origins, overrides)
    if cls is ExperimentConfig:
        check_source_conflict(merged, origins)
    if overrides and path is None:
        source = OVERRIDE_SOURCE
    cfg = from_dict(cls, merged, source=source, origins=origins)
    if isinstance(cfg, ExperimentConfig):
        try:
            check_augment(cfg)
        except FieldError as exc:
            raise located_error(exc, source=source, origins=origins) from None
    return cfg, origins


@overload
def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ...) -> ExperimentConfig: ...
@overload
def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ..., *, cls: type[_T]
) -> _T: ...
def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, cls: type[Any] = ExperimentConfig
) -> Any:
    """Load a YAML experiment config with its ``base:`` files and ``--set`` overrides, strictly.

    Args:
        path: the YAML file, or ``None`` for the defaults (plus ``overrides``).
        overrides: ``"dotted.key=value"`` strings, values read as YAML, applied after the file merge
            with the same rules (mappings merge, lists and scalars replace) and the same converter.
        cls: the root dataclass (``ExperimentConfig``).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigFileNotFoundError: ``path`` does not exist.
        ConfigError: invalid YAML, a missing base, a ``base:`` cycle, an unknown key, a wrong type, an
            out-of-range value, anchors for the wrong number of pyramid levels, or an augmentation that
            :mod:`detection.data.transforms` refuses; the message names the file (or ``--set``) and the
            dotted key.

    Example::

        cfg = load_config("configs/smoke/tiny_cpu.yaml", ["train.max_iters=4", "model.backbone.name=resnet34"])
    """
    return load_config_with_origins(path, overrides, cls=cls)[0]
