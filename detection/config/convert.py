"""Strict conversion of plain data (parsed YAML) into the config dataclasses: :func:`from_dict`.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the source (the
file, or ``--set``, that set the key), the dotted key, what was expected and what was received. The
only coercions are int -> float and numeric strings -> float (PyYAML reads ``1e-4`` as a string).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError, FieldError
from .fields import describe, hints, is_under, is_union, join, parent, type_name

__all__ = ["BOOL_HINT", "from_dict", "located_error"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

BOOL_HINT = "YAML reads unquoted on/off/yes/no as booleans; quote it"
_NUMBER_RE = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Mismatch(ConfigError):
    """A value whose type does not fit its annotation; ``path`` and ``hint`` let unions re-describe it."""

    def __init__(self, message: str, path: str, hint: str) -> None:
        super().__init__(message)
        self.path = path
        self.hint = hint


@dataclass
class _Context:
    source: str
    origins: Mapping[str, str] | None
    root: type
    root_prefix: str = ""


def _set_by(ctx: _Context, path: str, stop: str | None = None) -> str | None:
    """The source that set ``path`` or its nearest recorded ancestor below ``stop``; ``None`` if none did."""
    while ctx.origins and path and path != stop:
        if path in ctx.origins:
            return ctx.origins[path]
        path = parent(path)
    return None


def _source_of(ctx: _Context, path: str) -> str:
    return _set_by(ctx, path) or ctx.source


def _section_sources(cls: type, path: str, ctx: _Context) -> str:
    """Sources that set any non-section field of ``cls`` at ``path``: the inputs of a cross-field rule."""
    found: list[str] = []
    if ctx.origins:
        own = [
            join(path, f.name)
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(hints(cls)[f.name])
        ]
        for key, origin in ctx.origins.items():
            if origin not in found and any(is_under(key, f) for f in own):
                found.append(origin)
    return ", ".join(found) if found else ctx.source


def _mismatch(tp: Any, value: Any, path: str, ctx: _Context, hint: str = "") -> _Mismatch:
    where = f"{_source_of(ctx, path)}: {path or '<top level>'}"
    text = f"{where}: expected {describe(tp)}, got {value!r} ({type_name(value)})"
    return _Mismatch(text + (f"; {hint}" if hint else ""), path, hint)


def _shape_matches(tp: Any, value: Any) -> bool:
    """Whether ``value``'s container shape fits ``tp`` (used to pick a member of a union)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if isinstance(value, (list, tuple)):
        return origin in (tuple, list)
    if isinstance(value, Mapping):
        return dataclasses.is_dataclass(tp) or origin in (dict, Mapping) or tp is dict
    return not (dataclasses.is_dataclass(tp) or origin in (tuple, list, dict, Mapping) or tp is dict)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _convert(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            valid = ", ".join(f.name for f in dataclasses.fields(tp))
            raise _mismatch(tp, value, path, ctx, f"valid keys: {valid}")
        return _convert_dataclass(tp, value, path, ctx)
    if is_union(tp):
        return _convert_union(tp, value, path, ctx)
    if origin is Literal:
        return _convert_literal(tp, value, path, ctx)
    if origin in (tuple, list):
        return _convert_sequence(tp, value, path, ctx)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path, ctx)
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        for key in value:
            _check_key(key, path, ctx)
        return {key: _convert(value_type, item, join(path, key), ctx) for key, item in value.items()}
    if tp in (bool, int, float, str):
        return _convert_scalar(tp, value, path, ctx)
    raise TypeError(f"{path}: the annotation {tp!r} is not supported by the config converter")


def _convert_literal(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    choices = get_args(tp)
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    hint = ""
    if isinstance(value, bool):
        hint = BOOL_HINT
    elif isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        hint = f"did you mean {close[0]!r}?" if close else ""
    raise _mismatch(tp, value, path, ctx, hint)


def _convert_scalar(tp: type, value: Any, path: str, ctx: _Context) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value, path, ctx, "write true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(
            tp, value, path, ctx, BOOL_HINT if isinstance(value, bool) else "quote it to pass text"
        )
    if _is_int(value):
        return value if tp is int else float(value)
    if tp is float and isinstance(value, float):
        return value
    if tp is float and isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; accept it where a float is expected.
        logger.debug("%s: %s: reading the string %r as a float", _source_of(ctx, path), path, value)
        return float(value)
    raise _mismatch(tp, value, path, ctx, "true/false is not a number" if isinstance(value, bool) else "")


