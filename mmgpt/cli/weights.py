"""`mmgpt weights check` (the check lives in mmgpt/weights_check.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="check the weight files a config names (form, tensors, fit)")
    commands = parser.add_subparsers(dest="weights_command", required=True)
    check = commands.add_parser(
        "check", help="for each weight path of a train config: form found, tensors, dtypes, fit to the preset",
        description="Reads headers / meta tensors only (seconds). Exits 1 when a file does not fit.")
    check.add_argument("config", type=Path, help="mmgpt train config (its model: section is checked)")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print the report: 0 when every file fits, else 1."""
    from mmgpt.weights_check import report

    lines, ok = report(args.config)
    print("\n".join(lines))
    return 0 if ok else 1
