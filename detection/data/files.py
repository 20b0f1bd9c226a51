"""Where a dataset's image files are: each ``file_name`` resolved under the image folder and checked up front.

:func:`locate_images` lists each folder once (``os.scandir``) instead of asking about every file, so a
COCO-size list is checked in a fraction of a second, and refuses names that lead outside the folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["ImageFiles", "locate_images"]


class ImageFiles(NamedTuple):
    """The outcome of :func:`locate_images`: positions (into the names given) of the missing files and
    of the names that resolve outside the image folder."""

    missing: list[int]
    outside: list[int]


def _listing(folder: str, cache: dict[str, frozenset[str]]) -> frozenset[str]:
    if folder not in cache:
        try:
            with os.scandir(folder) as entries:
                cache[folder] = frozenset(e.name for e in entries if not e.is_dir())
        except OSError:  # a folder that does not exist (or cannot be read) holds none of the files
            cache[folder] = frozenset()
    return cache[folder]


def locate_images(img_dir: Path, file_names: Sequence[str], *, allow_outside: bool = False) -> ImageFiles:
    """Check that every ``img_dir / file_name`` is an existing file, listing each folder once.

    A name that resolves outside ``img_dir`` (``../x.jpg``, an absolute path) is reported in ``outside``;
    with ``allow_outside`` it is looked up like the others instead.
    """
    root = os.path.abspath(img_dir)
    cache: dict[str, frozenset[str]] = {}
    missing, outside = [], []
    for i, name in enumerate(file_names):
        full = os.path.normpath(os.path.join(root, name))
        if not full.startswith(root + os.sep):
            if not allow_outside:
                outside.append(i)
                continue
        folder, base = os.path.split(full)
        if base not in _listing(folder, cache):
            missing.append(i)
    return ImageFiles(missing, outside)
