"""What a run reports (rank 0 only): TensorBoard scalars, OUT/train.log, a console progress bar.

Every number here is GLOBAL (summed over ranks and the accumulation window by the loop) so the
curves do not depend on how the global batch was split. MFU = achieved FLOP/s / (peak x world);
the peak is the accelerator's bf16 dense peak, or a configured value; on CPU it is a nominal
configured number, so CPU MFU only compares runs on the same machine.

The events live in OUT/tensorboard (the model card reads them there), so `tensorboard --logdir`
on the folder holding several output dirs lists each run by its output dir (`demo/tensorboard`);
the config text is titled with that name too.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mmgpt.perf import peak_bf16_flops
from mmgpt.run_layout import TENSORBOARD_DIR, TRAIN_LOG

log = logging.getLogger("mmgpt.train")

def device_peak_flops(configured: float | None, cpu_nominal: float) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where the number comes from (for the log)."""
    if configured is not None:
        return configured, "config peak_flops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = peak_bf16_flops(name)
        if peak is not None:
            return peak, f"{name} bf16 dense peak"
        return None, f"unknown peak for {name}: set peak_flops in the config for MFU"
    return cpu_nominal, "nominal CPU value (config cpu_peak_flops), not a measured peak"


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process, or peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@dataclass
class StepMetrics:
    """One optimizer step, global over ranks and micro-batches."""

    step: int
    loss_sum: float
    supervised: int
    language_loss_sum: float
    language_supervised: int
    vl_loss_sum: float
    vl_supervised: int
    tokens: int
    samples: int
    capacity: int  # rows x row tokens
    flops: float  # training matmul FLOPs (mmgpt.perf.step_flops), summed
    lr: float
    grad_norm: float | None
    step_time: float
    skipped: bool  # non-finite loss: no update
    data_wait: float  # seconds the step waited for its window, mean over ranks (a data-bound run)
    images: int = 0
    epoch: float = 0.0  # epochs done: whole ones + the fraction of this epoch's samples consumed
    source_loss_sum: dict[str, float] = field(default_factory=dict)  # by mixture source name
    source_supervised: dict[str, int] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.supervised, 1)


def gate_values(model: nn.Module) -> dict[str, float]:
    """tanh(attn_gate) and tanh(ff_gate) of each gated cross-attention block, tagged by the LLaMA
    layer it precedes (the checkpoint key `layers.{i}.gated_cross_attn_layer`); one device read.
    0 means the block is an identity: OpenFlamingo's init, which LoRA training leaves frozen."""
    layers = [(i, layer.gated_cross_attn_layer) for i, layer in enumerate(model.language_model.model.layers)
              if layer.gated_cross_attn_layer is not None]
    if not layers:
        return {}
    values = torch.stack([torch.cat([b.attn_gate, b.ff_gate]) for _, b in layers]).detach().float().tanh().tolist()
    return {f"gates/layer_{i:02d}/{kind}": v for (i, _), pair in zip(layers, values)
            for kind, v in zip(("attn", "ff"), pair)}


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`a.b: value` pairs of a nested config; values the HParams plugin cannot hold become text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def progress_bar(step: int, total: int, elapsed: float, width: int = 24) -> str:
    """`[#####-------] 12/100  12%  00:12<01:28` (ETA from the mean step time so far)."""
    frac = min(step / total, 1.0) if total else 1.0
    filled = int(round(frac * width))
    eta = elapsed / step * (total - step) if step else 0.0
    return f"[{'#' * filled}{'-' * (width - filled)}] {step}/{total} {frac:4.0%} {_hms(elapsed)}<{_hms(eta)}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Monitor:
    """Rank 0 writes; other ranks get a Monitor with enabled=False that does nothing."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, total_steps: int, world: int,
                 peak_flops: float | None, log_every: int = 1):
        self.enabled = enabled
        self.total_steps = total_steps
        self.world = world
        self.peak_flops = peak_flops
        self.log_every = log_every
        self.skipped_total = 0
        self._start = time.monotonic()
        self._first_step: int | None = None
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            out_dir = Path(out_dir)
            self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
        self.run_name = Path(out_dir).resolve().name

    def log_config(self, config: dict[str, Any], step: int) -> None:
        """The resolved config, once per start: as YAML text and as HParams (in this run's own
        event file, not the per-call sub-run `SummaryWriter.add_hparams` would create)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", f"run **{self.run_name}**\n\n```yaml\n{text}```", step)
        for summary in hparams(flat_hparams(config), {"train/loss": None}):
            self.writer.file_writer.add_summary(summary, step)

    def scalars(self, m: StepMetrics) -> dict[str, float]:
        """The TensorBoard tags and values of one step."""
        values = {
            "train/lr": m.lr,
            "train/nonfinite_skipped_total": float(self.skipped_total),
            "throughput/step_time_s": m.step_time,
            "throughput/data_wait_s": m.data_wait,
            "throughput/tokens_per_s": m.tokens / m.step_time,
            "throughput/supervised_tokens_per_s": m.supervised / m.step_time,
            "throughput/samples_per_s": m.samples / m.step_time,
            "throughput/images_per_s": m.images / m.step_time,
            "train/epoch": m.epoch,
            "throughput/packing_efficiency": m.tokens / m.capacity if m.capacity else 1.0,
            "memory/peak_gib": peak_memory_gib(),
        }
        if not m.skipped:
            values["train/loss"] = m.loss
            if m.grad_norm is not None:
                values["train/grad_norm"] = m.grad_norm
        if m.language_supervised and not m.skipped:
            values["train/loss_language"] = m.language_loss_sum / m.language_supervised
        if m.vl_supervised and not m.skipped:
            values["train/loss_vl"] = m.vl_loss_sum / m.vl_supervised
        if not m.skipped:
            for name, count in m.source_supervised.items():
                if count:
                    values[f"loss_by_source/{name}"] = m.source_loss_sum[name] / count
        if self.peak_flops:
            values["throughput/mfu"] = m.flops / m.step_time / (self.peak_flops * self.world)
        return values

    def log_step(self, m: StepMetrics, gates: dict[str, float] | None = None) -> None:
        """Write one step's scalars (plus `gate_values`, read by the caller on rank 0)."""
        self.skipped_total += int(m.skipped)
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._start = m.step - 1, time.monotonic() - m.step_time
        values = {**self.scalars(m), **(gates or {})}
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, m.step)
        if m.skipped or m.step % self.log_every == 0 or m.step == self.total_steps:
            done = m.step - self._first_step
            elapsed = time.monotonic() - self._start
            bar = progress_bar(done, self.total_steps - self._first_step, elapsed)
            loss = f"loss {m.loss:.4f}" + (" SKIPPED (non-finite loss or gradient)" if m.skipped else "")
            log.info("step %d/%d %s | %s | lr %.3g | %.0f tok/s | eff %.3f | %d samples", m.step,
                     self.total_steps, bar, loss, m.lr, values["throughput/tokens_per_s"],
                     values["throughput/packing_efficiency"], m.samples)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def setup_logging(out_dir: str | Path, enabled: bool) -> None:
    """Rank 0 logs to the console and OUT/train.log; other ranks log warnings only."""
    logger = logging.getLogger("mmgpt")
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if enabled:
        handlers.append(logging.FileHandler(Path(out_dir) / TRAIN_LOG))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
