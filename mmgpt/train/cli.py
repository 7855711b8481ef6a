"""`mmgpt train`: one run from a TrainConfig, on 1..N ranks.

Under the DeepSpeed launcher run it as a module (the launcher adds --local_rank):
    deepspeed --num_gpus 8 --module mmgpt.train.cli --config configs/mmgpt_9b.yaml --resume auto
Alone (`mmgpt train --config ...`) it is a single-rank run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mmgpt.train")

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


def run(args: argparse.Namespace) -> int:
    """Validate, then train; problems a human must fix print one line and return non-zero."""
    from mmgpt.train.config import ConfigError, TrainConfig
    from mmgpt.train.checkpointing import CheckpointError
    import torch

    from mmgpt.train.ds_config import DSConfigError, jit_build_notice
    from mmgpt.train.loop import NonFiniteLossError
    from mmgpt.train.master_port import PortError
    from mmgpt.train.run_identity import RunIdentityError

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"schedule.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={Path(args.output_dir).resolve()}")
    try:
        cfg = TrainConfig.load(args.config, overrides)
        if args.resume_unverified and args.resume != "auto":
            raise ConfigError("--resume-unverified only applies with --resume auto")
        ds, mixture_cfg = validate(cfg, resume=args.resume == "auto", allow_unverified=args.resume_unverified)
    except (ConfigError, DSConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"mmgpt train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if int(os.environ.get("RANK", "0")) == 0 and (note := jit_build_notice(ds, cuda=torch.cuda.is_available())):
        print(f"mmgpt train: note: {note}", file=sys.stderr, flush=True)
    try:
        return _train(cfg, ds, mixture_cfg, resume=args.resume == "auto", stop_at_step=args.stop_at_step,
                      allow_unverified=args.resume_unverified)
    except (ConfigError, CheckpointError, PortError, RunIdentityError) as err:  # found after start-up:
        # a busy port, another job's ranks in the group, too little data, a bad checkpoint
        print(f"mmgpt train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as err:
        log.error("%s", err)
        print(f"mmgpt train: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE


def validate(cfg, resume: bool, allow_unverified: bool = False) -> tuple[dict[str, Any], Any]:
    """Every check that needs no process group, so a bad input fails before any rank waits on
    another: the DeepSpeed JSON and batch split (world size from the launcher's WORLD_SIZE), the
    mixture file, rows long enough for its samples, no accidental restart over a finished run, and
    no resume from a checkpoint without a manifest (unless `allow_unverified`) or whose settings
    differ from this run's in a field that may not change (the world size included, before
    DeepSpeed's own load would fail on it)."""
    from mmgpt.train.config import ConfigError
    from mmgpt.data.mixture import MixtureConfig
    from mmgpt.run_layout import step_of
    from mmgpt.train import run_record
    from mmgpt.train.checkpointing import CheckpointError, CheckpointManager, require_manifest
    from mmgpt.train.ds_config import load_ds_config, resolve_batch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = load_ds_config(cfg.deepspeed)
    ds = resolve_batch(ds, cfg.packing.rows_per_batch, cfg.schedule.grad_accum, world, where=cfg.deepspeed)
    mixture_cfg = MixtureConfig.load(cfg.mixture)
    cfg.check_rows(mixture_cfg.max_length)
    manager = CheckpointManager(Path(cfg.output_dir) / "checkpoints", cfg.keep_last)
    if not resume and manager.latest() is not None:
        raise CheckpointError(f"{manager.root} already has checkpoints (latest {manager.latest()}): "
                              "pass --resume auto to continue, or choose another output_dir")
    if resume and (tag := manager.latest()) is not None:
        require_manifest(manager, tag, allow_unverified)
        run_record.resume(manager.root / tag, run_record.build(cfg, mixture_cfg, ds, world), step_of(tag))
    return ds, mixture_cfg


def _train(cfg, ds: dict[str, Any], mixture_cfg, resume: bool, stop_at_step: int | None,
           allow_unverified: bool) -> int:
    import torch.distributed as dist

    from mmgpt.train import engine as eng
    from mmgpt.train.data import merge_reports
    from mmgpt.train.loop import NonFiniteLossError
    from mmgpt.train.monitor import setup_logging
    from mmgpt.train.run_identity import RunIdentity, check_run_identity

    info = eng.init_distributed()
    check_run_identity(RunIdentity.of(cfg.to_dict(), cfg.output_dir), info.world)  # before any file is written
    out = Path(cfg.output_dir)
    if info.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    setup_logging(out, info.is_rank0)
    trainer = prepare(cfg, ds, mixture_cfg, info, resume, allow_unverified)

    def write_data_report() -> None:  # collective: every rank's share of the drops
        trainer.stream.close()
        trainer.monitor.close()
        reports = eng.all_gather(trainer.stream.report(), info.world)
        if info.is_rank0:
            (out / "data_report.json").write_text(json.dumps(merge_reports(reports), indent=2))

    try:
        reason = trainer.train(stop_at_step)
    except NonFiniteLossError:
        write_data_report()
        raise
    write_data_report()
    if info.is_rank0 and trainer.stopped is not None:
        log.info("%s. Checkpoint: %s (--resume auto continues from it)", reason,
                 trainer.manager.root / trainer.manager.latest())
    elif info.is_rank0:
        trainer.model.lang_encoder.save_pretrained(str(out / "adapter"))
        log.info("%s at step %d. TensorBoard: %s  checkpoints: %s  adapter: %s", reason, trainer.step,
                 out / "tensorboard", trainer.manager.root, out / "adapter")
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_STOPPED if trainer.stopped is not None else 0


def prepare(cfg, ds: dict[str, Any], mixture_cfg, info, resume: bool, allow_unverified: bool = False):
    """Everything a run needs once the process group is up: model, data, engine, restored state,
    monitor, as a Trainer (also what `mmgpt bench train` times). Collective."""
    from mmgpt.train.config import ConfigError
    from mmgpt.data.mixture import Mixture
    from mmgpt.models.builder import build_model
    from mmgpt.train import engine as eng
    from mmgpt.train import run_record
    from mmgpt.train.checkpointing import CheckpointManager, restore
    from mmgpt.train.data import BatchLoader, RankStream, count_batches, steps_per_epoch
    from mmgpt.train.eval import Evaluator
    from mmgpt.train.ds_config import fill_optimizer
    from mmgpt.train.loop import Trainer
    from mmgpt.train.monitor import Monitor, device_peak_flops

    out = Path(cfg.output_dir)
    manager = CheckpointManager(out / "checkpoints", cfg.keep_last)
    built = build_model(cfg.model, device=info.device, dtype=eng.model_dtype(ds))
    model, image_token_id = built.model, built.image_token_id
    mixture = Mixture(mixture_cfg, built.tokenizer, built.image_size, max_images=cfg.packing.max_images_per_row,
                      holdout=cfg.eval.holdout)

    per_epoch = steps_per_epoch([eng.all_reduce_min(
        count_batches(mixture, cfg.packing, image_token_id, info.rank, info.world), info.device
    )], cfg.schedule.grad_accum)
    if per_epoch < 1:  # even with --max-steps: the run would end at once with an untrained adapter
        raise ConfigError(f"{cfg.mixture}: not enough data for one step ({per_epoch} per epoch with "
                          f"{info.world} ranks x {cfg.schedule.grad_accum} micro-batches; "
                          "`mmgpt data inspect --train-config` shows the drops)")
    total = cfg.schedule.max_steps or per_epoch * cfg.schedule.epochs
    s = cfg.schedule
    record = run_record.build(cfg, mixture_cfg, ds, info.world)
    ds = fill_optimizer(ds, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, total_steps=total,
                        warmup_steps=s.warmup_for(total), min_lr_ratio=s.min_lr_ratio,
                        cpu=info.device.type == "cpu")
    engine = eng.create_engine(model, ds, s.weight_decay, s.cross_attn_lr)

    step, position, nonfinite = 0, None, 0
    if resume:
        restored = restore(engine, model, manager, info.world, info.rank, allow_unverified)
        if restored is not None:
            step, position, nonfinite = restored
            log.info("resumed from %s at step %d", manager.root / manager.latest(), step)
            record = apply_changes(engine, manager.root / manager.latest(), record, step)
    stream = RankStream(mixture, cfg.packing, built, info.rank, info.world, s.epochs, state=position)
    loader = BatchLoader(stream, cfg.data_workers, prefetch=2 * s.grad_accum, pin_memory=info.device.type == "cuda")
    if info.is_rank0:
        cfg.save(out / "config.yaml")
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    peak, peak_source = device_peak_flops(cfg.peak_flops, cfg.cpu_peak_flops)
    log.info("world %d, %d step(s) (%d per epoch), global batch %d rows of %d tokens; data workers %d; "
             "MFU peak: %s", info.world, total, per_epoch, ds["train_batch_size"], cfg.packing.max_tokens,
             cfg.data_workers, peak_source)
    monitor = Monitor(out, enabled=info.is_rank0, total_steps=total, world=info.world, peak_flops=peak,
                      log_every=cfg.log_every)
    evaluator = None
    if cfg.eval.active:
        holdout = mixture.holdout()
        when = f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "at the end"
        log.info("eval: %d held-out samples (%s), %s", len(holdout),
                 ", ".join(f"{name} {r.held_out}" for name, r in mixture.report.sources.items()), when)
        evaluator = Evaluator(cfg.eval, built, holdout, cfg.packing, info, monitor.writer)
    return Trainer(cfg, engine, model, loader, info, monitor, manager, total, step, nonfinite, evaluator, record)


def apply_changes(engine, step_dir: Path, record: dict[str, Any], step: int) -> dict[str, Any]:
    """Log the safe setting changes of this resume (one line each), make a changed schedule take
    effect, and return the record (with its change history) that later checkpoints carry."""
    from mmgpt.train import engine as eng
    from mmgpt.train import run_record

    record, changes = run_record.resume(step_dir, record, step)
    for change in changes:
        log.info("resume at step %d: %s changed from %r to %r: %s (recorded in %s of later checkpoints)",
                 step, change["field"], change["old"], change["new"], change["effect"], run_record.RECORD)
    if any(change["field"].startswith("schedule.") for change in changes):
        eng.apply_schedule(engine)
    return record


def main(argv: list[str] | None = None) -> int:
    from mmgpt.commands import quiet

    quiet()  # the ranks a launcher starts are as quiet as `mmgpt train` (MMGPT_DEBUG=1 keeps all)
    parser = argparse.ArgumentParser(prog="python -m mmgpt.train.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
