"""Flamingo model: gate-zero identity, media masking, packed == unpacked, chunked loss, LoRA.

Tolerances: float32 comparisons use atol 1e-5 (different reduction orders of the same math);
float64 references use 1e-10.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from mmgpt.data.batch import IGNORE_INDEX, PackedBatch
from mmgpt.models import flamingo as flamingo_mod
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.cross_attention import MaskedCrossAttention, MediaContext
from mmgpt.models.flamingo import media_index_from_ids
from mmgpt.models.lora import randomize_lora_b

IMG = 1001  # <image> in the tiny tokenizer
SIZE = preset_image_size("tiny")


def pack(samples: list[tuple[list[int], list[int], int]], images: torch.Tensor) -> PackedBatch:
    """Reference packer for tests: samples (ids, unshifted labels, number of images), images in order."""
    ids, labels, pos, media, sample_index, cu = [], [], [], [], [], [0]
    next_image = 0
    for s, (sid, slab, _) in enumerate(samples):
        ids += sid
        labels += slab[1:] + [IGNORE_INDEX]
        pos += list(range(len(sid)))
        current = -1
        for t in sid:
            if t == IMG:
                current = next_image
                next_image += 1
            media.append(current)
        sample_index += [s] * len(sid)
        cu.append(cu[-1] + len(sid))
    media_t = torch.tensor(media)
    ctx = MediaContext.from_media_index(torch.zeros(max(next_image, 1), 1, 1), media_t)
    return PackedBatch(
        input_ids=torch.tensor(ids), labels=torch.tensor(labels), position_ids=torch.tensor(pos),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(len(s[0]) for s in samples),
        images=images, media_index=media_t, cu_seqlens_q=ctx.cu_seqlens_q, chunk_media=ctx.chunk_media,
        max_seqlen_q=ctx.max_seqlen_q, sample_index=torch.tensor(sample_index),
        sources=["t"] * len(samples), is_vl=torch.tensor([n > 0 for *_, n in samples]))


def build(lora: str = "default", dtype=torch.float32, gates: float = 0.0, lora_b: bool = False, seed=0):
    model, tok = build_model(ModelConfig(preset="tiny", lora=lora, seed=seed), dtype=dtype)
    model.init_gates(gates)
    if lora_b:
        randomize_lora_b(model, std=0.05)
    return model.eval(), tok


def images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SAMPLES = [
    ([1, IMG, 11, 12, 13, IMG, 14, 15, 2], [-100, -100, -100, 12, 13, -100, -100, 15, 2], 2),
    ([1, 21, 22, 23, 24, 2], [-100, -100, 22, 23, 24, 2], 0),
    ([1, 31, IMG, 32, 33, 2], [-100, -100, -100, 32, 33, 2], 1),
]


def bare_llama(model) -> LlamaForCausalLM:
    """The same LLaMA weights without Flamingo layers, on transformers' own SDPA attention."""
    inner = model.llama
    bare = LlamaForCausalLM(inner.config.__class__(**{**inner.config.to_dict(), "_attn_implementation": "sdpa"}))
    state = {k.replace(".decoder_layer.", "."): v for k, v in inner.state_dict().items()
             if "gated_cross_attn_layer" not in k}
    bare.load_state_dict(state, strict=True)
    bare.config._attn_implementation = "sdpa"
    return bare.eval()


def test_gate_zero_logits_equal_bare_llama():
    model, _ = build(lora="none")
    ids = torch.tensor([SAMPLES[0][0]])
    media = MediaContext.from_media_index(model.encode_images(images(2)), media_index_from_ids(ids, IMG))
    with torch.no_grad():
        ours = model.lm_forward(ids, media).logits
        ref = bare_llama(model)(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        model.init_gates(0.5)  # the same check must notice cross-attention once gates open
        assert (model.lm_forward(ids, media).logits - ref).abs().max() > 1e-3


def test_media_index_from_ids():
    ids = torch.tensor([[IMG, 5, 6, IMG, 7], [8, IMG, 9, 9, 9]])
    assert media_index_from_ids(ids, IMG).tolist() == [[0, 0, 0, 1, 1], [-1, 2, 2, 2, 2]]
    # continuation across cached steps: new tokens keep the row's last image, new images follow offsets
    step = torch.tensor([[5, IMG], [6, 6]])
    got = media_index_from_ids(step, IMG, image_offsets=torch.tensor([3, 3]), previous=torch.tensor([1, 2]))
    assert got.tolist() == [[1, 3], [2, 2]]
    first = media_index_from_ids(torch.tensor([[5, 6]]), IMG, previous=torch.tensor([[-1, -1]]))
    assert first.tolist() == [[-1, -1]]


def test_media_context_chunks():
    latents = torch.zeros(3, 4, 8)
    ctx = MediaContext.from_media_index(latents, torch.tensor([-1, -1, 0, 0, 0, 2, 2]))
    assert ctx.cu_seqlens_q.tolist() == [0, 2, 5, 7]
    assert ctx.chunk_media.tolist() == [-1, 0, 2]
    assert ctx.cu_seqlens_k.tolist() == [0, 0, 4, 8]
    assert (ctx.max_seqlen_q, ctx.max_seqlen_k) == (3, 4)
    with pytest.raises(ValueError, match="refers past"):
        MediaContext.from_media_index(latents, torch.tensor([0, 3]))


def test_cross_attention_matches_dense_reference_and_zero_before_first_image():
    torch.manual_seed(0)
    xattn = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=4, heads=3).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    latents = torch.randn(3, 6, 12, dtype=torch.float64)
    media_index = torch.tensor([[-1, -1, 0, 0, 1], [-1, 2, 2, 2, 2]])
    out = xattn(x, MediaContext.from_media_index(latents, media_index)).reshape(10, 16)
    # dense per-token reference in float64
    q = xattn.to_q(xattn.norm(x.reshape(10, 16))).view(10, 3, 4)
    k, v = xattn.to_kv(latents).view(3, 6, 2, 3, 4).unbind(2)
    for t, m in enumerate(media_index.flatten().tolist()):
        if m < 0:
            assert torch.equal(out[t], torch.zeros(16, dtype=torch.float64))  # exact zero
            continue
        att = torch.softmax(torch.einsum("hd,lhd->hl", q[t], k[m]) / 2.0, dim=-1)
        ref = xattn.to_out(torch.einsum("hl,lhd->hd", att, v[m]).reshape(12))
        torch.testing.assert_close(out[t], ref, atol=1e-10, rtol=0)


