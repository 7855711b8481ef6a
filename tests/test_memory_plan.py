"""`mmgpt plan` (mmgpt/train/memory_plan.py): the 9B on every listed card, checked against the one
GPU figure we have and against the CPU allocator's peak; `launch_check --gpu` shows it."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt import cli
from mmgpt.train.config import TrainConfig
from mmgpt.models.builder import ModelConfig, build_model
from mmgpt.train import launch_check, memory_plan
from mmgpt.train.ds_config import load_ds_config
from mmgpt.train.loss import packed_loss

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mmgpt_9b.yaml"
H200 = REPO / "bench" / "results" / "h200_9b_bf16_sdpa.json"
H200_RTOL = 0.05  # plan vs the H200 measurement (older code: per-segment SDPA kernels)


@pytest.fixture(scope="module")
def nine_b_measured() -> dict[str, memory_plan.Measured]:
    """The activation measurements of the 9B config, once (six meta forward + backward traces)."""
    cfg = TrainConfig.load(CONFIG)
    return memory_plan.measure_modes(cfg.model, cfg.packing.max_tokens)


@pytest.mark.parametrize("gpu", sorted(memory_plan.GPUS))
def test_plan_of_the_9b_on_each_card(nine_b_measured, gpu):
    cfg = TrainConfig.load(CONFIG)
    result = memory_plan.plan(cfg.model, 4096, 8, gpu, load_ds_config(cfg.deepspeed), nine_b_measured)
    assert 15.2 < result["weights_gib"] < 15.5  # 8.24 B parameters in bf16
    assert 0 < result["lora_grads_optimizer_gib"] < 1.0
    modes = result["checkpointing"]
    assert list(modes) == ["off", "every_2", "full"]
    act = [modes[m]["activations_gib"] for m in modes]
    assert act[0] > act[1] > act[2] > 0  # checkpointing more layers keeps less
    budget = result["gpu_memory_gib"] - result["reserved_gib"]
    for m in modes.values():
        assert m["fits"] == (m["peak_gib"] <= budget)
        if m["fits"]:
            assert m["largest_max_tokens"] >= 4096 - memory_plan.TOKEN_STEP, m
        else:
            assert m["largest_max_tokens"] < 4096, m
    assert modes["full"]["largest_max_tokens"] > modes["off"]["largest_max_tokens"]
    if gpu == "h200":
        assert all(m["fits"] for m in modes.values())
    json.dumps(result)  # JSON-ready


def test_plan_matches_the_h200_measurement(nine_b_measured):
    """bench/results/h200_9b_bf16_sdpa.json: `bench packing` (no optimizer: weights + LoRA grads +
    activations), 9B bf16, packed 4096-token rows, full checkpointing: 17.63 GiB peak."""
    measured = json.loads(H200.read_text())["variants"]["packed"]["peak_memory_gib"]
    weights, _ = memory_plan.static_bytes(ModelConfig(preset="9b"), 1, {})
    predicted = (weights + nine_b_measured["full"].at(4096)) / memory_plan.GIB
    assert abs(predicted - measured) <= H200_RTOL * measured, (predicted, measured)


def _allocator_peak(fn) -> int:
    """Peak bytes the CPU allocator held above its start while `fn` ran (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_peak_tracker_equals_the_cpu_allocator(checkpointing):
    """The accounting of PeakMemory against the allocator itself (tiny, real CPU tensors)."""
    model = build_model(ModelConfig(preset="tiny", gradient_checkpointing=checkpointing)).model
    row = memory_plan.packed_row("tiny", 512, model.language_model.config.vocab_size, model.image_token_id)
    step = lambda: packed_loss(model, model.lm_head, row).loss_sum.backward()  # noqa: E731
    tracker = memory_plan.PeakMemory([*model.parameters(), *model.buffers(), row.input_ids, row.images])
    with tracker:
        step()
    model.zero_grad(set_to_none=True)
    allocator = _allocator_peak(step)
    assert abs(tracker.peak - allocator) <= 0.01 * allocator, (tracker.peak, allocator)


def test_bad_gpu_name_is_one_line():
    with pytest.raises(ValueError, match="expected one of a100-40gb.*<N>GiB"):
        memory_plan.gpu_memory_gib("a100")
    assert memory_plan.gpu_memory_gib("24GiB") == 24.0


def test_cli_and_launch_check_show_the_plan_and_say_what_to_change(nine_b_measured, tmp_path, capsys):
    with mock.patch.object(memory_plan, "measure_modes", return_value=nine_b_measured):
        out = tmp_path / "plan.json"
        assert cli.main(["plan", "--config", str(CONFIG), "--world-size", "8", "--gpu", "a100-40gb",
                         "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["configured_checkpointing"] == "off" and set(result["checkpointing"]["off"]) >= {
            "peak_gib", "fits", "activations_gib", "largest_max_tokens"}
        capsys.readouterr()
        launch_check.main(["--config", str(CONFIG), "--num-gpus", "8", "--gpu", "a100-40gb"])
        shown = capsys.readouterr().out
        assert "launch_check: plan: 9b on a100-40gb" in shown and "(configured)" in shown
        assert "launch_check: plan: the configured run fits on a100-40gb: peak " in shown
        launch_check.main(["--config", str(CONFIG), "--num-gpus", "8", "--gpu", "24GiB"])
        shown = capsys.readouterr().out
    assert "DOES NOT FIT" in shown
    assert "launch_check: warning: the run will not fit on 24GiB at packing.max_tokens=4096: " \
           "set model.gradient_checkpointing: " in shown
