"""How a config field is declared and described: :func:`option`, :class:`Bound` and the type names.

Every field of the schema is declared with :func:`option`, which stores its description under
``metadata["doc"]`` and its numeric range under ``metadata["bound"]``. :func:`check_bounds` is the one
place ranges are checked; the reference (``tools/print_config.py --reference``) prints both.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import FieldError

__all__ = [
    "Bound",
    "Section",
    "check_bounds",
    "describe",
    "doc_of",
    "hints",
    "is_under",
    "join",
    "option",
    "parent",
    "type_name",
]

DOC = "doc"
BOUND = "bound"


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """The range of a number: ``low <= value <= high``, either end open or absent.

    A list value is checked item by item and must not be empty.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high or 0)}"


#: Counts: at least one.
COUNT = Bound(1)
#: Periods, sizes and seeds that may be zero.
NON_NEGATIVE = Bound(0)
#: Strictly positive numbers (learning rates, scales, sides in pixels).
POSITIVE = Bound(0, low_open=True)
#: Probabilities, fractions, IoU and score thresholds.
UNIT = Bound(0, 1)
#: Fractions and factors that must not be zero.
POSITIVE_FRACTION = Bound(0, 1, low_open=True)


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    factory: Callable[[], Any] | None = None,
    bound: Bound | None = None,
    **metadata: Any,
) -> Any:
    """A dataclass field with its description (``metadata["doc"]``) and optional range (``metadata["bound"]``)."""
    meta = {DOC: doc, **({BOUND: bound} if bound is not None else {}), **metadata}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def doc_of(f: dataclasses.Field[Any]) -> str | None:
    """The description of a field, or ``None`` where it has none."""
    return f.metadata.get(DOC)


def check_bounds(section: Any) -> None:
    """Raise :class:`FieldError` for the first field of ``section`` outside its :class:`Bound` (``None`` passes)."""
    for f in dataclasses.fields(section):
        bound, value = f.metadata.get(BOUND), getattr(section, f.name)
        if bound is None or value is None:
            continue
        if not isinstance(value, (list, tuple)):
            if not bound.contains(value):
                raise FieldError(f.name, f"must be {bound}; got {value!r}")
        elif not value:
            raise FieldError(f.name, f"must not be empty; give one or more numbers {bound}")
        elif not all(bound.contains(v) for v in value):
            raise FieldError(f.name, f"must hold numbers {bound}; got {list(value)}")


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def join(prefix: str, key: str) -> str:
    """``prefix.key``, or ``key`` at the top level."""
    return f"{prefix}.{key}" if prefix else key


def is_under(path: str, prefix: str) -> bool:
    """Whether dotted ``path`` is ``prefix`` or lies below it."""
    return path == prefix or path.startswith(prefix + ".")


def parent(path: str) -> str:
    """The dotted path one level up: ``a.b[0]`` -> ``a.b``, ``a.b`` -> ``a``, ``a`` -> ``""``."""
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


def type_name(value: Any) -> str:
    """What a YAML value is, in YAML's words: ``null``, ``mapping``, ``list``, ``int``..."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def describe(tp: Any) -> str:
    """Human-readable form of an annotation: ``int``, ``one of 'a', 'b'``, ``list of float or null``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if is_union(tp):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            inner = {describe(a) for a in args}
            if len(inner) == 1:
                return f"list of {len(args)} {inner.pop()}"
            return f"list [{', '.join(map(describe, args))}]"
        return f"list of {describe(args[0]) if args else 'any value'}"
    if origin in (dict, Mapping) or tp is dict:
        value_type = args[1] if len(args) == 2 else Any
        return "mapping" if value_type is Any else f"mapping of str to {describe(value_type)}"
    return tp.__name__ if isinstance(tp, type) else str(tp)


class Section:
    """Base of the config sections: a built section is checked at once, ranges first, then its own rules.

    Subclasses that add rules override :meth:`validate` and call ``super().validate()`` first.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its :class:`Bound`; raises :class:`FieldError`."""
        check_bounds(self)
