"""The training loop: global-token loss normalisation, non-finite skips, and what each save holds
(step, data positions; the checkpoint files themselves: checkpointing.py).

Loss normalisation. The loss of a step is the mean cross-entropy over the supervised tokens of the
GLOBAL batch (all micro-batches of all ranks). The model returns per-micro-batch SUMS; before the
window's backward passes, each rank counts its window's supervised tokens and one all-reduce gives
the global count N. DeepSpeed then divides every backward loss by the accumulation steps
(engine.backward, scale_wrt_gas) and averages gradients over the data-parallel ranks (ZeRO
reduce with gradient_predivide_factor 1), so each micro-batch backpropagates
loss_sum x world x accum / N, and the update sees sum(all token losses) / N, whatever the split.

Non-finite losses. A rank whose micro-batch loss is NaN/inf backpropagates that loss times NaN:
the same graph as a normal backward (so ZeRO's gradient hooks and bucket collectives run in the
same order on every rank) but with gradients guaranteed NaN. The choice is made on the device
(`torch.where`), so no micro-batch waits for its loss to reach the host. ZeRO's overflow check
(bf16.check_grad_overflow) all-reduces "any non-finite gradient", so every rank skips the update,
zeroes the gradients and leaves the LR schedule alone; engine.was_step_applied() is then False on
all ranks alike, which is how the loop counts skipped steps and stops after
`max_consecutive_nonfinite` in a row.

Window statistics (loss sums by kind) stay on the device too: `WindowStats` adds them into one
tensor and the step reads them back once, in the same collective that sums them over ranks.

Gradient order. ZeRO-2 reduces gradients in buckets filled in the order the parameters' gradient
hooks fire, and all ranks must fill them identically. That order depends on the data: a packed
batch without images never reaches the cross-attention LoRA (zero keys give exact zeros), so those
parameters get no gradient on that rank while another rank's batch has images (a collective
mismatch, or silently mixed-up sums). See `gradient_anchor`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmgpt.train.config import TrainConfig
from mmgpt.contracts import PackedBatch
from mmgpt.train.loss import LossOutput, packed_loss
from mmgpt.perf import StepShape, step_flops
from mmgpt.run_layout import order_log
from mmgpt.train import checkpointing as ckpt
from mmgpt.train.data import BatchLoader
from mmgpt.train.engine import DistInfo, all_gather, all_reduce_sum
from mmgpt.train.eval import Evaluator
from mmgpt.train.monitor import Monitor, StepMetrics, gate_values
from mmgpt.train.stop import StopRequest, stop_on_signals

log = logging.getLogger("mmgpt.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss: the run stops instead of idling."""


def global_loss_scale(global_supervised: int, world: int, accum: int) -> float:
    """Factor for each micro-batch's loss SUM so that DeepSpeed's 1/accum and 1/world averaging
    turn the accumulated gradient into the gradient of (sum of token losses / global_supervised).

    A window without any supervised token contributes nothing (scale 0).
    """
    return world * accum / global_supervised if global_supervised > 0 else 0.0


def gradient_anchor(params: list[Tensor]) -> Tensor:
    """A zero-weight term, built BEFORE the forward, that makes gradient order data-independent.

    `loss + 0 * anchor` gives every trainable parameter a gradient path through a node created
    before the forward. Autograd runs ready nodes latest-created first, so the anchor runs after
    the whole model backward, and each parameter's gradient is complete (its hook fires) only
    then, in an order fixed by the parameter list alone: the same on every rank, whatever the data.
    One concatenation and one sum (a few kernels, not one per parameter); the added gradient is
    exactly zero.
    """
    return torch.cat([p.reshape(-1) for p in params]).sum()


DEVICE_SUMS = ("loss_sum", "language_loss_sum", "language_supervised", "vl_loss_sum", "vl_supervised")
HOST_SUMS = ("supervised", "tokens", "samples", "images", "capacity", "flops", "data_wait", "epoch_samples",
             "stop")