def test_token_never_sees_a_later_image():
    model, _ = build(gates=0.7, lora_b=True)
    ids = torch.tensor([SAMPLES[0][0]])
    mi = media_index_from_ids(ids, IMG)
    imgs = images(2)
    perturbed = imgs.clone()
    perturbed[1] += 3.0
    with torch.no_grad():
        a = model.lm_forward(ids, MediaContext.from_media_index(model.encode_images(imgs), mi)).logits[0]
        b = model.lm_forward(ids, MediaContext.from_media_index(model.encode_images(perturbed), mi)).logits[0]
    second = SAMPLES[0][0].index(IMG, 2)
    assert torch.equal(a[:second], b[:second])  # tokens before image 2 are bit-identical
    assert (a[second:] - b[second:]).abs().amax(dim=-1).min() > 1e-4  # every later token changes


def test_packed_logits_equal_unpacked():
    model, _ = build(gates=0.7, lora_b=True)
    imgs = images(3)
    batch = pack(SAMPLES, imgs)
    with torch.no_grad():
        packed = model.batch_logits(batch)
        start, first_image = 0, 0
        for ids, _, n in SAMPLES:
            row = torch.tensor([ids])
            lat = model.encode_images(imgs[first_image:first_image + n])
            media = MediaContext.from_media_index(lat, media_index_from_ids(row, IMG))
            alone = model.lm_forward(row, media).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, atol=1e-5, rtol=0)
            start, first_image = start + len(ids), first_image + n


