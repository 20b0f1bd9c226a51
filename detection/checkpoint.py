"""Training checkpoints: written atomically (:mod:`detection.io`), the last k kept plus the best.

A checkpoint is a plain dict readable with ``torch.load(weights_only=True)``: the union of the
state dicts of the training's stateful parts (``model``, ``optimizer``, ``scheduler``, ``scaler``,
``sampler``: the data position ``{"epoch", "start_batch"}``), plus ``iteration``, ``epoch``,
``best_metric``, ``rng`` (one entry per process), ``config``, ``categories``, ``versions`` and
``format``. Checkpoints written before ``sampler`` was stored resume from ``iteration``.

Files in the output folder: ``model_0001000.pth`` (numbered, the last ``keep_last`` kept),
``model_best.pth`` (highest bbox AP so far), ``model_final.pth`` and ``last_checkpoint`` (a one-line
text file naming the newest checkpoint, which ``--resume`` reads).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbone import WeightsError, safe_load

from .io import TMP_SUFFIX, atomic_torch_save, atomic_write_text

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "capture_rng_state",
    "library_versions",
    "load_checkpoint",
    "restore_rng_state",
]

FORMAT_VERSION = 1
LAST_POINTER = "last_checkpoint"
_NUMBERED = re.compile(r"^model_(\d{7,})\.pth$")
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX) + "$")  # detection.io's temporary files


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run."""


def library_versions() -> dict[str, str]:
    import torchvision

    try:
        from importlib.metadata import version

        ours = version("resnet-fpn-det")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        ours = "unknown"
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "resnet-fpn-det": str(ours)}


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: unreadable file, or not a training checkpoint of this project.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_load(path)
    except WeightsError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from exc
    required = ("model", "optimizer", "iteration", "config")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        have = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a training checkpoint (expected keys {list(required)}, found {have}); "
            "to start from model weights only, use --weights / load_weights instead of --resume"
        )
    return ckpt


class Checkpointer:
    """Writes and finds checkpoints in one output folder (call it on the main process only).

    Args:
        output_dir: where checkpoints go.
        keep_last: numbered checkpoints to keep; older ones are deleted after each save.
    """

    def __init__(self, output_dir: str | os.PathLike[str], keep_last: int = 3) -> None:
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    def save(self, name: str, state: Mapping[str, Any], *, update_last: bool = True) -> Path:
        """Write ``state`` atomically as ``<output_dir>/<name>.pth`` and, by default, point ``last_checkpoint`` at it."""
        path = self.output_dir / f"{name}.pth"
        atomic_torch_save({**state, "versions": library_versions(), "format": FORMAT_VERSION}, path)
        if update_last:
            atomic_write_text(self.output_dir / LAST_POINTER, path.name + "\n")
        self._prune()
        return path

    def save_numbered(self, iteration: int, state: Mapping[str, Any]) -> Path:
        return self.save(f"model_{iteration:07d}", state)

    def _prune(self) -> None:
        numbered = sorted(p for p in self.output_dir.glob("model_*.pth") if _NUMBERED.match(p.name))
        keep = set(numbered[-self.keep_last :])
        pointed = self.last()
        for p in numbered:
            if p not in keep and p != pointed:
                p.unlink(missing_ok=True)

    def remove_leftovers(self) -> list[Path]:
        """Delete the temporary files (``.<name>.<random>.tmp``) that a writer killed mid-write left in
        the output folder; returns them. Call it before this run writes anything."""
        if not self.output_dir.is_dir():
            return []
        found = sorted(p for p in self.output_dir.iterdir() if _TEMPORARY.match(p.name) and p.is_file())
        for p in found:
            p.unlink(missing_ok=True)
        return found

    def last(self) -> Path | None:
        """The checkpoint named by ``last_checkpoint``, or the newest numbered one, or ``None``."""
        pointer = self.output_dir / LAST_POINTER
        if pointer.is_file():
            candidate = self.output_dir / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
        numbered = sorted(p for p in self.output_dir.glob("model_*.pth") if _NUMBERED.match(p.name))
        return numbered[-1] if numbered else None