class WindowStats:
    """Local sums over one accumulation window: what the host knows (counts, FLOPs, seconds waited
    for data) as numbers, the losses (by kind and by mixture source) as one device tensor, so no
    micro-batch syncs; `totals` sums both over ranks in one collective and reads them back once."""

    def __init__(self, device: torch.device, preset: str, data_wait: float, sources: list[str]):
        self.preset = preset
        self.sources = sources
        self._source_index = {name: i for i, name in enumerate(sources)}
        self.host = dict.fromkeys(HOST_SUMS, 0.0)
        self.host["data_wait"] = data_wait
        self.losses = torch.zeros(len(DEVICE_SUMS) + 2 * len(sources), dtype=torch.float64, device=device)

    def add(self, batch: PackedBatch, out: LossOutput, is_vl: Tensor) -> None:
        """`batch` on the host (its shape is read there), `out` and `is_vl` on the device."""
        h = self.host
        h["flops"] += step_flops(self.preset, StepShape.from_batch(batch)).train
        h["supervised"] += batch.num_supervised
        h["tokens"] += batch.num_tokens
        h["samples"] += batch.num_samples
        h["images"] += batch.images.shape[0]
        h["capacity"] += batch.num_rows * batch.row_tokens
        per_sample = torch.stack([out.sample_loss_sum.double(), out.sample_count.double()], dim=1)
        by_kind = per_sample.new_zeros(2, 2).index_add_(0, is_vl.long(), per_sample)  # [language, vl]
        source = torch.tensor([self._source_index[s] for s in batch.sources], dtype=torch.long,
                              device=per_sample.device)
        by_source = per_sample.new_zeros(len(self.sources), 2).index_add_(0, source, per_sample)
        self.losses += torch.cat([out.loss_sum.detach().double().reshape(1), by_kind.flatten(), by_source.flatten()])

    def totals(self, epoch_samples: float, stop: bool = False) -> dict[str, Any]:
        """Every sum over all ranks (a collective; the step's one device-to-host read), with the
        per-source sums as `source_loss_sum` / `source_supervised` dicts. `epoch_samples`: this
        rank's part of `epoch_progress` (samples of the epoch consumed, plus whole epochs done);
        `stop`: whether this rank was asked to stop (summed: how many were)."""
        self.host["epoch_samples"] = epoch_samples
        self.host["stop"] = float(stop)
        host = torch.tensor(list(self.host.values()), dtype=torch.float64, device=self.losses.device)
        values = torch.cat([self.losses, host])
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values.tolist()
        kinds, by_source = len(DEVICE_SUMS), values[len(DEVICE_SUMS):len(self.losses)]
        totals = dict(zip(DEVICE_SUMS + HOST_SUMS, values[:kinds] + values[len(self.losses):]))
        totals["source_loss_sum"] = dict(zip(self.sources, by_source[0::2]))
        totals["source_supervised"] = {name: int(n) for name, n in zip(self.sources, by_source[1::2])}
        return totals


