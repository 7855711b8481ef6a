"""What a run reports (rank 0 only): TensorBoard scalars, OUT/train.log, a console progress bar.

Every number here is GLOBAL (summed over ranks and the accumulation window by the loop) so the
curves do not depend on how the global batch was split. MFU = achieved FLOP/s / (peak x world);
the peak is the accelerator's bf16 dense peak, or a configured value; on CPU it is a nominal
configured number, so CPU MFU only compares runs on the same machine.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmgpt.perf import peak_bf16_flops

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

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.supervised, 1)


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
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

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
        if self.peak_flops:
            values["throughput/mfu"] = m.flops / m.step_time / (self.peak_flops * self.world)
        return values

    def log_step(self, m: StepMetrics) -> None:
        self.skipped_total += int(m.skipped)
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._start = m.step - 1, time.monotonic() - m.step_time
        values = self.scalars(m)
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
        handlers.append(logging.FileHandler(Path(out_dir) / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
