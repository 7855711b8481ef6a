"""One training run from a TrainConfig, on 1..N ranks, in the order it happens:

    validate  (no process group yet: a bad input fails before any rank waits on another)
    setup     process group -> model -> optimizer/engine -> restore -> data -> monitor/eval
    loop      Trainer.train (mmgpt/train/loop.py): steps, evals, checkpoints, a stop request
    save      the adapter (or, when stopped, the checkpoint the next `--resume auto` starts from)

`TrainRecipe(cfg, RunOptions(...)).run()` is what `mmgpt train` (mmgpt/cli/train.py) calls; `mmgpt
bench train` times the steps of `setup`'s Trainer. A problem a human must fix raises `RunRefused`
(or NonFiniteLossError after too many bad steps); the command line maps them to its exit codes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.models.builder import BuiltModel, build_model
from mmgpt.run_layout import (ADAPTER_DIR, CHECKPOINTS_DIR, DATA_REPORT, DS_CONFIG, TENSORBOARD_DIR, TRAIN_CONFIG,
                              TRAINED_WITH, step_of)
from mmgpt.train import engine as eng
from mmgpt.train import run_record
from mmgpt.train.checkpointing import CheckpointError, CheckpointManager, require_manifest, restore
from mmgpt.train.config import ConfigError, TrainConfig
from mmgpt.train.data import BatchLoader, RankStream, count_batches, merge_reports, steps_per_epoch
from mmgpt.train.ds_config import DSConfigError, fill_optimizer, jit_build_notice, load_ds_config, resolve_batch
from mmgpt.train.eval import Evaluator
from mmgpt.train.loop import NonFiniteLossError, Trainer
from mmgpt.train.master_port import PortError
from mmgpt.train.monitor import Monitor, device_peak_flops, setup_logging
from mmgpt.train.run_identity import RunIdentity, RunIdentityError, check_run_identity

log = logging.getLogger("mmgpt.train")

# what `validate` may raise about the inputs, and what only shows once the ranks have started
INPUT_ERRORS = (ConfigError, DSConfigError, CheckpointError, ValueError, FileNotFoundError)
STARTUP_ERRORS = (ConfigError, CheckpointError, PortError, RunIdentityError)


@dataclass(frozen=True)
class RunOptions:
    """How this run starts and ends (the config says what it trains)."""

    resume: bool = False  # continue from output_dir/checkpoints/latest if present
    allow_unverified: bool = False  # with resume: even from a checkpoint without manifest.json
    stop_at_step: int | None = None  # save and exit here without changing the schedule


class RunRefused(Exception):
    """Nothing (more) was trained because of something a human must fix: a bad config, DeepSpeed
    JSON or checkpoint, or, found at start-up, a busy port, another job's ranks, too little data."""


