"""Declared feature metadata: :class:`FeatureSpec`, :class:`FeatureInfo` and :class:`ShapeSpec`.

Every feature-producing module of this package records, while it is built, one
``FeatureSpec(name, channels, stride)`` per output. Consumers (anchor generators, RoI poolers, your own
heads) derive their numbers from it instead of retyping 256/512/1024/2048 or 4/8/16/32.

``FeatureInfo`` speaks the conventions users already know:

* iteration yields ``(name, channels, stride)`` triples;
* timm: ``feature_info.channels()``, ``feature_info.reduction()``, ``feature_info.get_dicts()``;
* detectron2: ``module.output_shape()`` returns ``{name: ShapeSpec(channels=..., stride=...)}``
  (built by :meth:`FeatureInfo.output_shape`).

Example:
    >>> info = FeatureInfo([FeatureSpec("p2", 256, 4), FeatureSpec("p3", 256, 8)])
    >>> info.names(), info.channels(), info.reduction()
    (('p2', 'p3'), (256, 256), (4, 8))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, overload

__all__ = ["FeatureInfo", "FeatureSpec", "ShapeSpec"]


class FeatureSpec(NamedTuple):
    """One output of a feature-producing module.

    Attributes:
        name: output name; the digit is the pyramid level (``c3``, ``p4``), which equals log2 of the
            stride unless the stage is dilated.
        channels: number of channels of the output tensor.
        stride: ratio of the input size to the output size (the timm ``reduction``).
    """

    name: str
    channels: int
    stride: int


class ShapeSpec(NamedTuple):
    """detectron2-compatible shape description (same field names as ``detectron2.layers.ShapeSpec``)."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class FeatureInfo(Sequence[FeatureSpec]):
    """An immutable, validated, ordered collection of :class:`FeatureSpec`.

    Validation (raised as ``ValueError`` at construction): names are unique and non-empty, channels
    are positive, strides are powers of two and never decrease along the sequence (they may repeat
    when a stage is dilated).

    Args:
        specs: the outputs, in the order the module returns them.
    """

    def __init__(self, specs: Iterable[FeatureSpec | tuple[str, int, int]]) -> None:
        items = tuple(FeatureSpec(*s) for s in specs)
        names = [s.name for s in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique, got duplicates {duplicates} in {names}")
        for spec in items:
            if not spec.name:
                raise ValueError(f"feature names must be non-empty strings, got {spec!r}")
            if int(spec.channels) <= 0:
                raise ValueError(f"feature {spec.name!r} must have a positive channel count, got {spec.channels}")
            if not _is_power_of_two(int(spec.stride)):
                raise ValueError(f"feature {spec.name!r} must have a power-of-two stride, got {spec.stride}")
        for prev, cur in zip(items, items[1:]):
            if cur.stride < prev.stride:
                raise ValueError(
                    f"feature strides must not decrease: {prev.name!r} has stride {prev.stride} but the next one, "
                    f"{cur.name!r}, has stride {cur.stride}"
                )
        self._specs = items
        self._index = {s.name: i for i, s in enumerate(items)}

    # -- Sequence protocol -------------------------------------------------------------------------
    @overload
    def __getitem__(self, key: int | str) -> FeatureSpec: ...

    @overload
    def __getitem__(self, key: slice) -> FeatureInfo: ...

    def __getitem__(self, key: int | str | slice) -> FeatureSpec | FeatureInfo:
        """Look a spec up by position or by name; a slice gives a new ``FeatureInfo``."""
        if isinstance(key, slice):
            return FeatureInfo(self._specs[key])
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no feature named {key!r}; available: {list(self._index)}")
            return self._specs[self._index[key]]
        return self._specs[key]

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[FeatureSpec]:
        return iter(self._specs)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._index
        return item in self._specs

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FeatureInfo):
            return self._specs == other._specs
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._specs)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}(ch={s.channels}, stride={s.stride})" for s in self._specs)
        return f"FeatureInfo([{inner}])"

    # -- Accessors (timm names, plus `names`/`strides`) ---------------------------------------------
    def names(self) -> tuple[str, ...]:
        """Output names in order, e.g. ``('p2', 'p3', 'p4', 'p5', 'p6')``."""
        return tuple(s.name for s in self._specs)

    def channels(self, idx: int | Sequence[int] | None = None) -> tuple[int, ...] | int:
        """Channel counts in order (timm's ``feature_info.channels()``); ``idx`` selects entries."""
        return self._pick("channels", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> tuple[int, ...] | int:
        """Strides in order (timm's ``feature_info.reduction()``); ``idx`` selects entries."""
        return self._pick("stride", idx)

    def strides(self) -> tuple[int, ...]:
        """Strides in order; the same as :meth:`reduction` with no argument."""
        return tuple(s.stride for s in self._specs)

    def get_dicts(self, keys: Sequence[str] | None = None) -> list[dict[str, object]]:
        """timm-style list of dicts: ``[{"name": "c2", "num_chs": 256, "reduction": 4}, ...]``."""
        rows = [{"name": s.name, "num_chs": s.channels, "reduction": s.stride} for s in self._specs]
        if keys is not None:
            rows = [{k: row[k] for k in keys} for row in rows]
        return rows

    def select(self, names: Iterable[str]) -> FeatureInfo:
        """A new ``FeatureInfo`` with only ``names``, in this object's order; unknown names raise ``KeyError``."""
        wanted = list(names)
        missing = [n for n in wanted if n not in self._index]
        if missing:
            raise KeyError(f"unknown feature name(s) {missing}; available: {list(self._index)}")
        return FeatureInfo(s for s in self._specs if s.name in wanted)

    def output_shape(self) -> dict[str, ShapeSpec]:
        """detectron2-style ``{name: ShapeSpec(channels, stride)}``."""
        return {s.name: ShapeSpec(channels=s.channels, stride=s.stride) for s in self._specs}

    def _pick(self, attr: str, idx: int | Sequence[int] | None) -> tuple[int, ...] | int:
        if idx is None:
            return tuple(getattr(s, attr) for s in self._specs)
        if isinstance(idx, int):
            return getattr(self._specs[idx], attr)
        return tuple(getattr(self._specs[i], attr) for i in idx)
