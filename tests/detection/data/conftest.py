"""Fixtures for the data-pipeline tests: tiny shapes datasets, hand-written COCO files, tool loading."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
COCO128 = REPO.parent / "shared" / "data" / "coco128-instances"


@pytest.fixture(scope="session")
def shapes_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny cached shapes dataset: 10 train + 4 val images of 64x96 (h x w)."""
    from detection.data import ensure_shapes_dataset

    cache = tmp_path_factory.mktemp("shapes-cache")
    return ensure_shapes_dataset(cache, num_train=10, num_val=4, image_size=(64, 96), seed=3)


def _load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` by path (``tools`` is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _square_polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _make_ann(
    ann_id: int, image_id: int, category_id: int, bbox: list[float], **extra: Any
) -> dict[str, Any]:
    """A polygon annotation whose polygon is its box."""
    x, y, w, h = bbox
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": float(w * h),
        "iscrowd": 0,
        "segmentation": _square_polygon(x, y, w, h),
    }
    ann.update(extra)
    return ann


@pytest.fixture
def write_coco(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Write images (RGB noise PNGs unless given) and a COCO JSON; returns ``(ann_file, img_dir)``.

    Call as ``write_coco(images=[{"id", "width", "height", ...}], annotations=[...], categories=[...])``;
    an image entry may carry ``"pil"`` (a PIL image to save) and ``"file_name"``.
    """

    def _write(
        images: list[dict[str, Any]],
        annotations: list[dict[str, Any]],
        categories: list[dict[str, Any]] | None = None,
        name: str = "instances.json",
    ) -> tuple[Path, Path]:
        img_dir = tmp_path / "images"
        img_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        entries = []
        for img in images:
            img = dict(img)
            pil = img.pop("pil", None)
            img.setdefault("file_name", f"{img['id']}.png")
            if pil is None:
                pixels = rng.integers(0, 256, size=(img["height"], img["width"], 3), dtype=np.uint8)
                pil = Image.fromarray(pixels)
            if pil is not False:
                pil.save(img_dir / img["file_name"], **img.pop("save_kwargs", {}))
            img.pop("save_kwargs", None)
            entries.append(img)
        if categories is None:
            categories = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
        ann_file = tmp_path / name
        ann_file.write_text(
            json.dumps({"images": entries, "annotations": annotations, "categories": categories}),
            encoding="utf-8",
        )
        return ann_file, img_dir

    return _write


@pytest.fixture
def load_tool() -> Callable[[str], ModuleType]:
    """``load_tool("make_shapes")`` imports ``tools/make_shapes.py`` by path."""
    return _load_tool


@pytest.fixture
def make_ann() -> Callable[..., dict[str, Any]]:
    """``make_ann(ann_id, image_id, category_id, [x, y, w, h], **extra)``: a polygon annotation = its box."""
    return _make_ann


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """The real COCO subset beside the repository; skips when it is absent."""
    if not (COCO128 / "annotations" / "instances.json").is_file():
        pytest.skip(f"coco128-instances not found at {COCO128}")
    return COCO128
