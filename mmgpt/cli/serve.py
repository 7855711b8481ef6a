"""`mmgpt serve` (the gradio app lives in mmgpt/inference/serve.py)."""
from __future__ import annotations

import argparse

from mmgpt.cli import Command, options
from mmgpt.cli.chat import add_generation_args, add_model_args, model_command
from mmgpt.inference.generation_config import GenerationConfig
from mmgpt.preflight import gradio_problem, require


def needs_gradio(command: Command) -> Command:
    """`command`, refused in one line (exit 2) before any path check or model load when gradio is
    not installed (looked up, not imported: the parser stays light)."""

    def checked(args: argparse.Namespace) -> int:
        if (problem := gradio_problem()) is not None:
            require([problem])
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
    p.set_defaults(func=needs_gradio(model_command(run)))


def run(args: argparse.Namespace) -> int:
    from mmgpt.inference.chat import LoadOptions
    from mmgpt.inference.serve import serve

    return serve(options(LoadOptions, args), options(GenerationConfig, args), args.host, args.port, args.share)
