"""Writing a config out: plain dicts, YAML (with origins), dotted-key diffs and the key reference."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from collections.abc import Mapping
from typing import Any

import yaml

from ..io import atomic_write_text
from .fields import BOUND, describe, doc_of, hints, join
from .head import NEEDS, HeadConfig
from .loader import BASE_KEY, DEFAULT_SOURCE
from .schema import ExperimentConfig

__all__ = ["config_reference", "config_to_dict", "diff_configs", "dump_config", "format_config"]

_MISSING = object()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain, YAML-dumpable data (nested dicts; tuples become lists; ``model.head`` only what is set)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict expects a config dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def _to_plain(value: Any) -> Any:
    if isinstance(value, HeadConfig):
        # model.head lists only the options that are set (null keeps torchvision's default), so resolved
        # configs and checkpoints keep the format they always had ({} or the few options used).
        return _to_plain(value.to_kwargs())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically; ``load_config(path) == cfg`` holds for the written file."""
    atomic_write_text(path, format_config(cfg))


def _flow(value: Any) -> str:
    """One-line YAML for a value (``resnet18``, ``null``, ``[32, 64]``, ``{name: horizontal_flip}``)."""
    text = yaml.safe_dump(
        value, default_flow_style=True, width=2**31 - 1, allow_unicode=True, sort_keys=False
    )
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


def format_config(cfg: Any, origins: Mapping[str, str] | None = None) -> str:
    """The config as YAML text; with ``origins``, each leaf ends in ``# <file>``, ``# --set`` or ``# default``.

    Args:
        cfg: a config dataclass or the plain dict from :func:`config_to_dict`.
        origins: dotted key -> source, as returned by :func:`load_config_with_origins`.
    """
    data = cfg if isinstance(cfg, Mapping) else config_to_dict(cfg)
    if origins is None:
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    lines: list[str] = []

    def emit(tree: Mapping[str, Any], indent: int, prefix: str) -> None:
        for key, value in tree.items():
            path = join(prefix, str(key))
            if isinstance(value, Mapping) and value:
                lines.append(f"{' ' * indent}{_flow(key)}:")
                emit(value, indent + 2, path)
            else:
                source = origins.get(path, DEFAULT_SOURCE)
                lines.append(f"{' ' * indent}{_flow(key)}: {_flow(value)}  # {source}")

    emit(data, 0, "")
    return "\n".join(lines) + "\n"


def _diff_value(value: Any) -> str:
    return "<missing>" if value is _MISSING else _flow(value)


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs, as ``"key: <a value> != <b value>"``.

    Args:
        a: a plain config (or section) from :func:`config_to_dict`; config dataclasses are accepted too.
        b: the config to compare with.
        prefix: dotted path of ``a`` / ``b`` inside the whole config, prepended to each key.

    Returns:
        One line per differing leaf, in ``a``'s key order then keys only in ``b``, e.g.
        ``["model.backbone.name: resnet18 != resnet50"]``; empty when equal.
    """
    a = a if isinstance(a, Mapping) else config_to_dict(a)
    b = b if isinstance(b, Mapping) else config_to_dict(b)
    lines: list[str] = []
    for key in [*a, *(k for k in b if k not in a)]:
        path = join(prefix, str(key))
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            lines.extend(diff_configs(left, right, path))
        elif left is _MISSING or right is _MISSING or _to_plain(left) != _to_plain(right):
            lines.append(f"{path}: {_diff_value(_to_plain(left))} != {_diff_value(_to_plain(right))}")
    return lines


_WRAP = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")


def _description(f: dataclasses.Field[Any]) -> list[str]:
    """The wrapped description of a field (``metadata["doc"]``), with the archs it applies to."""
    text = (doc_of(f) or "(no description)").replace("``", "`")
    if f.metadata.get(NEEDS) is not None:
        text += f" Applies to {f.metadata[NEEDS]}."
    return _WRAP.wrap(text)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _reference_lines(section: type, prefix: str) -> list[str]:
    out: list[str] = []
    for f in dataclasses.fields(section):
        path, tp = join(prefix, f.name), hints(section)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{path}  (section: {tp.__name__})", *_description(f), "", *_reference_lines(tp, path)]
            continue
        default = _default(f)
        shown = "required" if default is _MISSING else f"default: {_flow(_to_plain(default))}"
        bound = f"; {f.metadata[BOUND]}" if f.metadata.get(BOUND) is not None else ""
        out += [f"{path}  ({describe(tp)}; {shown}{bound})", *_description(f), ""]
    return out


def config_reference(cls: type = ExperimentConfig) -> str:
    """Every dotted key with its type, default, range and description (``metadata["doc"]`` of each field).

    This is the configuration reference printed by ``tools/print_config.py --reference``; since it is
    generated from the dataclasses, it cannot drift from the code.
    """
    out = [
        f"Configuration reference ({cls.__name__}). YAML files hold only differences from these defaults.",
        "",
        f"{BASE_KEY}  (path or list of paths; top level only)",
        *_WRAP.wrap(
            "Files this one inherits from, relative to it; loaded depth-first in order, then this file is merged "
            "on top (mappings merge, lists and scalars replace)."
        ),
        "",
        *_reference_lines(cls, ""),
    ]
    return "\n".join(out).rstrip() + "\n"