class Trainer:
    """Runs optimizer steps on a DeepSpeed engine; owns step count, data position and saving.
    `evaluator` (optional) evaluates on the held-out data between steps and at the end."""

    def __init__(self, cfg: TrainConfig, engine: Any, model: nn.Module, stream: BatchLoader, dist_info: DistInfo,
                 monitor: Monitor, manager: ckpt.CheckpointManager, total_steps: int, step: int = 0,
                 consecutive_nonfinite: int = 0, evaluator: Evaluator | None = None,
                 record: dict[str, Any] | None = None):
        self.cfg = cfg
        self.engine = engine
        self.model = model
        self.stream = stream
        self.dist = dist_info
        self.monitor = monitor
        self.manager = manager
        self.total_steps = total_steps
        self.step = step
        self.consecutive_nonfinite = consecutive_nonfinite
        self.evaluator = evaluator
        self.record = record
        self.stopped: str | None = None  # why every rank stops after this step, once one was asked to
        self._stop = StopRequest()
        self.accum = cfg.schedule.grad_accum
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.monitor.log_config(cfg.to_dict(), step)
        self._order_log = ckpt.open_order_log(order_log(Path(cfg.output_dir), dist_info.rank), step)

    def train(self, stop_at_step: int | None = None) -> str:
        """Train until total_steps, the end of the data, stop_at_step or a stop request (a signal
        to any rank, the launcher gone: `stop.py`); returns why it stopped."""
        last = min(self.total_steps, stop_at_step or self.total_steps)
        reason = "finished"
        with stop_on_signals() as self._stop:
            while self.step < last:
                if self.train_step() is None:
                    reason = "data exhausted"
                    break
                if self.stopped is not None:
                    reason = self.stopped
                    break
                if self.evaluator is not None and self.evaluator.due(self.step):
                    self.evaluator.run(self.step)
                if self.step % self.cfg.save_every == 0 and self.step < last:
                    self.save()
            if self.step < self.total_steps and reason == "finished":
                reason = "stopped by --stop-at-step"
            if self.evaluator is not None and self.stopped is None:  # a stop saves without delay
                self.evaluator.finish(self.step)
            if self.manager.latest() != ckpt.tag_for(self.step):  # e.g. resumed a run that had finished
                self.save()
        self._order_log.close()
        return reason

    def train_step(self) -> StepMetrics | None:
        """One optimizer step over one accumulation window (its metrics); None when the data ran out."""
        start = time.perf_counter()
        window = self.stream.window(self.accum)
        data_wait = time.perf_counter() - start
        supervised = sum(b.num_supervised for b in window)
        global_supervised, short = all_reduce_sum([supervised, float(len(window) < self.accum)], self.dist.device)
        if short:
            log.info("data exhausted at step %d (a rank had fewer than %d batches left)", self.step, self.accum)
            return None
        scale = global_loss_scale(int(global_supervised), self.dist.world, self.accum)
        stats = WindowStats(self.dist.device, self.cfg.model.preset, data_wait, self.stream.source_names())
        lr = self.engine.get_lr()[0]
        for batch in window:
            anchor = gradient_anchor(self.trainable)
            on_device = batch.to(self.dist.device)
            out = packed_loss(self.engine, self.model.lm_head, on_device)
            factor = torch.where(torch.isfinite(out.loss_sum.detach()), scale, float("nan"))
            self.engine.backward(out.loss_sum * factor + 0.0 * anchor)
            self.engine.step()
            stats.add(batch, out, on_device.is_vl)
        self.step += 1
        applied = self.engine.was_step_applied()
        sample_ids = [i for b in window for i in b.sample_ids]
        self._order_log.write(json.dumps({"step": self.step, "samples": sample_ids}) + "\n")
        self._order_log.flush()
        totals = stats.totals(self.stream.consumed(), stop=self._stop.reason is not None)
        self._note_stop(int(totals.pop("stop")))
        grad_norm = self.engine.get_global_grad_norm() if applied else None
        metrics = StepMetrics(step=self.step, lr=lr, grad_norm=_finite_or_none(grad_norm),
                              step_time=time.perf_counter() - start, skipped=not applied,
                              data_wait=totals.pop("data_wait") / self.dist.world,
                              epoch=totals.pop("epoch_samples") / self.stream.epoch_length,
                              **{k: (int(v) if k in _COUNTS else v) for k, v in totals.items()})
        self.monitor.log_step(metrics, gate_values(self.model) if self.monitor.enabled else None)
        self._track_nonfinite(applied, sample_ids)
        return metrics

    def _note_stop(self, ranks: int) -> None:
        """After a step whose all-reduce counted `ranks` ranks asked to stop: every rank stops."""
        if ranks and self.stopped is None:
            self.stopped = f"stopped after step {self.step}: {ranks} rank(s) asked to stop"
            log.warning("%s (this rank: %s); saving a checkpoint, then exiting; --resume auto continues",
                        self.stopped, self._stop.reason or "no signal")

    def _track_nonfinite(self, applied: bool, sample_ids: list[int]) -> None:
        if applied:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row; rank %d samples %s)",
                    self.step, self.consecutive_nonfinite, self.dist.rank, sample_ids)
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss (steps "
                f"{self.step - self.consecutive_nonfinite + 1}..{self.step}); stopping. Last good checkpoint: "
                f"{self.manager.latest() or 'none'}; limit: max_consecutive_nonfinite="
                f"{self.cfg.max_consecutive_nonfinite}")

    def save(self) -> str:
        """Checkpoint (collective): LoRA + optimizer + scheduler + step + every rank's data position."""
        positions = all_gather(self.stream.state().to_dict(), self.dist.world)
        state = {"step": self.step, "world": self.dist.world, "data": positions,
                 "consecutive_nonfinite": self.consecutive_nonfinite}
        tag = ckpt.save(self.manager, self.engine, self.step, state, is_rank0=self.dist.is_rank0,
                        barrier=dist.barrier, adapter=self.model.lang_encoder, record=self.record)
        log.info("saved checkpoint %s", self.manager.root / tag)
        return tag


_COUNTS = {"supervised", "language_supervised", "vl_supervised", "tokens", "samples", "images", "capacity"}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
