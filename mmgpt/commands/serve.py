"""`mmgpt serve` parser (the server lives in mmgpt/inference/serve.py)."""
from __future__ import annotations

import argparse

from mmgpt.commands.chat import add_generation_args, add_model_args, model_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="web demo: upload an image and chat (127.0.0.1 by default)")
    add_model_args(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (the demo has no authentication)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (0: any free one)")
    add_generation_args(p)
    p.set_defaults(func=model_command("mmgpt.inference.serve:run"))
