"""`mmgpt bench`: one sub-command per benchmark module (each has `add_parser(benches)`)."""
from __future__ import annotations

import argparse

from mmgpt.benchmarks import packing, train

BENCHMARKS = (packing, train)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: print and write JSON")
    benches = parser.add_subparsers(dest="bench", required=True)
    for module in BENCHMARKS:
        module.add_parser(benches)
