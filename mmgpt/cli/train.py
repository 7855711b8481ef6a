"""`mmgpt train`: one run from a TrainConfig, on 1..N ranks (the run itself: mmgpt/train/recipe.py).

Under the DeepSpeed launcher run it as a module (the launcher adds --local_rank):
    deepspeed --num_gpus 8 --module mmgpt.train.cli --config configs/mmgpt_9b.yaml --resume auto
Alone (`mmgpt train --config ...`) it is a single-rank run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmgpt.logs import quiet

EXIT_CONFIG = 2  # bad config / DeepSpeed JSON / checkpoint: nothing trained
EXIT_NONFINITE = 3  # stopped after too many consecutive non-finite losses
EXIT_STOPPED = 143  # stopped by SIGTERM/SIGINT (to any rank) or the launcher's exit, checkpoint saved (stop.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="train config (YAML/JSON)")
    parser.add_argument("--resume", choices=("auto", "none"), default="none",
                        help="auto: continue from OUT/checkpoints/latest if present (settings that may not "
                             "change are refused; safe changes are logged and recorded)")
    parser.add_argument("--resume-unverified", action="store_true",
                        help="with --resume auto: resume even from a checkpoint without manifest.json "
                             "(its bytes cannot be verified)")
    parser.add_argument("--max-steps", type=int, help="override schedule.max_steps (sets the LR schedule length)")
    parser.add_argument("--stop-at-step", type=int,
                        help="save and exit at this step without changing the schedule (split a run into jobs)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set schedule.grad_accum=4 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train LoRA with DeepSpeed ZeRO-2")
    add_arguments(parser)
    parser.set_defaults(func=run)


def overrides(args: argparse.Namespace) -> list[str]:
    """--set, plus the flags that are shorthands for a config key."""
    found = list(args.overrides)
    if args.max_steps is not None:
        found.append(f"schedule.max_steps={args.max_steps}")
    if args.output_dir is not None:
        found.append(f"output_dir={Path(args.output_dir).resolve()}")
    return found


def run(args: argparse.Namespace) -> int:
    """Load the config, run the recipe; problems a human must fix print one line and return non-zero."""
    from mmgpt.train.config import TrainConfig
    from mmgpt.train.recipe import INPUT_ERRORS, NonFiniteLossError, RunOptions, RunRefused, TrainRecipe

    options = RunOptions(resume=args.resume == "auto", allow_unverified=args.resume_unverified,
                         stop_at_step=args.stop_at_step)
    try:
        cfg = TrainConfig.load(args.config, overrides(args))
    except INPUT_ERRORS as err:
        return _refused(err, EXIT_CONFIG)
    try:
        stopped = TrainRecipe(cfg, options).run()
    except RunRefused as err:
        return _refused(err, EXIT_CONFIG)
    except NonFiniteLossError as err:
        return _refused(err, EXIT_NONFINITE)
    return EXIT_STOPPED if stopped else 0


def _refused(err: Exception, code: int) -> int:
    print(f"mmgpt train: error: {err}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """The module DeepSpeed's launcher starts on every rank (mmgpt/train/cli.py calls this)."""
    quiet()  # the ranks a launcher starts are as quiet as `mmgpt train` (MMGPT_DEBUG=1 keeps all)
    parser = argparse.ArgumentParser(prog="python -m mmgpt.train.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
