"""`mmgpt plan` parser (the plan lives in mmgpt/train/memory_plan.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mmgpt.cli import lazy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="predicted peak GPU memory per rank (weights, LoRA grads + optimizer, activations per "
                     "checkpointing mode) and the largest max_tokens that fits a card")
    parser.add_argument("--config", required=True, help="mmgpt train config (YAML/JSON)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks sharing the ZeRO-2 optimizer state")
    # no `choices`: <N>GiB is accepted too (checked by memory_plan.gpu_memory_gib)
    parser.add_argument("--gpu", required=True, help="a100-40gb | a100-80gb | h100-80gb | h200 | <N>GiB")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan to this JSON file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for mmgpt train")
    parser.set_defaults(func=lazy("mmgpt.train.memory_plan:run", "PlanOptions"))
