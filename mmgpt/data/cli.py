"""`mmgpt data inspect` and `mmgpt data sample`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmgpt.data.sample import DEFAULT_RECORDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect a data mixture or write the sample dataset")
    commands = parser.add_subparsers(dest="data_command", required=True)

    inspect = commands.add_parser("inspect", help="per-source counts, drops, token lengths, examples")
    inspect.add_argument("--config", type=Path, help="mixture YAML/JSON file (default: the train config's)")
    inspect.add_argument("--train-config", type=Path,
                         help="mmgpt train config: its packing.max_images_per_row drops what training would")
    inspect.add_argument("--json", type=Path, help="also write the report as JSON here")
    inspect.add_argument("--show", type=int, default=3, help="rendered examples to print")
    inspect.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: bundled tiny)")
    inspect.set_defaults(func=run_inspect)

    sample = commands.add_parser("sample", help="write a small dataset in the original formats")
    sample.add_argument("--out", required=True, type=Path, help="directory to write (mixture.yaml inside)")
    sample.add_argument("--n", type=int, default=DEFAULT_RECORDS, help="records in all files together")
    sample.add_argument("--seed", type=int, default=0, help="record and image seed")
    sample.add_argument("--image-size", type=int, default=32, help="image_size in mixture.yaml")
    sample.add_argument("--max-length", type=int, default=2048, help="max_length in mixture.yaml")
    sample.set_defaults(func=run_sample)


def run_inspect(args: argparse.Namespace) -> int:
    from mmgpt.config import TrainConfig
    from mmgpt.data.inspection import format_report, inspect_mixture
    from mmgpt.data.mixture import Mixture, MixtureConfig
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    if args.config is None and args.train_config is None:
        raise ValueError("give --config or --train-config")
    tokenizer = load_tokenizer(args.tokenizer or TINY_TOKENIZER_DIR)
    # an unusable config or source file (where training would stop too): one line from mmgpt/cli.py
    train_cfg = TrainConfig.load(args.train_config) if args.train_config else None
    max_images = train_cfg.packing.max_images_per_row if train_cfg else None
    mixture_cfg = MixtureConfig.load(args.config or train_cfg.mixture)
    mixture = Mixture(mixture_cfg, tokenizer, max_images=max_images)
    report = inspect_mixture(mixture, show=args.show)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from mmgpt.data.sample import write_sample

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    path = write_sample(args.out, records=args.n, seed=args.seed, image_size=args.image_size,
                        max_length=args.max_length)
    print(f"wrote {path}")
    return 0
