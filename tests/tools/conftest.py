"""Load the command-line tools (plain scripts in tools/, not a package) as modules."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "tools"))  # tools/benchmark.py imports its sibling modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "tools"))
    return module


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool("train_det")`` returns tools/train_det.py as a module (call its ``main(argv)``)."""
    return _load
