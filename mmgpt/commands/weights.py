"""`mmgpt weights check` parser (the check lives in mmgpt/weights_check.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mmgpt.commands import lazy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="check the weight files a config names (form, tensors, fit)")
    commands = parser.add_subparsers(dest="weights_command", required=True)
    check = commands.add_parser(
        "check", help="for each weight path of a train config: form found, tensors, dtypes, fit to the preset",
        description="Reads headers / meta tensors only (seconds). Exits 1 when a file does not fit.")
    check.add_argument("config", type=Path, help="mmgpt train config (its model: section is checked)")
    check.set_defaults(func=lazy("mmgpt.weights_check:run_command"))
