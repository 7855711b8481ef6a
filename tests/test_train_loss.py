"""Global-batch loss normalisation: any micro-batch / accumulation / rank split of the same global
batch gives the gradient of (sum of token losses / global supervised count), and the gradient
hook order is the same for batches with and without images (ZeRO-2 bucket order)."""
from __future__ import annotations

import pytest
import torch

from mmgpt.data.mixture import Mixture, MixtureConfig
from mmgpt.data.packing import collate
from mmgpt.data.sample import write_sample
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from model_helpers import open_gates, randomize_lora_b
from mmgpt.train.loop import global_loss_scale, gradient_anchor
from mmgpt.train.loss import packed_loss

ROWS = 4  # rows of the global batch
SAMPLES_PER_ROW = 3


@pytest.fixture(scope="module")
def model():
    built = build_model(ModelConfig(preset="tiny", seed=1), dtype=torch.float64)
    model, tokenizer = built.model, built.tokenizer
    randomize_lora_b(model, seed=2)
    open_gates(model, 0.7)  # cross-attention (and its LoRA) matters
    return model, tokenizer


@pytest.fixture(scope="module")
def samples(model, tmp_path_factory):
    _, tokenizer = model
    data = write_sample(tmp_path_factory.mktemp("data"), records=60, max_length=256)
    mixture = Mixture(MixtureConfig.load(data), tokenizer, preset_image_size("tiny"))
    loaded = [s for s in (mixture.load(i) for i in range(len(mixture))) if s is not None]
    picked = loaded[: ROWS * SAMPLES_PER_ROW]
    for s in picked:
        s.images = [im.double() for im in s.images]
    assert any(s.is_vl for s in picked) and not all(s.is_vl for s in picked)
    return picked


def rows_of(samples):
    return [samples[i * SAMPLES_PER_ROW:(i + 1) * SAMPLES_PER_ROW] for i in range(ROWS)]


def batch_of(flamingo, rows):
    return collate([s for row in rows for s in row], row_tokens=256, num_rows=len(rows),
                   image_token_id=flamingo.image_token_id, image_size=(32, 32))


def lora_grads(flamingo) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in flamingo.named_parameters() if p.requires_grad}


def split_gradient(flamingo, rows, world: int, micro: int, accum: int) -> dict[str, torch.Tensor]:
    """What the DeepSpeed engine computes: per rank, accum backwards of loss_sum x scale, each
    divided by accum (engine.backward), then the mean over ranks (ZeRO gradient averaging)."""
    assert world * micro * accum == len(rows)
    windows = [[rows[(r * accum + a) * micro:(r * accum + a + 1) * micro] for a in range(accum)]
               for r in range(world)]
    batches = [[batch_of(flamingo, m) for m in window] for window in windows]
    global_supervised = sum(b.num_supervised for window in batches for b in window)  # the all-reduce
    scale = global_loss_scale(global_supervised, world, accum)
    trainable = [p for p in flamingo.parameters() if p.requires_grad]
    total = None
    for window in batches:
        flamingo.zero_grad()
        for b in window:
            anchor = gradient_anchor(trainable)
            out = packed_loss(flamingo, flamingo.lm_head, b)
            ((out.loss_sum * scale + 0.0 * anchor) / accum).backward()
        rank_grads = lora_grads(flamingo)
        total = rank_grads if total is None else {k: total[k] + rank_grads[k] for k in total}
    return {k: v / world for k, v in total.items()}


@pytest.fixture(scope="module")
def reference(model, samples):
    """Gradient of the global mean token loss, from one forward over the whole global batch."""
    flamingo, _ = model
    flamingo.zero_grad()
    out = packed_loss(flamingo, flamingo.lm_head, batch_of(flamingo, rows_of(samples)))
    (out.loss_sum / out.num_supervised).backward()
    return lora_grads(flamingo)


@pytest.mark.parametrize("world, micro, accum", [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)])
def test_any_split_gives_the_global_mean_gradient(model, samples, reference, world, micro, accum):
    flamingo, _ = model
    grads = split_gradient(flamingo, rows_of(samples), world, micro, accum)
    assert set(grads) == set(reference)
    for name, g in grads.items():
        ref = reference[name]
        assert torch.allclose(g, ref, rtol=1e-10, atol=1e-13 * ref.abs().max().item()), name
    assert max(g.abs().max().item() for g in grads.values()) > 0


def test_per_micro_batch_mean_would_differ(model, samples, reference):
    """The naive per-micro-batch mean (what HF-style loops do) is NOT the global mean: the test
    above can tell the two apart on this data."""
    flamingo, _ = model
    flamingo.zero_grad()
    for row in rows_of(samples):
        out = packed_loss(flamingo, flamingo.lm_head, batch_of(flamingo, [row]))
        (out.loss_sum / out.num_supervised / ROWS).backward()
    naive = lora_grads(flamingo)
    worst = max(((naive[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)
    assert worst > 1e-3


def test_scale_formula():
    assert global_loss_scale(1000, world=8, accum=16) == 8 * 16 / 1000
    assert global_loss_scale(0, world=2, accum=2) == 0.0


def test_gradient_hook_order_is_data_independent(model, samples):
    """ZeRO-2 fills its reduce buckets in hook order; with the anchor, a batch without images
    (cross-attention LoRA unused) fires the hooks in the same order as one with images."""
    flamingo, _ = model
    names = {p: n for n, p in flamingo.named_parameters()}
    trainable = [p for p in flamingo.parameters() if p.requires_grad]
    order: list[str] = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: order.append(names[p])) for p in trainable]
    with_images = [s for s in samples if s.is_vl][:2]
    text_only = [s for s in samples if not s.is_vl][:2]
    orders = {}
    try:
        for anchored in (False, True):
            for label, group in (("vl", with_images), ("text", text_only)):
                order.clear()
                flamingo.zero_grad()
                anchor = gradient_anchor(trainable)
                loss = packed_loss(flamingo, flamingo.lm_head, batch_of(flamingo, [group])).loss_sum
                (loss + 0.0 * anchor if anchored else loss).backward()
                orders[anchored, label] = list(order)
    finally:
        for h in handles:
            h.remove()
    assert orders[False, "vl"] != orders[False, "text"]  # the hazard is real without the anchor
    assert orders[True, "vl"] == orders[True, "text"]
    assert sorted(orders[True, "text"]) == sorted(names[p] for p in trainable)


def test_only_trainable_parameters_reach_the_optimizer(model):
    from mmgpt.train.engine import param_groups

    flamingo, _ = model
    groups = param_groups(flamingo, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in flamingo.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable) and len(ids) == len(set(ids))
    assert all(g["params"] for g in groups)  # no empty groups
    assert [g["weight_decay"] for g in groups] == [0.1]  # LoRA presets: matrices only, one decayed group
    probe = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    by_decay = {g["weight_decay"]: len(g["params"]) for g in param_groups(probe, weight_decay=0.1)}
    assert by_decay == {0.1: 1, 0.0: 3}  # weight decays; bias and norm parameters do not
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(probe.requires_grad_(False), weight_decay=0.1)
    split = param_groups(flamingo, weight_decay=0.1, cross_attn_lr=0.02)  # schedule.cross_attn_lr
    names = {id(p): n for n, p in flamingo.named_parameters()}
    assert sorted(id(p) for g in split for p in g["params"]) == sorted(ids) and len(split) == 2
    assert all(("gated_cross_attn_layer." in names[id(p)]) == ("lr" in g) for g in split for p in g["params"])
    assert [g.get("lr") for g in split] == [None, 0.02]
