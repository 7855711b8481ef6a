"""`mmgpt export` parser (the export lives in mmgpt/export.py)."""
from __future__ import annotations

import argparse

from mmgpt.commands.chat import DTYPE_NAMES, add_verify_arg, model_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained adapter (and with --merge, merged weights)")
    p.add_argument("--checkpoint", required=True, help="training output dir, its adapter dir, or an adapter export")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--merge", action="store_true",
                   help="also write merged weights: HF LLaMA dir + OpenFlamingo checkpoint")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of the merged weights")
    add_verify_arg(p)
    p.set_defaults(func=model_command("mmgpt.export:run", flag="--checkpoint"))