def _convert_sequence(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _mismatch(tp, value, path, ctx)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _mismatch(tp, value, path, ctx, f"it has {len(value)} items")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [_convert(t, v, f"{path}[{i}]", ctx) for i, (t, v) in enumerate(zip(item_types, value))]
    return tuple(items) if origin is tuple else items


def _convert_union(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(tp, value, path, ctx)
    candidates = [a for a in args if a is not type(None) and _shape_matches(a, value)]
    if not candidates:
        raise _mismatch(tp, value, path, ctx, BOOL_HINT if isinstance(value, bool) and str in args else "")
    if len(candidates) == 1:
        try:
            return _convert(candidates[0], value, path, ctx)
        except _Mismatch as exc:
            if exc.path != path:
                raise
            # Re-describe the expected type as the whole union ("int or null"), keeping the hint.
            raise _mismatch(tp, value, path, ctx, exc.hint) from None
    for candidate in candidates:
        try:
            return _convert(candidate, value, path, ctx)
        except _Mismatch:
            continue
    raise _mismatch(tp, value, path, ctx)


def _check_key(key: Any, path: str, ctx: _Context) -> None:
    if not isinstance(key, str):
        hint = f"; {BOOL_HINT}" if isinstance(key, bool) else ""
        raise ConfigError(
            f"{_source_of(ctx, path)}: keys under '{path or '<top level>'}' must be strings; got {key!r} "
            f"({type_name(key)}){hint}"
        )


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        path = join(prefix, f.name)
        paths.append(path)
        if dataclasses.is_dataclass(hints(cls)[f.name]):
            paths.extend(_schema_paths(hints(cls)[f.name], path))
    return paths


def _unknown_key(cls: type, key: str, path: str, ctx: _Context) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    full = join(path, key)
    # A right name at the wrong level (train.lr for train.optimizer.lr, model.head.min_size for
    # model.min_size) is the commonest slip, so a key that exists elsewhere is named first.
    elsewhere = [p for p in _schema_paths(ctx.root, ctx.root_prefix) if p.rsplit(".", 1)[-1] == key]
    close = difflib.get_close_matches(key, names, n=1)
    if elsewhere:
        suggestion = f" (did you mean {' or '.join(repr(p) for p in elsewhere[:3])}?)"
    else:
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"under '{path}'" if path else "at the top level"
    return ConfigError(
        f"{_source_of(ctx, full)}: unknown key '{full}'{suggestion}. Valid keys {where}: {', '.join(names)}"
    )


def _validation_error(cls: type, exc: Exception, path: str, ctx: _Context) -> ConfigError:
    """A section's ``validate()`` error as one line: the source, the dotted key (where known), the problem.

    An error with ``field`` and ``problem`` attributes (:class:`FieldError`) names its key; the source is
    whatever set that key, or, when it kept its default, whatever set the section's other fields.
    Any other error is reported under the section's path.
    """
    field, problem = getattr(exc, "field", None), getattr(exc, "problem", None)
    if isinstance(field, str) and isinstance(problem, str):
        key = join(path, field)
        source = _set_by(ctx, key, stop=path or None) or _section_sources(cls, path, ctx)
        return ConfigError(f"{source}: {key} {problem}")
    return ConfigError(f"{_section_sources(cls, path, ctx)}: {path or '<top level>'}: {exc}")


def _convert_dataclass(cls: type[_T], data: Mapping[str, Any], path: str, ctx: _Context) -> _T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        _check_key(key, path, ctx)
        if key not in names:
            raise _unknown_key(cls, key, path, ctx)
    kwargs = {key: _convert(hints(cls)[key], value, join(path, key), ctx) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise _validation_error(cls, exc, path, ctx) from exc


def from_dict(
    cls: type[_T],
    data: Mapping[str, Any],
    *,
    source: str,
    prefix: str = "",
    origins: Mapping[str, str] | None = None,
) -> _T:
    """Build the dataclass ``cls`` from plain data (parsed YAML), strictly.

    Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`. The only coercions
    are int -> float and numeric strings -> float (PyYAML reads ``1e-4`` as a string).

    Args:
        cls: a dataclass whose fields are annotated with int, float, bool, str, ``Literal[...]``,
            ``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[str, X]``, ``Any`` or nested dataclasses.
        data: a mapping with string keys, e.g. from ``yaml.safe_load``.
        source: what to call the origin of ``data`` in messages (usually a file name).
        prefix: dotted path of ``data`` inside the whole config (``"model.backbone"``), for messages.
        origins: optional dotted path -> source map (from :func:`load_config_with_origins`); when given,
            each error names the file that set the offending key instead of ``source``.

    Returns:
        An instance of ``cls``.
    """
    ctx = _Context(source=source, origins=origins, root=cls, root_prefix=prefix)
    if not isinstance(data, Mapping):
        raise _mismatch(cls, data, prefix, ctx)
    return _convert_dataclass(cls, data, prefix, ctx)


def located_error(exc: FieldError, *, source: str, origins: Mapping[str, str] | None = None) -> ConfigError:
    """A :class:`FieldError` whose ``field`` is a full dotted key, as one line naming the file that set it.

    For checks made after :func:`from_dict` (those that need other modules' tables); ``source`` is
    named when no entry of ``origins`` covers the key.
    """
    ctx = _Context(source=source, origins=origins, root=object)
    return ConfigError(f"{_source_of(ctx, exc.field)}: {exc.field} {exc.problem}")
