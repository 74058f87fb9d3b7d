"""The `lnscope` command line: one sub-command per job, each registered by its module."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from lnscope.analysis.errors import LnscopeError

# Each entry is `module:function` where function(subparsers) adds one sub-command and
# sets `func=handler(args) -> int` as its default. Modules are imported lazily so that
# `lnscope --help` stays fast.
_COMMANDS: list[str] = [
    "lnscope.analysis.commands.check_pair:register",
    "lnscope.server.cli:register",
    "lnscope.analysis.remove_ln.cli:register",
    "lnscope.analysis.tinymodel.cli:register",
    "lnscope.analysis.commands.evaluate:register",
    "lnscope.analysis.commands.analyze:register",
    "lnscope.analysis.transcoders.cli:register",
]


def _load(spec: str) -> Callable[[argparse._SubParsersAction], None] | None:
    import importlib

    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # a command whose module is not part of this build
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    return getattr(module, func_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lnscope",
        description="Compare a transformer with its LayerNorm-free twin.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for spec in _COMMANDS:
        register = _load(spec)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LnscopeError as exc:
        # Errors we expect (bad pair, unreachable Hub id, wrong checkpoint format) are
        # shown as one clear message, never as a raw traceback.
        print(f"lnscope: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lnscope pairs | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
