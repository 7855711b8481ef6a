"""`mmgpt data inspect` (parser: mmgpt/cli/data.py): the mixture as a training run sees it.

With `--train-config` everything comes from the run: the tokenizer training loads (the model's:
model.tokenizer_path, else llama_path, else the preset's bundled one), the mixture built as
`mmgpt/train/recipe.py prepare` builds it (image size, max_images_per_row, eval holdout), and the
rows/steps estimate from the planner that sizes the LR schedule (`plan_rank`, the real Packer on
token lengths), rank by rank for `--world-size`. Without it the bundled tiny tokenizer is used and
a WARNING says so. Exits 2 after the report when a configured source keeps no record. This lives
in `mmgpt.train` because `mmgpt.data` may import neither the model builder nor the trainer.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmgpt.data.inspection import Progress, format_report, inspect_mixture
from mmgpt.data.mixture import Mixture
from mmgpt.train.data import plan_rank, steps_per_epoch


def estimate_epoch(mixture: Mixture, packing: Any, grad_accum: int, image_token_id: int, world: int,
                   epochs: int = 1, max_steps: int | None = None,
                   progress: Callable[[int, int], Progress] | None = None) -> dict[str, Any]:
    """Packed rows and optimizer steps of one epoch with the run's packing (a PackingConfig) and
    batch settings, from the training code's own planner, rank by rank as training shards
    (positions rank, rank + world, ...). `progress(rank, total)` makes a Progress per rank."""
    plans = []
    for rank in range(world):
        shard = len(range(rank, len(mixture), world))
        bar = progress(rank, shard) if progress is not None else None
        plans.append(plan_rank(mixture, packing, image_token_id, rank, world,
                               progress=bar.update if bar is not None else None))
    batches = [p.batches for p in plans]
    per_epoch = steps_per_epoch(batches, grad_accum)
    rows = sum(p.rows for p in plans)
    rows_per_step = packing.rows_per_batch * grad_accum * world
    return {
        "world_size": world,
        "max_tokens": packing.max_tokens,
        "max_images_per_row": packing.max_images_per_row,
        "buffer_size": packing.buffer_size,
        "rows_per_batch": packing.rows_per_batch,
        "grad_accum": grad_accum,
        "rows_per_epoch": rows,
        "samples_per_epoch": sum(p.samples for p in plans),
        "micro_batches_per_rank": batches,
        "rows_per_step": rows_per_step,
        "steps_per_epoch": per_epoch,
        "epochs": epochs,
        "max_steps": max_steps,
        "total_steps": max_steps or per_epoch * epochs,
        "formula": (f"steps/epoch = min over {world} rank(s) of micro-batches per rank {min(batches)} "
                    f"// grad_accum {grad_accum} = {per_epoch}; micro-batch = rows_per_batch "
                    f"{packing.rows_per_batch} row(s) of {packing.max_tokens} tokens; a step = "
                    f"rows_per_batch {packing.rows_per_batch} x grad_accum {grad_accum} x world {world} "
                    f"= {rows_per_step} rows"),
    }


TINY_FALLBACK_WARNING = (
    "WARNING: no --train-config or --tokenizer given: token counts, lengths and too_long drops below use "
    "the bundled TINY tokenizer and will differ from the run's (pass --train-config to use the run's tokenizer)"
)


@dataclass(frozen=True)
class InspectOptions:
    """What `mmgpt data inspect` reads (flags, defaults and their help: mmgpt/cli/data.py)."""

    config: Path | None  # the mixture file; None: the train config's
    train_config: Path | None
    json: Path | None  # also write the report here
    show: int  # rendered examples printed
    tokenizer: Path | None  # None: the train config's model's, else the bundled tiny one
    world_size: int
    progress_every: int  # samples between progress lines; 0: every 2 s


def _tokenizer_dir(args: InspectOptions, train_cfg) -> Path:
    """--tokenizer, else the train config's model's (what training loads), else the bundled tiny
    one (run_inspect then warns, once the inputs turned out usable: an error stays one line)."""
    from mmgpt.configfile import ConfigError
    from mmgpt.models.builder import tokenizer_path
    from mmgpt.tokenizer import TINY_TOKENIZER_DIR

    if args.tokenizer is not None:
        if train_cfg is not None:
            print(f"note: tokenising with --tokenizer {args.tokenizer}, not the run's "
                  f"({tokenizer_path(train_cfg.model)})", file=sys.stderr)
        return args.tokenizer
    if train_cfg is None:
        return TINY_TOKENIZER_DIR
    path = tokenizer_path(train_cfg.model)
    if path is None:
        raise ConfigError(f"{args.train_config}: model preset {train_cfg.model.preset!r} bundles no tokenizer and "
                          "neither model.tokenizer_path nor model.llama_path is set (training needs one too)")
    return Path(path)


def run_inspect(args: InspectOptions) -> int:
    """Print the report (and write it as JSON); 2 when a configured source keeps no record."""
    from mmgpt.train.config import TrainConfig
    from mmgpt.data.mixture import MixtureConfig
    from mmgpt.tokenizer import load_tokenizer

    if args.config is None and args.train_config is None:
        raise ValueError("give --config or --train-config")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    # an unusable config or source file (where training would stop too): a user error, one line
    train_cfg = TrainConfig.load(args.train_config) if args.train_config else None
    tokenizer = load_tokenizer(_tokenizer_dir(args, train_cfg))
    mixture_cfg = MixtureConfig.load(args.config or train_cfg.mixture)
    if train_cfg is not None:  # the mixture exactly as training builds it (mmgpt/train/recipe.py prepare)
        from mmgpt.models.builder import preset_image_size

        holdout = train_cfg.eval.holdout
        mixture = Mixture(mixture_cfg, tokenizer, preset_image_size(train_cfg.model.preset),
                          max_images=train_cfg.packing.max_images_per_row, holdout=holdout)
    else:
        holdout = None
        mixture = Mixture(mixture_cfg, tokenizer)
    if args.tokenizer is None and train_cfg is None:
        print(TINY_FALLBACK_WARNING, file=sys.stderr, flush=True)
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
        print(f"mmgpt data inspect: error: source {name!r} keeps no records (read {s['read']}): {why}",
              file=sys.stderr)
    return 2 if empty else 0
