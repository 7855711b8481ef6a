"""Invariants 2 and 3: a packed row computes exactly what each sample computes alone.

Tiny model, float32, random LoRA A and B, gates != 0 (so cross-attention and its LoRA matter).
Samples mix text-only ones, one image after some text (tokens before it attend nothing), and two
images (the second switches what the following tokens attend).
"""
from __future__ import annotations

import pytest
import torch

from mmgpt.contracts import IGNORE_INDEX, TokenizedSample
from mmgpt.data.packing import collate
from mmgpt.media import MEDIA_ATTENTION_MODES, attends_previous
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, packed_logits, randomize_lora_b

REL_TOL = 1e-5
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", attn_backend="sdpa", seed=0)).model
    randomize_lora_b(model, std=0.05, seed=1)
    open_gates(model, 0.7)
    return model


def _sample(gen: torch.Generator, image_id: int, length: int, image_at: list[int], index: int,
            image_size: int) -> TokenizedSample:
    """Random text (ids 3..999) with `<image>` at the given positions; the last 60% supervised."""
    ids = [1] + torch.randint(3, 1000, (length - 2,), generator=gen).tolist() + [2]
    for p in image_at:
        ids[p] = image_id
    prompt = max(image_at, default=0) + 1 if image_at else length * 2 // 5
    labels = [X] * prompt + ids[prompt:]
    images = [torch.randn(3, image_size, image_size, generator=gen) for _ in image_at]
    return TokenizedSample(ids, labels, images, source=f"s{index}", is_vl=bool(image_at), index=index)


@pytest.fixture(scope="module")
def samples(model) -> list[TokenizedSample]:
    gen = torch.Generator().manual_seed(2)
    size = preset_image_size("tiny")
    image_id = model.image_token_id
    specs = [(37, [1, 20]), (23, []), (30, [9]), (12, [1]), (41, []), (28, [5, 6])]
    return [_sample(gen, image_id, n, at, i, size) for i, (n, at) in enumerate(specs)]


def _collate(model, samples: list[TokenizedSample], mode: str = "previous"):
    return collate(samples, image_token_id=model.image_token_id, media_attention=mode,
                   image_size=(preset_image_size("tiny"),) * 2)


