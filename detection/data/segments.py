"""Checks of COCO ``segmentation`` values, so that a mask is decoded right or refused by name.

pycocotools decodes what it is given without checking it: an RLE whose counts cover fewer than H×W pixels
decodes to uninitialised memory, a malformed compressed string to garbage, and a polygon with fewer than
3 points (or an odd length, or NaN coordinates) to an empty mask. :func:`segmentation_problem` says what
is wrong with one value before any of that can happen.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["rle_string_counts", "segmentation_problem"]


def rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), ``None`` if malformed.

    Each run is a little-endian group of 5-bit digits, written as ``chr(48 + digit)`` with 0x20 marking
    that more digits follow and 0x10 in the last digit as the sign; from the third run on, a run is stored
    as its difference from the run two before.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return None if shift else runs


def _rle_problem(seg: dict[str, Any], height: int, width: int) -> str | None:
    size = seg.get("size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and list(size) == [height, width]):
        return f"has an RLE of size {size!r} but its image is [{height}, {width}] (height, width)"
    counts = seg["counts"]
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            return "has RLE counts that are not ASCII"
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            return "has a compressed RLE string that does not decode"
    elif isinstance(counts, list) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts):
        runs = [int(v) for v in counts]
    else:
        return "has RLE counts that are neither a compressed string nor a list of integers"
    if any(v < 0 for v in runs):
        return "has a negative RLE run length"
    if sum(runs) != height * width:
        return f"has RLE counts summing to {sum(runs)} pixels, not height x width = {height * width}"
    return None


def _polygon_problem(polygons: list[Any]) -> str | None:
    if not polygons:
        return "has an empty segmentation list (no polygon)"
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list):
            return f"has polygon {k} that is a {type(poly).__name__}, not a list [x0, y0, x1, y1, ...]"
        if len(poly) % 2:
            return f"has polygon {k} of odd length {len(poly)} (coordinates come in x, y pairs)"
        if len(poly) < 6:
            return f"has polygon {k} with {len(poly) // 2} point(s); a polygon needs at least 3"
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            return f"has polygon {k} with a coordinate that is not a finite number"
    return None


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO ``segmentation`` of an image ``height`` x ``width``, or ``None``.

    Polygons need at least 3 points, an even length and finite coordinates; an RLE needs the image's size,
    counts that decode (a compressed string, or a list of integers) and sum to ``height * width``.
    The text completes "annotation 7 (image 3) ...".
    """
    if isinstance(seg, list):
        return _polygon_problem(seg)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return _rle_problem(seg, height, width)
    return (
        f"has a malformed segmentation {str(seg)[:80]!r}; expected a list of polygons [[x0, y0, x1, y1, ...], "
        "...] or an RLE {'size': [h, w], 'counts': ...}"
    )
