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
    inspect.add_argument("--config", required=True, type=Path, help="mixture YAML/JSON file")
    inspect.add_argument("--json", type=Path, help="also write the report as JSON here")
    inspect.add_argument("--show", type=int, default=3, help="rendered examples to print")
    inspect.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: bundled tiny)")
    inspect.set_defaults(func=run_inspect)

    sample = commands.add_parser("sample", help="write a small dataset in the original formats")
    sample.add_argument("--out", required=True, type=Path)
    sample.add_argument("--n", type=int, default=DEFAULT_RECORDS, help="records in all files together")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--image-size", type=int, default=32, help="image_size in mixture.yaml")
    sample.add_argument("--max-length", type=int, default=2048, help="max_length in mixture.yaml")
    sample.set_defaults(func=run_sample)


def run_inspect(args: argparse.Namespace) -> int:
    from mmgpt.data.inspect import format_report, inspect_mixture
    from mmgpt.data.mixture import Mixture, MixtureConfig
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or TINY_TOKENIZER_DIR)
    report = inspect_mixture(Mixture(MixtureConfig.load(args.config), tokenizer), show=args.show)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from mmgpt.data.sample import write_sample

    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    path = write_sample(args.out, records=args.n, seed=args.seed, image_size=args.image_size,
                        max_length=args.max_length)
    print(f"wrote {path}")
    return 0
