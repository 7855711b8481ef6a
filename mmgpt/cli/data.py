"""`mmgpt data inspect` and `mmgpt data sample`.

`inspect` runs in mmgpt/train/inspect_data.py: with a train config it needs what training builds
(the model's tokenizer, training's epoch planner), which the data package may not import.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mmgpt.cli import lazy
from mmgpt.data.sample import DEFAULT_RECORDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect a data mixture or write the sample dataset")
    commands = parser.add_subparsers(dest="data_command", required=True)

    inspect = commands.add_parser(
        "inspect", help="per-source counts, drops, token lengths, examples, rows/steps per epoch",
        description="Exits 2 (after printing the report) when a configured source keeps no records.")
    inspect.add_argument("--config", type=Path, help="mixture YAML/JSON file (default: the train config's)")
    inspect.add_argument("--train-config", type=Path,
                         help="mmgpt train config: its model's tokenizer, eval holdout and packing.max_images_per_row "
                              "select and drop what training would; its packing and batch settings give the "
                              "rows/steps estimate")
    inspect.add_argument("--json", type=Path, help="also write the report as JSON here")
    inspect.add_argument("--show", type=int, default=3, help="rendered examples to print")
    inspect.add_argument("--tokenizer", type=Path,
                         help="tokenizer directory (default: the train config's model's; without a train config "
                              "the bundled tiny one, with a warning)")
    inspect.add_argument("--world-size", type=int, default=1,
                         help="ranks of the run (GPUs in all), for the optimizer steps estimate")
    inspect.add_argument("--progress-every", type=int, default=0,
                         help="a progress line on stderr every N samples (0: every 2 s, so only on long scans)")
    inspect.set_defaults(func=lazy("mmgpt.train.inspect_data:run_inspect", "InspectOptions"))

    sample = commands.add_parser("sample", help="write a small dataset in the original formats")
    sample.add_argument("--out", required=True, type=Path, help="directory to write (mixture.yaml inside)")
    sample.add_argument("--n", type=int, default=DEFAULT_RECORDS, help="records in all files together")
    sample.add_argument("--seed", type=int, default=0, help="record and image seed")
    sample.add_argument("--image-size", type=int, default=32, help="image_size in mixture.yaml")
    sample.add_argument("--max-length", type=int, default=2048, help="max_length in mixture.yaml")
    sample.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from mmgpt.data.sample import write_sample

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    path = write_sample(args.out, records=args.n, seed=args.seed, image_size=args.image_size,
                        max_length=args.max_length)
    print(f"wrote {path}")
    return 0