def release_process_group() -> None:
    """Tear the process group down on a refused run: left to interpreter exit, gloo's worker threads
    can be destroyed while joinable, and the rank then dies of SIGABRT ("terminate called without an
    active exception") after printing its one-line error instead of exiting with its code."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainRecipe:
    """The run's steps as methods, each short enough to read at once; state set by one step and read
    by the next lives on the instance (`ds`, `mixture_cfg` from `validate`)."""

    def __init__(self, cfg: TrainConfig, options: RunOptions = RunOptions()):
        self.cfg, self.options = cfg, options
        self.ds: dict[str, Any] = {}
        self.mixture_cfg: MixtureConfig | None = None

    def run(self) -> bool:
        """Validate, then train; True when a stop request ended the run (a checkpoint was saved)."""
        try:
            self.validate()
        except INPUT_ERRORS as err:
            raise RunRefused(str(err)) from err
        if int(os.environ.get("RANK", "0")) == 0 and (note := jit_build_notice(self.ds, torch.cuda.is_available())):
            print(f"mmgpt train: note: {note}", file=sys.stderr, flush=True)
        try:
            return self.train()
        except STARTUP_ERRORS as err:  # a busy port, another job's ranks, too little data, a bad checkpoint
            release_process_group()
            raise RunRefused(str(err)) from err
        except NonFiniteLossError as err:
            log.error("%s", err)
            release_process_group()
            raise

    def validate(self) -> tuple[dict[str, Any], MixtureConfig]:
        """Every check that needs no process group, so a bad input fails before any rank waits on
        another: the DeepSpeed JSON and batch split (world size from the launcher's WORLD_SIZE), the
        mixture file, rows long enough for its samples, no accidental restart over a finished run, and
        no resume from a checkpoint without a manifest (unless `allow_unverified`) or whose settings
        differ from this run's in a field that may not change (the world size included, before
        DeepSpeed's own load would fail on it)."""
        cfg, resume = self.cfg, self.options.resume
        if self.options.allow_unverified and not resume:
            raise ConfigError("--resume-unverified only applies with --resume auto")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = load_ds_config(cfg.deepspeed)
        self.ds = resolve_batch(ds, cfg.packing.rows_per_batch, cfg.schedule.grad_accum, world, where=cfg.deepspeed)
        self.mixture_cfg = MixtureConfig.load(cfg.mixture)
        cfg.check_rows(self.mixture_cfg.max_length)
        manager = self.manager()
        if not resume and manager.latest() is not None:
            raise CheckpointError(f"{manager.root} already has checkpoints (latest {manager.latest()}): "
                                  "pass --resume auto to continue, or choose another output_dir")
        if resume and (tag := manager.latest()) is not None:
            require_manifest(manager, tag, self.options.allow_unverified)
            run_record.resume(manager.root / tag, run_record.build(cfg, self.mixture_cfg, self.ds, world), step_of(tag))
        return self.ds, self.mixture_cfg

    def manager(self) -> CheckpointManager:
        return CheckpointManager(Path(self.cfg.output_dir) / CHECKPOINTS_DIR, self.cfg.keep_last)

    def train(self) -> bool:
        """Process group, setup, the loop, the adapter; collective. True when stopped by a request."""
        cfg = self.cfg
        info = eng.init_distributed()
        check_run_identity(RunIdentity.of(cfg.to_dict(), cfg.output_dir), info.world)  # before any file is written
        out = Path(cfg.output_dir)
        if info.is_rank0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        setup_logging(out, info.is_rank0)
        trainer = self.setup(info)
        try:
            reason = trainer.train(self.options.stop_at_step)
        except NonFiniteLossError:  # the data report says what the run had seen
            self.write_data_report(trainer, info)
            raise
        self.write_data_report(trainer, info)
        if info.is_rank0 and trainer.stopped is not None:
            log.info("%s. Checkpoint: %s (--resume auto continues from it)", reason,
                     trainer.manager.root / trainer.manager.latest())
        elif info.is_rank0:
            trainer.model.lang_encoder.save_pretrained(str(out / ADAPTER_DIR))
            log.info("%s at step %d. TensorBoard: %s  checkpoints: %s  adapter: %s", reason, trainer.step,
                     out / TENSORBOARD_DIR, trainer.manager.root, out / ADAPTER_DIR)
        dist.barrier()
        dist.destroy_process_group()
        return trainer.stopped is not None

    def write_data_report(self, trainer: Trainer, info: eng.DistInfo) -> None:
        """Collective: every rank's share of the drops, merged into OUT/data_report.json."""
        trainer.stream.close()
        trainer.monitor.close()
        reports = eng.all_gather(trainer.stream.report(), info.world)
        if info.is_rank0:
            (Path(self.cfg.output_dir) / DATA_REPORT).write_text(json.dumps(merge_reports(reports), indent=2))

    def setup(self, info: eng.DistInfo) -> Trainer:
        """Everything a run needs once the process group is up: model, engine, restored state, data,
        monitor and evaluator, as a Trainer (also what `mmgpt bench train` times). Collective."""
        cfg, s = self.cfg, self.cfg.schedule
        out = Path(cfg.output_dir)
        built = build_model(cfg.model, device=info.device, dtype=eng.model_dtype(self.ds))
        model = built.model
        mixture = Mixture(self.mixture_cfg, built.tokenizer, built.image_size, max_images=cfg.packing.max_images_per_row,
                          holdout=cfg.eval.holdout)
        per_epoch, total = self.schedule_length(mixture, built.image_token_id, info)
        record = run_record.build(cfg, self.mixture_cfg, self.ds, info.world)
        ds = fill_optimizer(self.ds, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, total_steps=total,
                            warmup_steps=s.warmup_for(total), min_lr_ratio=s.min_lr_ratio,
                            cpu=info.device.type == "cpu")
        engine = eng.create_engine(model, ds, s.weight_decay, s.cross_attn_lr)
        manager = self.manager()
        step, position, nonfinite = 0, None, 0
        if self.options.resume:
            restored = restore(engine, model, manager, info.world, info.rank, self.options.allow_unverified)
            if restored is not None:
                step, position, nonfinite = restored
                log.info("resumed from %s at step %d", manager.root / manager.latest(), step)
                record = apply_changes(engine, manager.root / manager.latest(), record, step)
        stream = RankStream(mixture, cfg.packing, built, info.rank, info.world, s.epochs, state=position)
        loader = BatchLoader(stream, cfg.data_workers, prefetch=2 * s.grad_accum, pin_memory=info.device.type == "cuda")
        if info.is_rank0:
            cfg.save(out / TRAIN_CONFIG)
            (out / DS_CONFIG).write_text(json.dumps(ds, indent=2))
        peak, peak_source = device_peak_flops(cfg.peak_flops, cfg.cpu_peak_flops)
        log.info("world %d, %d step(s) (%d per epoch), global batch %d rows of %d tokens; data workers %d; "
                 "MFU peak: %s", info.world, total, per_epoch, ds["train_batch_size"], cfg.packing.max_tokens,
                 cfg.data_workers, peak_source)
        monitor = Monitor(out, enabled=info.is_rank0, total_steps=total, world=info.world, peak_flops=peak,
                          log_every=cfg.log_every)
        evaluator = self.evaluator(built, mixture, info, monitor)
        return Trainer(cfg, engine, model, loader, info, monitor, manager, total, step, nonfinite, evaluator, record)

    def schedule_length(self, mixture: Mixture, image_token_id: int, info: eng.DistInfo) -> tuple[int, int]:
        """(steps per epoch, total steps): the epoch as the smallest rank's share plans it."""
        cfg = self.cfg
        per_epoch = steps_per_epoch([eng.all_reduce_min(
            count_batches(mixture, cfg.packing, image_token_id, info.rank, info.world), info.device
        )], cfg.schedule.grad_accum)
        if per_epoch < 1:  # even with --max-steps: the run would end at once with an untrained adapter
            raise ConfigError(f"{cfg.mixture}: not enough data for one step ({per_epoch} per epoch with "
                              f"{info.world} ranks x {cfg.schedule.grad_accum} micro-batches; "
                              "`mmgpt data inspect --train-config` shows the drops)")
        return per_epoch, cfg.schedule.max_steps or per_epoch * cfg.schedule.epochs

    def evaluator(self, built: BuiltModel, mixture: Mixture, info: eng.DistInfo, monitor: Monitor) -> Evaluator | None:
        """The held-out evaluation, when the config asks for one."""
        cfg = self.cfg
        if not cfg.eval.active:
            return None
        holdout = mixture.holdout()
        when = f"every {cfg.eval.every} steps and at the end" if cfg.eval.every else "at the end"
        log.info("eval: %d held-out samples (%s), %s", len(holdout),
                 ", ".join(f"{name} {r.held_out}" for name, r in mixture.report.sources.items()), when)
        return Evaluator(cfg.eval, built, holdout, cfg.packing, info, monitor.writer)


def apply_changes(engine, step_dir: Path, record: dict[str, Any], step: int) -> dict[str, Any]:
    """Log the safe setting changes of this resume (one line each), make a changed schedule take
    effect, and return the record (with its change history) that later checkpoints carry."""
    record, changes = run_record.resume(step_dir, record, step)
    for change in changes:
        log.info("resume at step %d: %s changed from %r to %r: %s (recorded in %s of later checkpoints)",
                 step, change["field"], change["old"], change["new"], change["effect"], TRAINED_WITH)
    if any(change["field"].startswith("schedule.") for change in changes):
        eng.apply_schedule(engine)
    return record
