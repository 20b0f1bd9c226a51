"""Training progress: a progress line with ETA, loss terms, lr, img/s and peak memory, plus ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["JsonlWriter", "ProgressLogger", "drop_records_after", "format_duration", "peak_memory_mb", "read_jsonl"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class JsonlWriter:
    """Appends one JSON object per line (flushed each time, so nothing is lost on a crash)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (an unfinished last line is ignored)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def drop_records_after(path: str | os.PathLike[str], iteration: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) without the records after ``iteration`` (and any
    unfinished line), so that a resumed run logs each iteration once; returns how many were dropped."""
    from .io import atomic_write_text

    p = Path(path)
    if not p.is_file():
        return 0
    lines = p.read_text(encoding="utf-8").splitlines()
    records = read_jsonl(p)
    kept = [r for r in records if not isinstance(r.get("iteration"), int) or r["iteration"] <= iteration]
    if len(kept) == len(lines):
        return 0
    atomic_write_text(p, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    return len(lines) - len(kept)


class ProgressLogger:
    """Reports training progress when the trainer calls :meth:`update`.

    On a terminal the line is redrawn in place; otherwise (logs, CI) one line is printed per report.
    Throughput and ETA are measured over the iterations since the previous report.
    """

    def __init__(
        self,
        max_iters: int,
        start_iter: int,
        device: torch.device,
        images_per_iter: int,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self.max_iters = max_iters
        self.device = device
        self.images_per_iter = images_per_iter
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._mark_iter = start_iter
        self._mark_time = time.perf_counter()
        self._start_time = self._mark_time
        self._rate: float | None = None

    def update(self, iteration: int, losses: Mapping[str, float], lr: float, *, skipped: int = 0) -> dict[str, Any]:
        """Report the state after ``iteration`` (1-based); returns the record for ``metrics.jsonl``.

        ``skipped`` steps (non-finite, no update) since the last report are counted in the line; with
        no finite step left (``losses`` empty) the record has ``"skipped": true`` and no loss.
        """
        now = time.perf_counter()
        done = iteration - self._mark_iter
        if done > 0:
            self._rate = done / max(now - self._mark_time, 1e-9)
        self._mark_iter, self._mark_time = iteration, now
        rate = self._rate or float("nan")
        eta = (self.max_iters - iteration) / rate if self._rate else float("nan")
        total = sum(losses.values()) if losses else None
        record = {
            "iteration": iteration,
            **({"loss": total, **losses} if losses else {"skipped": True}),
            **({"skipped_steps": skipped} if skipped else {}),
            "lr": lr,
            "img_per_s": rate * self.images_per_iter,
            "peak_mem_mb": peak_memory_mb(self.device),
            "elapsed_s": now - self._start_time,
        }
        if not self.enabled:
            return record
        width = len(str(self.max_iters))
        terms = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in losses.items())
        pct = 100.0 * iteration / self.max_iters
        loss = f"loss {total:.3f} ({terms})" if total is not None else "skipped (non-finite)"
        if skipped and total is not None:
            loss += f", {skipped} skipped"
        line = (
            f"iter {iteration:>{width}}/{self.max_iters} {pct:5.1f}% | eta {format_duration(eta)} | {loss} "
            f"| lr {lr:.2e} | {record['img_per_s']:.1f} img/s | mem {record['peak_mem_mb']:.0f} MB"
        )
        if self.interactive:
            end = "\n" if iteration >= self.max_iters else ""
            self.stream.write("\r\x1b[2K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return record

    def newline(self) -> None:
        """End an in-place line before other output."""
        if self.interactive and self.enabled:
            self.stream.write("\n")
            self.stream.flush()
