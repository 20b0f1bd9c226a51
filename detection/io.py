"""Atomic file writes: the one helper that every checkpoint, metrics and results file goes through.

A file is written to a temporary sibling, flushed and ``fsync``-ed, then renamed over the target, so
a crash, a full disk or a reader at the wrong moment never sees half a file, and the previous
version stays intact until the new one is complete. The temporary file is created with mode 0666
minus the process umask, so every output gets the same permissions as a plain ``open()``.

A write that fails for a reason that is the user's to fix (a full disk, a quota, a read-only or
permission-denied folder) raises :class:`OutputWriteError` naming the path, and for a full disk how
many bytes had been written when the space ran out. An output folder is created through
:func:`make_output_dir`, whose :class:`OutputWriteError` says why the folder cannot be created.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_SUFFIX",
    "OutputWriteError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "make_output_dir",
    "output_dir_error",
]

#: Suffix of the temporary files (``.<name>.<random>.tmp``) that a killed writer can leave behind.
TMP_SUFFIX = ".tmp"

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputWriteError(OSError):
    """An output file cannot be written: no space left, or a folder that is read-only or not ours.

    ``errno`` and ``filename`` are those of the failed call; the message names the path and what to change.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(exc: OSError, path: Path, written: int) -> OutputWriteError | None:
    """The :class:`OutputWriteError` for ``exc`` while writing ``path``, or ``None`` if it is another error."""
    if exc.errno in _NO_SPACE:
        return OutputWriteError(
            exc.errno,
            f"no space left on the disk of '{path.parent}' while writing '{path.name}' (it needed at least "
            f"{written:,} bytes); free space there or choose another output folder (--output-dir)",
            str(path),
        )
    if exc.errno in _NOT_WRITABLE:
        folder = exc.filename if exc.filename and Path(exc.filename).is_dir() else path.parent
        return OutputWriteError(
            exc.errno,
            f"cannot write '{path}': the folder '{folder}' is not writable ({exc.strerror}); choose a writable "
            "output folder (--output-dir) or fix its permissions",
            str(path),
        )
    return None


def output_dir_error(folder: str | os.PathLike[str], exc: OSError) -> OutputWriteError:
    """The :class:`OutputWriteError` for ``exc``, raised while creating the output folder ``folder``."""
    failed = Path(exc.filename) if exc.filename else Path(folder)
    if exc.errno == errno.ENOENT:  # with parents=True: the parent exists but its file system refuses
        reason = f"{failed.parent} does not accept new folders ({exc.strerror})"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):  # the folder, or a folder above it, is a file
        blocker = next((p for p in (failed, *failed.parents) if p.exists()), failed)
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = str(exc.strerror) + ("" if failed == Path(folder) else f" at {failed}")
    return OutputWriteError(
        exc.errno,
        f"cannot create output folder {folder}: {reason}; choose a writable --output-dir "
        "(or output_dir in the config)",
        str(folder),
    )


def make_output_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` and its parents (nothing to do when it exists); returns it as a ``Path``.

    Raises:
        OutputWriteError: it cannot be created (a file system that refuses new folders, such as
            ``/proc``, no permission, read-only, a file in the way, no space); the message says why.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_dir_error(folder, exc) from exc
    return folder


class _CountingWriter:
    """A file object that counts the bytes (or characters) handed to it and keeps the first ``OSError``.

    ``torch.save`` writes through C++, which reports a failed Python ``write`` as a ``RuntimeError``
    without the path or the errno; the kept error lets :func:`atomic_open` say what happened.
    """

    def __init__(self, f: IO[Any]) -> None:
        self._f = f
        self.written = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        self.written += len(data)  # counted first: the bytes that a failed write needed count too
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path`` atomically.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. On any exception the temporary file is removed and
    ``path`` is left as it was.

    Raises:
        OutputWriteError: the disk is full, or the folder cannot be created or written.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    make_output_dir(path.parent)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _write_error(exc, path, 0) or exc from exc
    writer: _CountingWriter | None = None
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            writer = _CountingWriter(f)
            yield writer
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(cause, OutputWriteError):
            error = _write_error(cause, path, writer.written if writer is not None else 0)
            if error is not None:
                raise error from exc
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as JSON (NaN and inf refused: ``allow_nan=False``) followed by a newline, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, allow_nan=False, **dump_kwargs)
        f.write("\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
