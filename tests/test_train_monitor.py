"""Monitor: derived scalars from global step sums, events readable by TensorBoard's own reader,
rank != 0 writes nothing, progress bar with ETA."""
from __future__ import annotations

import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmgpt.train.monitor import Monitor, StepMetrics, device_peak_flops, progress_bar


def metrics(step: int, skipped: bool = False) -> StepMetrics:
    return StepMetrics(step=step, loss_sum=300.0, supervised=100, language_loss_sum=100.0, language_supervised=40,
                       vl_loss_sum=200.0, vl_supervised=60, tokens=900, samples=12, capacity=1000, flops=4e9,
                       lr=1e-5, grad_norm=None if skipped else 0.5, step_time=2.0, skipped=skipped,
                       data_wait=0.25)


def test_scalars_are_derived_from_global_sums(tmp_path):
    monitor = Monitor(tmp_path, enabled=False, total_steps=10, world=2, peak_flops=1e9)
    values = monitor.scalars(metrics(1))
    assert values["train/loss"] == 3.0
    assert values["train/loss_language"] == 2.5 and values["train/loss_vl"] == pytest.approx(200 / 60)
    assert values["throughput/tokens_per_s"] == 450 and values["throughput/supervised_tokens_per_s"] == 50
    assert values["throughput/samples_per_s"] == 6 and values["throughput/packing_efficiency"] == 0.9
    assert values["throughput/mfu"] == pytest.approx(4e9 / 2.0 / (1e9 * 2))
    assert values["train/grad_norm"] == 0.5 and values["memory/peak_gib"] > 0
    assert values["throughput/data_wait_s"] == 0.25
    skipped = monitor.scalars(metrics(2, skipped=True))
    assert "train/loss" not in skipped and "train/grad_norm" not in skipped and "train/loss_vl" not in skipped


def test_events_readable_by_tensorboard_and_only_rank0_writes(tmp_path, caplog):
    rank0 = Monitor(tmp_path / "r0", enabled=True, total_steps=3, world=1, peak_flops=None)
    other = Monitor(tmp_path / "r1", enabled=False, total_steps=3, world=1, peak_flops=None)
    with caplog.at_level(logging.INFO, logger="mmgpt.train"):
        for step in (1, 2, 3):
            for m in (rank0, other):
                m.log_step(metrics(step, skipped=step == 2))
    rank0.close()
    other.close()
    assert not (tmp_path / "r1").exists()
    acc = EventAccumulator(str(tmp_path / "r0" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3]
    assert [e.value for e in acc.Scalars("train/nonfinite_skipped_total")] == [0, 1, 1]
    assert "throughput/mfu" not in acc.Tags()["scalars"]  # no peak known: no made-up MFU
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "SKIPPED (non-finite loss or gradient)" in lines[1] and "3/3 100%" in lines[2]


def test_progress_bar_and_peak():
    assert progress_bar(0, 10, 0.0, width=10) == "[----------] 0/10   0% 00:00<00:00"
    assert progress_bar(5, 10, 50.0, width=10) == "[#####-----] 5/10  50% 00:50<00:50"
    assert progress_bar(1, 100, 4000.0, width=4).endswith("01:06:40<110:00:00")
    peak, source = device_peak_flops(None, cpu_nominal=2e12)
    assert (peak, "nominal") == (2e12, source.split()[0])
    assert device_peak_flops(5e14, cpu_nominal=2e12) == (5e14, "config peak_flops")
