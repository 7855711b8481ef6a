"""`mmgpt` command line: one subcommand per job, each defined next to the code it drives.

Every module listed in COMMANDS exposes `register(subparsers)`, which adds its parser and sets
`func` (a callable taking the parsed args and returning an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: tuple[str, ...] = (
    "mmgpt.models.params",  # params
    "mmgpt.data.cli",  # data inspect | sample
    "mmgpt.benchmarks.cli",  # bench packing
    "mmgpt.train.cli",  # train
    "mmgpt.export",  # export
    "mmgpt.inference.chat",  # chat
    "mmgpt.inference.serve",  # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgpt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
