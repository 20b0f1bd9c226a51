"""Shared plumbing for the command-line tools: config flags, the exit codes, one-line errors.

Every tool (``train_det``, ``eval_det``, ``infer_det``, ``print_config``) runs its body through
:func:`run_main`, which turns exceptions into one exit code table, defined here once:

======  =====================================================================================
code    meaning
======  =====================================================================================
0       success
1       diverged: training stopped on non-finite losses or weights (any ``FloatingPointError``,
        such as :class:`~detection.engine.NonFiniteLossError`; :data:`EXIT_DIVERGED`)
2       bad input or config: a config key, a data / weights / checkpoint / results file, an
        output folder that cannot be created or written, or a distributed process that stopped
        answering within ``train.dist_timeout`` (:data:`EXIT_USER_ERROR`; the message names the
        stalled rank)
130     interrupted (Ctrl-C); the trainer saved a checkpoint first, continue with ``--resume``
======  =====================================================================================

Codes 1 and 2 print exactly one line on stderr (``error: <what is wrong and what to change>``),
without a traceback. ``--debug`` (on every tool) or the environment variable ``DETECTION_DEBUG=1``
prints the traceback as well. Any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .config import ConfigError, ExperimentConfig, load_config

__all__ = [
    "DEBUG_ENV",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "add_config_arguments",
    "add_debug_argument",
    "config_from_args",
    "run_main",
]

EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
#: Environment variable that, set to anything but ``""``/``0``, makes :func:`run_main` print tracebacks.
DEBUG_ENV = "DETECTION_DEBUG"

# OSError numbers that mean the user's disk or folder, not our code: reported as bad input.
_USER_OS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})

# Set by ``--debug`` while the tool parses its arguments (before run_main), read once by run_main.
_debug_requested = False


class _DebugAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        global _debug_requested
        _debug_requested = True
        setattr(namespace, self.dest, True)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug``: errors also print their traceback (same as ``DETECTION_DEBUG=1``)."""
    parser.add_argument(
        "--debug", action=_DebugAction, help=f"print the traceback of errors too (or set {DEBUG_ENV}=1)"
    )


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add ``--config``, ``--set``, ``--output-dir`` and ``--debug``."""
    parser.add_argument("--config", metavar="FILE", required=required, help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override dotted config keys, values read as YAML (e.g. train.max_iters=100 model.backbone.name=resnet18)",
    )
    parser.add_argument("--output-dir", metavar="DIR",
                        help="output folder (default: output_dir from the config)")
    add_debug_argument(parser)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if args.config is not None and not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file not found: {args.config}")
    return load_config(args.config, args.overrides)


def _user_errors() -> tuple[type[BaseException], ...]:
    from backbone import WeightsError

    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .distributed import DistributedTimeout
    from .io import OutputWriteError
    from .trainer import ResumeError

    return (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, WeightsError,
            CheckpointError, DatasetError, ResumeError, OutputWriteError, DistributedTimeout)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, _user_errors()):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_OS_ERRNOS


def _one_line(exc: BaseException) -> str:
    from .io import OutputWriteError

    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, OutputWriteError):
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += "; choose a writable folder (--output-dir) or fix its permissions"
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            text += "; free space on that disk or choose another folder (--output-dir)"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _debug_enabled() -> bool:
    global _debug_requested
    requested, _debug_requested = _debug_requested, False
    return requested or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(body: Callable[[], int]) -> int:
    """Run a tool's body and return its exit code from the table in this module's docstring.

    User errors print ``error: <message>`` as one line on stderr (plus the traceback under ``--debug``
    or ``DETECTION_DEBUG=1``) and return 2; a divergence stop returns 1; Ctrl-C returns 130.
    """
    debug = _debug_enabled()
    try:
        return body()
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as exc:  # NonFiniteLossError and every other divergence stop
        code = EXIT_DIVERGED
        error: BaseException = exc
    except Exception as exc:
        error = exc
        if not _is_user_error(error):
            raise
        code = EXIT_USER_ERROR
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {_one_line(error)}", file=sys.stderr)
    return code