def _lora_grads(model, batches) -> dict[str, torch.Tensor]:
    """LoRA gradients of the summed loss over `batches` (accumulated over the batches)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        packed_loss(model, model.lm_head, batch).loss_sum.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_packed_losses_and_lora_grads_equal_unpacked(model, samples) -> None:
    packed = _collate(model, samples)
    with torch.no_grad():
        out = packed_loss(model, model.lm_head, packed)
        alone = [packed_loss(model, model.lm_head, _collate(model, [s])) for s in samples]
    for s, single in enumerate(alone):
        assert int(out.sample_count[s]) == single.num_supervised > 0
        assert abs(float(out.sample_loss_sum[s]) - float(single.loss_sum)) <= REL_TOL * float(single.loss_sum)

    grads_packed = _lora_grads(model, [packed])
    grads_alone = _lora_grads(model, [_collate(model, [s]) for s in samples])
    assert grads_packed and all("lora_" in name for name in grads_packed)
    assert any("gated_cross_attn_layer" in name for name in grads_packed)
    for name, g in grads_alone.items():
        assert g.norm() > 0, f"{name} got no gradient: the test would not see a mismatch"
        assert _rel(grads_packed[name], g) < REL_TOL, name


def test_equivalence_test_detects_a_missing_boundary(model, samples) -> None:
    """Control: the same row without sample boundaries (one causal sequence) must differ."""
    packed = _collate(model, samples)
    leaky = _collate(model, samples)
    leaky.cu_seqlens = torch.tensor([0, leaky.num_tokens], dtype=torch.int32)
    leaky.max_seqlen = leaky.num_tokens
    leaky.seqlens = (leaky.num_tokens,)
    leaky.position_ids = torch.arange(leaky.num_tokens)
    with torch.no_grad():
        good, bad = packed_logits(model, packed), packed_logits(model, leaky)
    first = int(packed.cu_seqlens[1])
    torch.testing.assert_close(bad[:first], good[:first], rtol=0, atol=1e-6)  # sees nothing before
    assert (bad[first:] - good[first:]).abs().max() > 1e-3


def _sample_logits(model, samples: list[TokenizedSample], mode: str = "previous") -> list[torch.Tensor]:
    batch = _collate(model, samples, mode)
    with torch.no_grad():
        logits = packed_logits(model, batch)
    cu = batch.cu_seqlens.tolist()
    return [logits[a:b] for a, b in zip(cu, cu[1:])]


def _replace(sample: TokenizedSample, **changes) -> TokenizedSample:
    fields = dict(input_ids=sample.input_ids, labels=sample.labels, images=sample.images,
                  source=sample.source, is_vl=sample.is_vl, index=sample.index)
    return TokenizedSample(**{**fields, **changes})


@pytest.mark.parametrize("victim", [0, 2, 5])
def test_changing_one_samples_tokens_changes_no_other_sample(model, samples, victim: int) -> None:
    before = _sample_logits(model, samples)
    ids = list(samples[victim].input_ids)
    for p in range(len(ids) - 3, len(ids) - 1):  # text tokens near the end, never <image>
        ids[p] = 3 + (ids[p] + 100) % 997
    changed = samples[:victim] + [_replace(samples[victim], input_ids=ids)] + samples[victim + 1:]
    after = _sample_logits(model, changed)
    for s in range(len(samples)):
        if s == victim:
            assert (after[s][-2:] - before[s][-2:]).abs().max() > 1e-4  # the change is visible
        else:
            torch.testing.assert_close(after[s], before[s], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MEDIA_ATTENTION_MODES)
@pytest.mark.parametrize("victim", [0, 2, 5])
def test_changing_one_samples_image_changes_no_other_sample(model, samples, victim: int, mode: str) -> None:
    before = _sample_logits(model, samples, mode)
    gen = torch.Generator().manual_seed(99)
    images = [torch.randn(im.shape, generator=gen) for im in samples[victim].images]
    changed = samples[:victim] + [_replace(samples[victim], images=images)] + samples[victim + 1:]
    after = _sample_logits(model, changed, mode)
    first_image = samples[victim].input_ids.index(model.image_token_id)
    # in "previous" mode the tokens before the first image see no image ("next": they see it)
    unseen = first_image if attends_previous(mode, 0, samples[victim].index) else 0
    for s in range(len(samples)):
        if s == victim:
            torch.testing.assert_close(after[s][:unseen], before[s][:unseen], rtol=0, atol=1e-6)
            assert (after[s][unseen:] - before[s][unseen:]).abs().max() > 1e-4
        else:
            torch.testing.assert_close(after[s], before[s], rtol=0, atol=1e-6)


def test_sample_logits_do_not_depend_on_row_position(model, samples) -> None:
    forward = _sample_logits(model, samples)
    backward = _sample_logits(model, samples[::-1])[::-1]
    for a, b in zip(forward, backward):
        assert _rel(b, a) < REL_TOL


def test_padded_benchmark_baseline_computes_the_same_loss(model, samples) -> None:
    """`mmgpt bench packing`'s padded variant does the same maths: same summed loss and grads."""
    from mmgpt.benchmarks.packing import padded_loss_sum

    grads_packed = _lora_grads(model, [_collate(model, samples, "next")])  # the benchmark's mode
    model.zero_grad(set_to_none=True)
    loss = padded_loss_sum(model, samples)
    loss.backward()
    with torch.no_grad():
        packed_sum = packed_loss(model, model.lm_head, _collate(model, samples, "next")).loss_sum
    assert abs(float(loss) - float(packed_sum)) <= REL_TOL * float(packed_sum)
    for name, g in grads_packed.items():
        assert _rel(model.get_parameter(name).grad, g) < REL_TOL, name
