"""`fai-mf` command line. Subcommands live next to the code they run; each module registers its own
parser through `register(subparsers)` so this file stays small.

An expected error (a missing file, a bad value, a checkpoint that does not fit, a backend that cannot
run) ends the command with one line on stderr naming the problem and exit status 1; `-v` shows the
traceback instead (and debug logging). Bad command-line usage exits with 2 (argparse).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Iterator

import mf_kernels

from .io import CheckpointError

# module -> it defines `register(subparsers)` adding one or more subcommands
_SUBCOMMAND_MODULES = ["fai_mf.demo", "fai_mf.predict_cli", "fai_mf.data", "fai_mf.train", "fai_mf.evaluate",
                       "fai_mf.bench_cli", "fai_mf.export_cli"]
# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (OSError, ValueError, CheckpointError, mf_kernels.NotSupportedError)


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging, and tracebacks for errors")


def _add_verbose_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """`-v` works after the subcommand too (`fai-mf predict ... -v`), at every level."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub, argparse.SUPPRESS)
                _add_verbose_to_subcommands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fai-mf", description="FAI-MF runtime: predict, train, evaluate, profile")
    _add_verbose(parser, False)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    _add_verbose_to_subcommands(parser)
    return parser


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """INFO logging (DEBUG with -v); under torchrun, ranks > 0 log warnings only and every line names
    its rank. Backend choices (one INFO line per op and dtype from `mf_kernels`) are left to -v: the
    dataset commands print one kernels line instead. Levels are restored on exit (main() runs in tests)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    levels = {name: logging.getLogger(name).level for name in ("", "mf_kernels")}
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    if not verbose:
        logging.getLogger("mf_kernels").setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _logging(args.verbose):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"fai-mf {args.command}: interrupted", file=sys.stderr)
            return 130
        except EXPECTED_ERRORS as exc:
            if args.verbose:
                raise
            print(f"fai-mf {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
