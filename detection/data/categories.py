"""``CategoryMapping``: COCO category ids <-> contiguous training labels ``1..K``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DatasetError

__all__ = ["CategoryMapping"]


class CategoryMapping:
    """Bijection between COCO category ids and contiguous training labels ``1..K`` (0 is background).

    Categories are sorted by id, so label ``k`` is the k-th smallest category id. Ids need not be
    contiguous (COCO uses 1..90 with gaps for its 80 classes).

    Args:
        categories: COCO ``categories`` entries, each a mapping with at least ``id`` (int) and ``name`` (str).

    Example::

        m = CategoryMapping([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}])
        m.num_classes            # 3 (torchvision counts background)
        m.to_label(3), m.to_cat_id(2), m.names   # 2, 3, ['__background__', 'person', 'car']
    """

    BACKGROUND = "__background__"

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        pairs: list[tuple[int, str]] = []
        for i, cat in enumerate(categories):
            if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
                raise DatasetError(f"category entry #{i} must be a mapping with 'id' and 'name', got {cat!r}")
            cat_id, name = cat["id"], cat["name"]
            if isinstance(cat_id, bool) or not isinstance(cat_id, int):
                raise DatasetError(f"category entry #{i} has a non-integer id {cat_id!r} (name {name!r})")
            pairs.append((cat_id, str(name)))
        ids = [p[0] for p in pairs]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise DatasetError(f"category ids must be unique; duplicated ids: {duplicates}")
        pairs.sort()
        self._cat_ids: tuple[int, ...] = tuple(p[0] for p in pairs)
        self._names: tuple[str, ...] = tuple(p[1] for p in pairs)
        self._label_of: dict[int, int] = {cat_id: k + 1 for k, cat_id in enumerate(self._cat_ids)}

    @property
    def cat_ids(self) -> tuple[int, ...]:
        """COCO category ids in label order (``cat_ids[k - 1]`` is the id of label ``k``)."""
        return self._cat_ids

    @property
    def names(self) -> list[str]:
        """Label-indexed names; ``names[0]`` is ``"__background__"``."""
        return [self.BACKGROUND, *self._names]

    @property
    def num_classes(self) -> int:
        """``K + 1``: the number of categories plus background (torchvision's ``num_classes``)."""
        return len(self._cat_ids) + 1

    def to_label(self, cat_id: int) -> int:
        """COCO category id -> contiguous label in ``1..K``."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            raise KeyError(f"unknown category id {cat_id}; known ids: {list(self._cat_ids)}") from None

    def to_cat_id(self, label: int) -> int:
        """Contiguous label in ``1..K`` -> COCO category id (label 0, background, has no id)."""
        label = int(label)
        if not 1 <= label <= len(self._cat_ids):
            raise KeyError(f"label {label} is outside 1..{len(self._cat_ids)} (0 is background)")
        return self._cat_ids[label - 1]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: ``{"categories": [{"id": int, "name": str}, ...]}`` in label order."""
        return {"categories": [{"id": i, "name": n} for i, n in zip(self._cat_ids, self._names)]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CategoryMapping:
        """Rebuild a mapping saved with :meth:`state_dict` (e.g. from a checkpoint)."""
        if not isinstance(state, Mapping) or "categories" not in state:
            raise DatasetError(
                f"a CategoryMapping state must be a mapping with a 'categories' list, got {state!r:.200}"
            )
        return cls(state["categories"])

    def diff(self, other: CategoryMapping, self_name: str = "first", other_name: str = "second") -> str:
        """Human-readable difference with ``other``; empty string when both are equal."""
        mine = dict(zip(self._cat_ids, self._names))
        theirs = dict(zip(other._cat_ids, other._names))
        parts = []
        only_mine = [f"{i} {mine[i]!r}" for i in sorted(mine.keys() - theirs.keys())]
        only_theirs = [f"{i} {theirs[i]!r}" for i in sorted(theirs.keys() - mine.keys())]
        renamed = [
            f"{i} {mine[i]!r} vs {theirs[i]!r}"
            for i in sorted(mine.keys() & theirs.keys())
            if mine[i] != theirs[i]
        ]
        if only_mine:
            parts.append(f"only in {self_name}: " + ", ".join(only_mine))
        if only_theirs:
            parts.append(f"only in {other_name}: " + ", ".join(only_theirs))
        if renamed:
            parts.append("same id, different name: " + ", ".join(renamed))
        return "; ".join(parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMapping):
            return NotImplemented
        return self._cat_ids == other._cat_ids and self._names == other._names

    def __hash__(self) -> int:
        return hash((self._cat_ids, self._names))

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{n}" for i, n in zip(self._cat_ids[:6], self._names[:6]))
        more = ", ..." if len(self._cat_ids) > 6 else ""
        return f"CategoryMapping(K={len(self._cat_ids)}, {{{shown}{more}}})"
