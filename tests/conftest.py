"""Shared fixtures: repository paths, the real COCO subset, and locally saved torchvision weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The real 128-image COCO subset next to the repository; tests using it skip when it is absent."""
    root = SHARED_DATA / "coco128-instances"
    if not (root / "annotations" / "instances.json").is_file():
        pytest.skip(f"real COCO subset not found at {root}")
    return root


@pytest.fixture(scope="session")
def resnet18_imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision resnet18 ImageNet-format state dict (with ``fc``), saved locally: no network needed."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():  # non-trivial BN statistics, so a wrong load cannot pass unnoticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(model.state_dict(), path)
    return path
