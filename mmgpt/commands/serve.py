"""`mmgpt serve` parser (the gradio app lives in mmgpt/inference/serve.py)."""
from __future__ import annotations

import argparse
import importlib.util

from mmgpt.commands import Command
from mmgpt.commands.chat import add_generation_args, add_model_args, model_command
from mmgpt.preflight import require

INSTALL_HINT = "the web demo needs gradio, an optional dependency: pip install -e '.[demo]'"


def needs_gradio(command: Command) -> Command:
    """`command`, refused in one line (exit 2) before any path check or model load when gradio is
    not installed (looked up, not imported: the parser stays light)."""

    def checked(args: argparse.Namespace) -> int:
        if importlib.util.find_spec("gradio") is None:
            require([INSTALL_HINT])
        return command(args)

    return checked


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="web demo on gradio: upload an image and chat (127.0.0.1 by default)")
    add_model_args(p, required=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (the demo has no authentication: 0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (0: any free one)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (goes through gradio's servers; off by default)")
    add_generation_args(p)
    p.set_defaults(func=needs_gradio(model_command("mmgpt.inference.serve:run")))
