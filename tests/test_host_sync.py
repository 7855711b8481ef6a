"""No host sync inside the training forward/backward (loss included): issue 10.

On CUDA every read of a device value (`.item()`, `int(t)`, `bool(t)`, `.tolist()`) blocks the
host until the GPU catches up, so the launch queue drains once per read. Everything the kernels
need on the host comes from the packer. On the CPU such reads cost nothing and `.tolist()` leaves
no profiler event, so the test watches two things: the profiler's `aten::item` /
`aten::_local_scalar_dense` events, and every Python-level tensor-to-host conversion.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from mmgpt.contracts import PackedBatch, TokenizedSample
from mmgpt.data.packing import collate
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, randomize_lora_b

IMG = 1001  # <image> in the tiny tokenizer
SIZE = preset_image_size("tiny")
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense")
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts Python-level reads of tensor values to the host (with where they happened)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            import traceback
            self.reads[f"{name} at {traceback.format_stack(limit=2)[0].strip()}"] += 1
        return func(*args, **(kwargs or {}))


def packed_batch() -> PackedBatch:
    """Two image samples around a text-only one, in one packed row."""
    gen = torch.Generator().manual_seed(0)
    image = lambda: torch.randn(3, SIZE, SIZE, generator=gen)  # noqa: E731
    samples = [
        TokenizedSample([1, IMG, 11, 12, 13, IMG, 14, 15, 2], [-100, -100, -100, 12, 13, -100, -100, 15, 2],
                        images=[image(), image()], index=0),
        TokenizedSample([1, 21, 22, 23, 24, 2], [-100, -100, 22, 23, 24, 2], index=1),
        TokenizedSample([1, 31, IMG, 32, 33, 2], [-100, -100, -100, 32, 33, 2], images=[image()], index=2),
    ]
    return collate(samples, 64, image_token_id=IMG, image_size=(SIZE, SIZE))


def profile_step(checkpointing: bool | int) -> tuple[Counter[str], Counter[str]]:
    """(profiler event counts, host reads) of one forward + backward of the packed loss."""
    model = build_model(ModelConfig(preset="tiny", gradient_checkpointing=checkpointing)).model
    open_gates(model, 0.5)
    randomize_lora_b(model)
    model.train()
    batch = packed_batch()
    packed_loss(model, model.lm_head, batch).loss_sum.backward()  # warm-up: lazy initialisation
    with profile(activities=[ProfilerActivity.CPU]) as prof, HostReads() as reads:
        packed_loss(model, model.lm_head, batch).loss_sum.backward()
    return Counter(e.name for e in prof.events()), reads.reads


@pytest.mark.parametrize("checkpointing", [False, True, 2])
def test_forward_backward_never_reads_device_values(checkpointing):
    events, reads = profile_step(checkpointing)
    assert events["aten::mm"] > 0 or events["aten::addmm"] > 0  # the profiler did record the step
    assert {name: events[name] for name in SYNC_EVENTS} == {name: 0 for name in SYNC_EVENTS}
    assert not reads, f"host reads of tensor values: {dict(reads)}"
