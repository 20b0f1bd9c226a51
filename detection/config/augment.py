"""``data.train.augment`` checked at load time against the transform table of :mod:`detection.data.transforms`.

The schema holds augmentations as plain mappings; their names, parameters and values are declared by
the transforms themselves. :func:`check_augment` builds each entry with
:func:`detection.data.transforms.build_transforms`, so a config is refused for exactly what training
would refuse, before any dataset is read.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import FieldError

__all__ = ["check_augment", "closest_name"]

# build_transforms numbers the entries of the list it was given; each entry is built alone here, and
# the key (data.train.augment[i]) says which one it was.
_ENTRY_PREFIX = re.compile(r"^transform #0\b:?\s*")
# albumentations validates with pydantic, whose report is several lines of its own vocabulary.
_PYDANTIC_NOISE = re.compile(
    r"\s*For further information visit \S+|\s*\[type=[^\]]*\]|\d+ validation errors? for \w+\s*"
)


def _problem(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return _PYDANTIC_NOISE.sub("", _ENTRY_PREFIX.sub("", text))


def _abbreviation(name: str) -> str:
    """``horizontal_flip`` -> ``hflip``: the initials of every word but the last, then the last word."""
    *words, last = name.split("_")
    return "".join(w[:1] for w in words) + last


def closest_name(name: str, names: Sequence[str]) -> str | None:
    """The known name ``name`` most likely meant: a close spelling, or the one it abbreviates (``hflip``)."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    short = [n for n in names if _abbreviation(n) == name.lower().replace("_", "")]
    return short[0] if short else None


def _check_name(key: str, spec: Any) -> None:
    from ..data.transforms import transform_names

    name = spec.get("name") if isinstance(spec, Mapping) else None
    known = transform_names()
    if isinstance(name, str) and name not in known:
        guess = closest_name(name, known)
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise FieldError(f"{key}.name", f"is {name!r}, not a known transform{hint}; known names: {', '.join(known)}")


def check_augment(cfg: Any) -> None:
    """Build every ``data.train.augment`` entry of ``cfg`` once; raise :class:`FieldError` for the first bad one.

    The error's ``field`` is the full dotted key (``data.train.augment[0]``) and its ``problem`` what
    the transform table says: an unknown name with the closest known one, an unknown or missing
    parameter with the accepted ones, or a value the transform refuses.
    """
    augment = cfg.data.train.augment  # only the training split augments
    if not augment:
        return
    from ..data.transforms import build_transforms

    for i, spec in enumerate(augment):
        _check_name(f"data.train.augment[{i}]", spec)
        try:
            build_transforms([spec], train=True)
        except (ValueError, TypeError) as exc:
            raise FieldError(f"data.train.augment[{i}]", f"is invalid: {_problem(exc)}") from exc
