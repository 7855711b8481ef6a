"""`mmgpt data inspect` and `mmgpt data sample`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    inspect.set_defaults(func=run_inspect)

    sample = commands.add_parser("sample", help="write a small dataset in the original formats")
    sample.add_argument("--out", required=True, type=Path, help="directory to write (mixture.yaml inside)")
    sample.add_argument("--n", type=int, default=DEFAULT_RECORDS, help="records in all files together")
    sample.add_argument("--seed", type=int, default=0, help="record and image seed")
    sample.add_argument("--image-size", type=int, default=32, help="image_size in mixture.yaml")
    sample.add_argument("--max-length", type=int, default=2048, help="max_length in mixture.yaml")
    sample.set_defaults(func=run_sample)


TINY_FALLBACK_WARNING = (
    "WARNING: no --train-config or --tokenizer given: token counts, lengths and too_long drops below use "
    "the bundled TINY tokenizer and will differ from the run's (pass --train-config to use the run's tokenizer)"
)


def _tokenizer_dir(args: argparse.Namespace, train_cfg) -> Path:
    """--tokenizer, else the train config's model's (what training loads), else the bundled tiny
    one with a loud warning on stderr."""
    from mmgpt.configfile import ConfigError
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR

    if args.tokenizer is not None:
        return args.tokenizer
    if train_cfg is None:
        print(TINY_FALLBACK_WARNING, file=sys.stderr)
        return TINY_TOKENIZER_DIR
    from mmgpt.models.builder import tokenizer_path

    path = tokenizer_path(train_cfg.model)
    if path is None:
        raise ConfigError(f"{args.train_config}: model preset {train_cfg.model.preset!r} bundles no tokenizer and "
                          "neither model.tokenizer_path nor model.llama_path is set (training needs one too)")
    return Path(path)


def run_inspect(args: argparse.Namespace) -> int:
    from mmgpt.config import TrainConfig
    from mmgpt.data.inspection import Progress, estimate_epoch, format_report, inspect_mixture
    from mmgpt.data.mixture import Mixture, MixtureConfig
    from mmgpt.tokenizer import load_tokenizer

    if args.config is None and args.train_config is None:
        raise ValueError("give --config or --train-config")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    # an unusable config or source file (where training would stop too): one line from mmgpt/cli.py
    train_cfg = TrainConfig.load(args.train_config) if args.train_config else None
    tokenizer = load_tokenizer(_tokenizer_dir(args, train_cfg))
    mixture_cfg = MixtureConfig.load(args.config or train_cfg.mixture)
    if train_cfg is not None:  # the mixture exactly as training builds it (mmgpt/train/cli.py prepare)
        from mmgpt.models.builder import preset_image_size

        holdout = train_cfg.eval.holdout
        mixture = Mixture(mixture_cfg, tokenizer, preset_image_size(train_cfg.model.preset),
                          max_images=train_cfg.packing.max_images_per_row, holdout=holdout)
    else:
        holdout = None
        mixture = Mixture(mixture_cfg, tokenizer)
    every = args.progress_every or None
    report = inspect_mixture(mixture, show=args.show, holdout=holdout,
                             progress=Progress("inspect: loaded", len(mixture), every=every))
    if train_cfg is not None:
        from mmgpt.contracts import IMAGE

        s = train_cfg.schedule
        report["estimate"] = estimate_epoch(
            mixture, train_cfg.packing, s.grad_accum, tokenizer.convert_tokens_to_ids(IMAGE), args.world_size,
            epochs=s.epochs, max_steps=s.max_steps,
            progress=lambda rank, n: Progress(f"inspect: estimate rank {rank}: tokenised", n, every=every))
    else:
        report["estimate"] = None
    print(format_report(report))
    if train_cfg is None:
        print("\n(rows and optimizer steps per epoch: pass --train-config for the run's packing and batch settings)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    empty = [(name, s) for name, s in report["sources"].items() if s["kept"] == 0]
    for name, s in empty:
        why = "; ".join(s["notes"]) or "the source has no records"
        print(f"{args.command_prog}: error: source {name!r} keeps no records (read {s['read']}): {why}",
              file=sys.stderr)
    return 2 if empty else 0


def run_sample(args: argparse.Namespace) -> int:
    from mmgpt.data.sample import write_sample

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    path = write_sample(args.out, records=args.n, seed=args.seed, image_size=args.image_size,
                        max_length=args.max_length)
    print(f"wrote {path}")
    return 0
