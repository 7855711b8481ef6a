"""Monitor: derived scalars from global step sums, events readable by TensorBoard's own reader,
rank != 0 writes nothing, progress bar with ETA; the loop's per-source sums (one all-reduce),
epoch progress from the stream position, gate values, the config as text and HParams."""
from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.data.packing import PackerState, PackingConfig
from mmgpt.data.sample import write_sample
from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.train.data import RankStream, StreamPosition
from mmgpt.train.loop import WindowStats
from mmgpt.train.loss import LossOutput
from mmgpt.train.monitor import Monitor, StepMetrics, device_peak_flops, gate_values, progress_bar


def metrics(step: int, skipped: bool = False) -> StepMetrics:
    return StepMetrics(step=step, loss_sum=300.0, supervised=100, language_loss_sum=100.0, language_supervised=40,
                       vl_loss_sum=200.0, vl_supervised=60, tokens=900, samples=12, capacity=1000, flops=4e9,
                       lr=1e-5, grad_norm=None if skipped else 0.5, step_time=2.0, skipped=skipped,
                       data_wait=0.25, images=5, epoch=0.375, source_loss_sum={"dolly": 100.0, "coco": 0.0},
                       source_supervised={"dolly": 40, "coco": 0})


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
    assert values["throughput/images_per_s"] == 2.5 and values["train/epoch"] == 0.375
    assert values["loss_by_source/dolly"] == 2.5 and "loss_by_source/coco" not in values  # no token of it
    skipped = monitor.scalars(metrics(2, skipped=True))
    assert "train/loss" not in skipped and "train/grad_norm" not in skipped and "train/loss_vl" not in skipped
    assert not any(tag.startswith("loss_by_source/") for tag in skipped)


def test_events_readable_by_tensorboard_and_only_rank0_writes(tmp_path, caplog):
    rank0 = Monitor(tmp_path / "r0", enabled=True, total_steps=3, world=1, peak_flops=None)
    other = Monitor(tmp_path / "r1", enabled=False, total_steps=3, world=1, peak_flops=None)
    config = {"model": {"preset": "demo", "lora_checkpoint": None}, "schedule": {"lr": 5e-3, "betas": [0.9, 0.95]}}
    with caplog.at_level(logging.INFO, logger="mmgpt.train"):
        for m in (rank0, other):
            m.log_config(config, step=0)
        for step in (1, 2, 3):
            for m in (rank0, other):
                m.log_step(metrics(step, skipped=step == 2), gates={"gates/layer_01/attn": 0.0})
    rank0.close()
    other.close()
    assert not (tmp_path / "r1").exists()
    acc = EventAccumulator(str(tmp_path / "r0" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 3]
    assert [e.value for e in acc.Scalars("train/nonfinite_skipped_total")] == [0, 1, 1]
    assert "throughput/mfu" not in acc.Tags()["scalars"]  # no peak known: no made-up MFU
    assert [e.value for e in acc.Scalars("gates/layer_01/attn")] == [0, 0, 0]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("run **r0**") and "preset: demo" in text and "lr: 0.005" in text
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")  # in the run's own file: no sub-run
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "SKIPPED (non-finite loss or gradient)" in lines[1] and "3/3 100%" in lines[2]


def test_progress_bar_and_peak():
    assert progress_bar(0, 10, 0.0, width=10) == "[----------] 0/10   0% 00:00<00:00"
    assert progress_bar(5, 10, 50.0, width=10) == "[#####-----] 5/10  50% 00:50<00:50"
    assert progress_bar(1, 100, 4000.0, width=4).endswith("01:06:40<110:00:00")
    peak, source = device_peak_flops(None, cpu_nominal=2e12)
    assert (peak, "nominal") == (2e12, source.split()[0])
    assert device_peak_flops(5e14, cpu_nominal=2e12) == (5e14, "config peak_flops")


def test_gate_values_read_tanh_of_both_gates_per_block():
    model = build_model(ModelConfig(preset="tiny")).model
    blocks = model.cross_attn_blocks()
    assert gate_values(model) == {"gates/layer_01/attn": 0.0, "gates/layer_01/ff": 0.0,
                                  "gates/layer_03/attn": 0.0, "gates/layer_03/ff": 0.0}  # OpenFlamingo's init
    with torch.no_grad():
        blocks[1].attn_gate.fill_(0.5)
        blocks[1].ff_gate.fill_(-2.0)
    values = gate_values(model)
    assert values["gates/layer_03/attn"] == pytest.approx(torch.tanh(torch.tensor(0.5)).item())
    assert values["gates/layer_03/ff"] == pytest.approx(torch.tanh(torch.tensor(-2.0)).item())


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_window_stats_sum_loss_per_source_and_epoch_progress(tmp_path, process_group):
    built = build_model(ModelConfig(preset="tiny"), meta=True)
    tokenizer = built.tokenizer
    mixture = Mixture(MixtureConfig.load(write_sample(tmp_path, records=60, max_length=512)), tokenizer, 32)
    names = [src.name for src in mixture.cfg.sources]
    stream = RankStream(mixture, PackingConfig(max_tokens=512, buffer_size=8), built, rank=0, world=1)
    stats = WindowStats(torch.device("cpu"), "tiny", 0.0, names)
    batches = [stream.next_batch() for _ in range(2)]
    for batch in batches:  # each sample's loss sum = 2 x its token count: every source's mean loss is 2
        counts = torch.bincount(batch.sample_index[batch.supervised_index], minlength=batch.num_samples)
        out = LossOutput(loss_sum=2.0 * counts.sum().double(), num_supervised=batch.num_supervised,
                         sample_loss_sum=2.0 * counts.float(), sample_count=counts)
        stats.add(batch, out, batch.is_vl)
    totals = stats.totals(stream.state().consumed(0, 1, len(mixture)))
    seen = {s for b in batches for s in b.sources}
    assert {n for n, c in totals["source_supervised"].items() if c} == seen
    assert sum(totals["source_supervised"].values()) == totals["supervised"] == sum(b.num_supervised for b in batches)
    assert all(totals["source_loss_sum"][n] == 2 * totals["source_supervised"][n] for n in names)
    assert totals["images"] == sum(b.images.shape[0] for b in batches)
    assert totals["epoch_samples"] == sum(b.num_samples for b in batches)  # the sample data drops nothing
    while stream.next_batch() is not None:  # the end of the epoch: exactly 1.0
        pass
    assert stream.state().consumed(0, 1, len(mixture)) == len(mixture)


def test_epoch_samples_add_up_over_ranks_to_whole_epochs():
    n, world = 10, 3
    at = lambda epoch, next_index, buffered: StreamPosition(epoch, PackerState(next_index,  # noqa: E731
                                                                                tuple(range(buffered))))
    assert sum(at(0, n, 0).consumed(r, world, n) for r in range(world)) == n  # ranks hold 4, 3, 3
    assert sum(at(1, 0, 0).consumed(r, world, n) for r in range(world)) == n
    assert at(0, 7, 1).consumed(1, world, n) == 1  # positions 1, 4 read, one still buffered
    assert at(2, 1, 0).consumed(0, world, n) == 2 * 4 + 1
