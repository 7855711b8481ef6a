"""`mmgpt chat`, the model/decoding flags `serve` and `eval` share, and the checks made before loading.

`model_command` reports a wrong `--model`, `--image` or base-weights path (every one, one line
each: mmgpt.inference.model_check) before any weights are read, instead of a traceback
after the model has loaded.
"""
from __future__ import annotations

import argparse

from mmgpt.cli import Command, options
from mmgpt.inference.generation_config import GenerationConfig
from mmgpt.names import DTYPE_NAMES


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="export dir (merged or adapter), training output dir, or adapter dir")
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="None: bf16 on CUDA, fp32 on CPU")
    add_verify_arg(parser)


def add_verify_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action="store_true",
                        help="check an export's files against the sha256 in its manifest.json (every byte "
                             "read); without it only their sizes are checked")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by `mmgpt chat` and `mmgpt serve` (defaults: GenerationConfig's)."""
    d = GenerationConfig()
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer length cap")
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="> 1: beam search")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1.0: off")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1.0: off")
    g.add_argument("--length-penalty", type=float, default=d.length_penalty, help="beam search length exponent")
    g.add_argument("--seed", type=int, default=d.seed, help="sampling seed (None: nondeterministic)")


def model_command(run: Command, flag: str = "--model") -> Command:
    """`run` after the model's pre-load checks (`check_model`) and with `--device auto` resolved."""
    dest = flag.lstrip("-").replace("-", "_")

    def checked(args: argparse.Namespace) -> int:
        from mmgpt.inference.model_check import check_model

        check_model(getattr(args, dest), flag, getattr(args, "image", None), getattr(args, "verify", False))
        if getattr(args, "device", None) == "auto":
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        return run(args)

    return checked


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with a trained model (one answer with --prompt)")
    add_model_args(p)
    p.add_argument("--image", help="image the conversation is about")
    p.add_argument("--prompt", help="answer this one question, print the answer and exit")
    add_generation_args(p)
    p.set_defaults(func=model_command(run))


def run(args: argparse.Namespace) -> int:
    """A bad model dir, config, image or question is a user error: one line from mmgpt.cli, exit 2."""
    from mmgpt.inference.chat import LoadOptions, chat

    return chat(options(LoadOptions, args), options(GenerationConfig, args), args.image, args.prompt)