def test_chunked_loss_equals_full_logits_float64(monkeypatch):
    monkeypatch.setattr(flamingo_mod, "LOSS_CHUNK_TOKENS", 3)  # several chunks on 11 targets
    model, _ = build(dtype=torch.float64, gates=0.7, lora_b=True)
    model.train()
    batch = pack(SAMPLES, images(3, dtype=torch.float64))
    out = model(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss_sum, trainable)
    logits = model.batch_logits(batch)
    per_token = F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="none")
    ref = per_token.sum()
    ref_grads = torch.autograd.grad(ref, trainable)
    assert out.num_supervised == batch.num_supervised == 11
    torch.testing.assert_close(out.loss_sum.double(), ref, atol=1e-10, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
    per_sample = torch.zeros(3, dtype=torch.float64).index_add_(0, batch.sample_index, per_token.detach())
    torch.testing.assert_close(out.sample_loss_sum.double(), per_sample, atol=0, rtol=1e-6)  # float32 sums
    assert out.sample_count.tolist() == [4, 4, 3]


def test_gradient_checkpointing_same_grads():
    model, _ = build(gates=0.7, lora_b=True)
    model.train()
    batch = pack(SAMPLES, images(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(model(batch).loss_sum, trainable)
    model.set_gradient_checkpointing(True)
    got = torch.autograd.grad(model(batch).loss_sum, trainable)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    assert any(g.abs().sum() > 0 for g in got)


def test_no_supervised_tokens_gives_connected_zero_loss():
    model, _ = build()
    model.train()
    batch = pack([([1, 5, 6], [-100, -100, -100], 0)], images(0))
    out = model(batch)
    assert out.num_supervised == 0 and float(out.loss_sum.detach()) == 0.0
    out.loss_sum.backward()  # DeepSpeed needs a graph even for an empty micro-batch


def test_same_seed_same_weights_other_seed_differs():
    a, _ = build(seed=3)
    b, _ = build(seed=3)
    c, _ = build(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["perceiver.latents"], sc["perceiver.latents"])


def lora_count(d_in: int, d_out: int, r: int = 16) -> int:
    return r * (d_in + d_out)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_lora_trainable_count_by_hand(preset):
    model, _ = build(lora=preset)
    h, inter, layers, xinner, dv = 64, 172, 4, 2 * 16, 64
    self_attn = 4 * lora_count(h, h)
    mlp = 2 * lora_count(h, inter) + lora_count(inter, h) if preset == "paper" else 0
    xattn = (lora_count(h, xinner) + lora_count(dv, 2 * xinner) + lora_count(xinner, h)
             + lora_count(h, 4 * h) + lora_count(4 * h, h))
    expected = layers * (self_attn + mlp) + 2 * xattn  # cross-attention before layers 1 and 3 (n=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all("lora_" in n for n in names)
    assert not any(n.startswith(("perceiver", "vision_encoder")) or "gate" in n.split(".")[-1] for n in names)


def test_state_dict_uses_openflamingo_names():
    model, _ = build()
    keys = set(model.state_dict())
    prefix = "lang_encoder.base_model.model.model.layers."
    for k in ["perceiver.latents", "perceiver.layers.0.0.norm_media.weight", "perceiver.layers.0.0.to_kv.weight",
              "perceiver.layers.1.1.3.weight", "perceiver.norm.weight",
              prefix + "1.gated_cross_attn_layer.attn_gate", prefix + "1.gated_cross_attn_layer.ff.0.weight",
              prefix + "1.gated_cross_attn_layer.attn.to_q.lora_A.default.weight",
              prefix + "0.decoder_layer.self_attn.q_proj.lora_B.default.weight"]:
        assert k in keys, k
    assert not any(k.startswith(prefix + "0.gated_cross_attn_layer") for k in keys)


def test_vision_tokens_are_before_ln_post():
    model, _ = build()
    visual = model.vision_encoder.visual
    x = images(2)
    with torch.no_grad():
        tokens = model.vision_encoder(x)
        emb = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        manual = visual.transformer(visual.ln_pre(torch.cat([cls, emb], 1) + visual.positional_embedding))[:, 1:]
    assert tokens.shape == (2, (SIZE // 8) ** 2, 64)
    torch.testing.assert_close(tokens, manual, atol=1e-6, rtol=0)
    assert (tokens - visual.ln_post(manual)).abs().max() > 1e-2


def test_lm_forward_with_kv_cache_matches_full_forward():
    """Prefill, a multi-token continuation and single steps with a cache == one full forward."""
    model, _ = build(gates=0.7, lora_b=True)
    ids = torch.tensor([[1, IMG, 11, 12, 13, IMG, 14, 15, 2, 7]])
    latents = model.encode_images(images(2))
    full_index = media_index_from_ids(ids, IMG)
    with torch.no_grad():
        full = model.lm_forward(ids, MediaContext.from_media_index(latents, full_index)).logits
        out = model.lm_forward(ids[:, :4], MediaContext.from_media_index(latents, full_index[:, :4]), use_cache=True)
        logits, cache, previous = [out.logits], out.cache, full_index[:, :4]
        for a, b in [(4, 7), (7, 8), (8, 9), (9, 10)]:
            seen = torch.tensor([int((ids[0, :a] == IMG).sum())])
            index = media_index_from_ids(ids[:, a:b], IMG, image_offsets=seen, previous=previous)
            out = model.lm_forward(ids[:, a:b], MediaContext.from_media_index(latents, index), cache=cache,
                                   use_cache=True, position_ids=torch.arange(a, b)[None])
            logits.append(out.logits)
            cache, previous = out.cache, index
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=0)


def test_lm_forward_left_padded_batch_matches_single_rows():
    model, _ = build(gates=0.7, lora_b=True)
    rows = torch.tensor([[0, 0, 1, IMG, 11, 12], [1, IMG, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    latents = model.encode_images(images(2))
    with torch.no_grad():
        padded = model.lm_forward(rows, MediaContext.from_media_index(latents, media_index_from_ids(rows, IMG)),
                                  attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        for b, start in [(0, 2), (1, 0)]:
            row = rows[b:b + 1, start:]
            alone = model.lm_forward(row, MediaContext.from_media_index(latents[b:b + 1],
                                                                        media_index_from_ids(row, IMG))).logits
            torch.testing.assert_close(padded[b, start:], alone[0], atol=1e-5, rtol=0)


def test_packed_path_builds_no_dense_mask():
    """Packed rows (restarting position_ids, no cache, no padding) get no T x T mask; padding still does."""
    model, _ = build()
    batch = pack(SAMPLES, images(3))
    embeds = torch.zeros(1, batch.num_tokens, 64)
    config = model.llama.config
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=batch.position_ids[None]) is None
    padding = torch.ones(1, batch.num_tokens, dtype=torch.long)
    padding[0, 0] = 0
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padding, cache=None,
                              position_ids=torch.arange(batch.num_tokens)[None])
    assert mask is not None and mask.shape[-1] == batch.num_tokens
