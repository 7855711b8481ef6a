"""The packed forward+backward dispatches a number of aten ops that does not grow with the number
of samples in the row (issue 10).

The per-segment sdpa path ran one SDPA (with its views and backward) per sample per layer and one
per image chunk per cross-attention layer: ~60 aten ops per sample per layer. The row plans
(mmgpt_kernels.varlen.RowsPlan, built once per forward) make it one SDPA per group of like-length
samples per attention layer: one here, where the samples are short.
Counted as `mmgpt bench ops` counts (every `aten::` profiler event, nested ones included).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmgpt.benchmarks.ops import SDPA_OP
from mmgpt.contracts import TokenizedSample
from mmgpt.data.packing import collate
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.train.loss import packed_loss

SIZE = preset_image_size("tiny")


@pytest.fixture(scope="module")
def model():
    model = build_model(ModelConfig(preset="tiny", attn_backend="sdpa")).model
    model.train()
    return model


def _sample(index: int, length: int, images: int, image_id: int) -> TokenizedSample:
    gen = torch.Generator().manual_seed(index)
    ids = [1] + torch.randint(3, 1000, (length - 2,), generator=gen).tolist() + [2]
    for at in range(images):
        ids[1 + 4 * at] = image_id
    labels = [-100] * (length // 2) + ids[length // 2:]
    pixels = [torch.randn(3, SIZE, SIZE, generator=gen) for _ in range(images)]
    return TokenizedSample(ids, labels, pixels, index=index)


def _ops(model, samples: list[TokenizedSample]) -> Counter[str]:
    batch = collate(samples, 512, image_token_id=model.image_token_id, image_size=(SIZE, SIZE))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        packed_loss(model, model.lm_head, batch).loss_sum.backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def _encoder_sdpa(model, images: int) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.encode_images(torch.randn(images, 3, SIZE, SIZE))
    return sum(e.name == SDPA_OP for e in prof.events())


def test_one_sdpa_per_attention_layer_whatever_the_samples(model) -> None:
    img = model.image_token_id
    # the same 3 images (the same encoder work), in 2 samples or spread over 6 with text-only ones
    few = [_sample(0, 120, 3, img), _sample(1, 60, 0, img)]
    many = [_sample(0, 30, 1, img), _sample(1, 23, 0, img), _sample(2, 41, 1, img),
            _sample(3, 12, 0, img), _sample(4, 37, 1, img), _sample(5, 30, 0, img)]
    layers = model.language_model.config.num_hidden_layers
    blocks = len(model.cross_attn_blocks())
    encoder = _encoder_sdpa(model, 3)
    counted = {"few": _ops(model, few), "many": _ops(model, many)}
    for name, ops in counted.items():
        assert ops[SDPA_OP] == layers + blocks + encoder, name
    # 4 more samples and more image chunks cost no more ops: nothing runs per sample or per
    # chunk (the per-segment path cost ~60 ops per extra sample per layer: +1000s here)
    total = {name: sum(c.values()) for name, c in counted.items()}
    assert abs(total["many"] - total["few"]) < layers + blocks, total
