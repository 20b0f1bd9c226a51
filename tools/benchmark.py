"""Benchmarks against torchvision, side by side in one process: model speed and memory, data loading,
COCO evaluation.

Usage::

    python tools/benchmark.py model --arch mask_rcnn --size 800 --what inference train --json bench.json
    python tools/benchmark.py model --what memory --size 800 --batch 2
    python tools/benchmark.py data --workers 0 2
    python tools/benchmark.py eval --num-images 5000

Each sub-command prints a Markdown table with medians and the ratio ours / torchvision (or
faster-coco-eval / pycocotools) and can write JSON (``--json``). ``python tools/benchmark.py SUB --help``
lists the options; the same modules run on their own as ``tools/bench_model.py``, ``tools/bench_data.py``
and ``tools/bench_eval.py``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_SUBCOMMANDS = {
    "model": ("bench_model", "detector / backbone speed and memory vs torchvision"),
    "data": ("bench_data", "data-loading images/s vs a plain torchvision pipeline"),
    "eval": ("bench_eval", "COCO evaluation time: pycocotools vs faster-coco-eval"),
}


def _module(name: str):  # type: ignore[no-untyped-def]
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{model,data,eval}")
    for command, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        p.set_defaults(module=module)
        if argv[:1] == [command] or "--help" in argv or "-h" in argv:
            _module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return _module(args.module).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
