"""`mmgpt params` parser (the counting lives in mmgpt/models/params.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mmgpt.cli import lazy
from mmgpt.models.preset_names import preset_help


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("params", help="count parameters of a preset (no weights loaded)")
    # no `choices`: an unknown name is the builder's one-line error (and its traceback under --debug)
    parser.add_argument("--preset", default="9b", help=preset_help())
    # no `choices`: the names live in mmgpt.models.lora, which imports peft (checked when building)
    parser.add_argument("--lora", default="default",
                        help="LoRA: default | paper | none, or a YAML mapping like '{preset: paper, r: 8, "
                             "alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}'")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts to this JSON file")
    parser.set_defaults(func=lazy("mmgpt.models.params:run", "ParamsOptions"))
