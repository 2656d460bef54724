"""`fai-mf` command line. Subcommands live next to the code they run; each module registers its own
parser through `register(subparsers)` so this file stays small."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it defines `register(subparsers)` adding one or more subcommands
_SUBCOMMAND_MODULES = ["fai_mf.demo", "fai_mf.predict", "fai_mf.data", "fai_mf.train", "fai_mf.evaluate", "fai_mf.bench_cli",
                       "fai_mf.export_cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fai-mf", description="FAI-MF runtime: predict, train, evaluate, profile")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
