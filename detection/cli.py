"""Shared plumbing for the command-line tools: config flags and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .config import ConfigError, ExperimentConfig, load_config

__all__ = ["add_config_arguments", "config_from_args", "run_main"]


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", required=required, help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
        help="override dotted config keys, values read as YAML (e.g. train.max_iters=100 model.backbone.name=resnet18)",
    )
    parser.add_argument("--output-dir", metavar="DIR", help="output folder (default: output_dir from the config)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if args.config is not None and not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file not found: {args.config}")
    return load_config(args.config, args.overrides)


def _user_errors() -> tuple[type[BaseException], ...]:
    from backbone import WeightsError

    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .trainer import ResumeError

    return (ConfigError, FileNotFoundError, WeightsError, CheckpointError, DatasetError, ResumeError, NotADirectoryError)


def run_main(body: Callable[[], int]) -> int:
    """Run a tool's body; user errors print ``error: <message>`` (one line per message line) and return 2.

    A non-finite-loss stop returns 1 and Ctrl-C returns 130 (after the trainer saved a checkpoint).
    """
    from .engine import NonFiniteLossError

    try:
        return body()
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
