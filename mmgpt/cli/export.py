"""`mmgpt export` (the export lives in mmgpt/export.py)."""
from __future__ import annotations

import argparse

from mmgpt.cli.chat import add_verify_arg, model_command
from mmgpt.names import DTYPE_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained adapter (and with --merge, merged weights)")
    p.add_argument("--checkpoint", required=True, help="training output dir, its adapter dir, or an adapter export")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--merge", action="store_true",
                   help="also write merged weights: HF LLaMA dir + OpenFlamingo checkpoint")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of the merged weights")
    add_verify_arg(p)
    p.set_defaults(func=model_command(run, flag="--checkpoint"))


def run(args: argparse.Namespace) -> int:
    """Bad input and a refused merge are user errors: one line from mmgpt.cli, exit 2."""
    from mmgpt.export import export

    out = export(args.checkpoint, args.out, merge=args.merge, dtype_name=args.dtype)
    print(f"exported to {out}")
    return 0
