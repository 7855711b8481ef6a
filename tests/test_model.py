"""Flamingo model: gate-zero identity, media masking, packed == unpacked, chunked loss, LoRA.

Tolerances: float32 comparisons use atol 1e-5 (different reduction orders of the same math);
float64 references use 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from mmgpt.configfile import ConfigError, from_dict
from mmgpt.contracts import IGNORE_INDEX, PackedBatch, TokenizedSample
from mmgpt.data.packing import collate
from mmgpt.media import MEDIA_ATTENTION_MODES, MediaLayout, attends_previous, media_index, row_layout
from mmgpt.train import loss as loss_mod
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.cross_attention import MaskedCrossAttention, MediaContext
from mmgpt.train.loss import packed_loss
from model_helpers import open_gates, packed_logits, randomize_lora_b

IMG = 1001  # <image> in the tiny tokenizer
SIZE = preset_image_size("tiny")


def pack(samples: list[tuple[list[int], list[int], int]], images: torch.Tensor, mode: str = "previous",
         seed: int = 0) -> PackedBatch:
    """Samples (ids, unshifted labels, number of images) with `images` in order, through the packer's collate."""
    tokenized, first = [], 0
    for index, (ids, labels, n) in enumerate(samples):
        tokenized.append(TokenizedSample(ids, labels, images=list(images[first:first + n]), index=index))
        first += n
    return collate(tokenized, image_token_id=IMG, media_attention=mode, media_seed=seed,
                   image_size=(SIZE, SIZE))


def media(latents: torch.Tensor, ids: torch.Tensor, mode: str = "previous") -> MediaContext | None:
    """Media of [B, T] rows that each hold one sequence (None: no image, blocks skipped)."""
    layout = row_layout(ids, IMG, mode)
    return None if layout is None else MediaContext(latents, layout)


def build(lora: str = "default", dtype=torch.float32, gates: float = 0.0, lora_b: bool = False, seed=0):
    built = build_model(ModelConfig(preset="tiny", lora=lora, seed=seed), dtype=dtype)
    model, tok = built.model, built.tokenizer
    open_gates(model, gates)
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
    inner = model.language_model
    bare = LlamaForCausalLM(inner.config.__class__(**{**inner.config.to_dict(), "_attn_implementation": "sdpa"}))
    state = {k.replace(".decoder_layer.", "."): v for k, v in inner.state_dict().items()
             if "gated_cross_attn_layer" not in k}
    bare.load_state_dict(state, strict=True)
    bare.config._attn_implementation = "sdpa"
    return bare.eval()


def test_gate_zero_logits_equal_bare_llama():
    model, _ = build(lora="none")
    ids = torch.tensor([SAMPLES[0][0]])
    ctx = media(model.encode_images(images(2)), ids)
    with torch.no_grad():
        ours = model.lm_forward(ids, ctx).logits
        ref = bare_llama(model)(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        open_gates(model, 0.5)  # the same check must notice cross-attention once gates open
        assert (model.lm_forward(ids, ctx).logits - ref).abs().max() > 1e-3


def test_media_index_modes_give_the_documented_image_per_token():
    ids = torch.tensor([[1, 5, IMG, 6, 7, IMG, 8, 9], [1, IMG, 3, 3, 3, 3, 3, 3]])
    # next (OpenFlamingo v1 default): <image> -> its own image; others -> the NEXT image; none after the last
    assert media_index(ids, IMG, False).tolist() == [[0, 0, 0, 1, 1, 1, -1, -1], [2, 2, -1, -1, -1, -1, -1, -1]]
    # previous: the latest image at or before the token; none before the first
    assert media_index(ids, IMG, True).tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1], [-1, 2, 2, 2, 2, 2, 2, 2]]
    # one mode per row (random mode's per-sample coins)
    assert media_index(ids, IMG, torch.tensor([True, False]))[1].tolist() == [2, 2, -1, -1, -1, -1, -1, -1]
    # continuation of cached tokens: images before them and in the whole row decide
    step = torch.tensor([[5, IMG, 6]])
    kwargs = dict(images_before=torch.tensor([1]), images_total=torch.tensor([3]), image_offsets=torch.tensor([0]))
    assert media_index(step, IMG, False, **kwargs).tolist() == [[1, 1, 2]]
    assert media_index(step, IMG, True, **kwargs).tolist() == [[0, 1, 1]]


def test_random_mode_is_a_seeded_coin_per_sample():
    coins = [attends_previous("random", 7, key) for key in range(200)]
    assert coins == [attends_previous("random", 7, key) for key in range(200)]  # reproducible
    assert 70 < sum(coins) < 130 and coins != [attends_previous("random", 8, key) for key in range(200)]
    assert attends_previous("next") is False and attends_previous("previous") is True
    with pytest.raises(ValueError, match="media_attention"):
        attends_previous("latest")


def test_media_layout_chunks_and_keys():
    layout = MediaLayout.build(torch.tensor([-1, -1, 0, 0, 0, 2, 2, 5, 5]),
                               through=torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0]))
    assert layout.token_index.tolist() == list(range(7)) and layout.num_tokens == 7
    assert layout.cu_seqlens_q.tolist() == [0, 2, 5, 7]
    assert layout.chunk_images.tolist() == [0, 2] and layout.cu_image_chunks.tolist() == [0, 0, 1, 2]
    ctx = MediaContext(torch.zeros(3, 4, 8), layout)
    assert ctx.cu_seqlens_k.tolist() == [0, 0, 4, 8]
    assert (layout.max_seqlen_q, ctx.max_seqlen_k) == (3, 4)
    assert layout.chunk_lengths == (2, 3, 2) and layout.chunk_has_image == (False, True, True)
    assert layout.num_images == 3 and ctx.seqlens_k == (0, 4, 4)  # host copies for the kernels
    with pytest.raises(ValueError, match="refers past"):
        MediaContext(torch.zeros(3, 4, 8), MediaLayout.build(torch.tensor([0, 3])))


def test_cross_attention_matches_dense_reference_and_zero_before_first_image():
    torch.manual_seed(0)
    xattn = MaskedCrossAttention(dim=16, dim_visual=12, dim_head=4, heads=3).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    latents = torch.randn(3, 6, 12, dtype=torch.float64)
    media_index = torch.tensor([[-1, -1, 0, 0, 1], [-1, 2, 2, 2, 2]])
    out = xattn(x, MediaContext(latents, MediaLayout.build(media_index))).reshape(10, 16)
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


@pytest.mark.parametrize("mode, sees", [("previous", "earlier"), ("next", "later")])
def test_which_image_changes_which_logits(mode, sees):
    """previous: a token never sees a later image; next: the tokens before image 2 (and <image> 2
    itself) see it, and the tokens after the last image see no image at all."""
    model, _ = build(gates=0.7, lora_b=True)
    ids = torch.tensor([SAMPLES[0][0]])
    imgs = images(2)
    perturbed = imgs.clone()
    perturbed[1] += 3.0
    with torch.no_grad():
        a = model.lm_forward(ids, media(model.encode_images(imgs), ids, mode)).logits[0]
        b = model.lm_forward(ids, media(model.encode_images(perturbed), ids, mode)).logits[0]
    second = SAMPLES[0][0].index(IMG, 2)
    if sees == "earlier":
        assert torch.equal(a[:second], b[:second])  # tokens before image 2 are bit-identical
        assert (a[second:] - b[second:]).abs().amax(dim=-1).min() > 1e-4  # every later token changes
    else:
        first = SAMPLES[0][0].index(IMG)
        assert torch.equal(a[:first + 1], b[:first + 1])  # up to <image> 1: they attend image 1
        assert (a[first + 1:] - b[first + 1:]).abs().amax(dim=-1).min() > 1e-4  # image 2 reaches the rest


@pytest.mark.parametrize("mode", MEDIA_ATTENTION_MODES)
def test_packed_logits_equal_unpacked(mode):
    model, _ = build(gates=0.7, lora_b=True)
    imgs = images(3)
    batch = pack(SAMPLES, imgs, mode, seed=3)
    with torch.no_grad():
        packed = packed_logits(model, batch)
        start, first_image = 0, 0
        for index, (ids, _, n) in enumerate(SAMPLES):
            row = torch.tensor([ids])
            lat = model.encode_images(imgs[first_image:first_image + n])
            alone_mode = "previous" if attends_previous(mode, 3, index) else "next"
            alone = model.lm_forward(row, media(lat, row, alone_mode)).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, atol=1e-5, rtol=0)
            start, first_image = start + len(ids), first_image + n


def test_imageless_sample_equals_plain_llama_with_lora_in_a_packed_row():
    """Language-only samples bypass every cross-attention block (attention AND feed-forward), also
    beside image samples in one packed row with open gates: they equal LLaMA + merged LoRA."""
    model, _ = build(gates=0.7, lora_b=True)
    batch = pack(SAMPLES, images(3), "next")
    with torch.no_grad():
        packed = packed_logits(model, batch)
        merged = copy.deepcopy(model)
        merged.lang_encoder = merged.lang_encoder.merge_and_unload()
        text_ids = torch.tensor([SAMPLES[1][0]])
        ref = bare_llama(merged)(text_ids).logits[0]
        start = len(SAMPLES[0][0])
        torch.testing.assert_close(packed[start:start + len(SAMPLES[1][0])], ref, atol=1e-5, rtol=0)
        # the same sample pushed through the blocks (the old behaviour) differs: the check has teeth
        through = MediaLayout.build(torch.full((1, text_ids.shape[1]), -1))
        forced = model.lm_forward(text_ids, MediaContext(model.encode_images(images(1)), through)).logits[0]
        assert (forced - ref).abs().max() > 1e-3


def test_chunked_loss_equals_full_logits_float64(monkeypatch):
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_TOKENS", 3)  # several chunks on 11 targets
    model, _ = build(dtype=torch.float64, gates=0.7, lora_b=True)
    model.train()
    batch = pack(SAMPLES, images(3, dtype=torch.float64))
    out = packed_loss(model, model.lm_head, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss_sum, trainable)
    logits = packed_logits(model, batch)
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


@pytest.mark.parametrize("mode, checkpointed", [(True, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [0, 2]),
                                                (3, [0, 3]), (False, []), (0, [])])
def test_gradient_checkpointing_modes_same_grads(mode, checkpointed):
    """off | full (true or 1) | every k-th layer: the same gradients, recomputing the named layers."""
    model, _ = build(gates=0.7, lora_b=True)
    model.train()
    batch = pack(SAMPLES, images(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(packed_loss(model, model.lm_head, batch).loss_sum, trainable)
    model.set_gradient_checkpointing(mode)
    layers = model.language_model.model.layers
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == checkpointed
    got = torch.autograd.grad(packed_loss(model, model.lm_head, batch).loss_sum, trainable)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    assert any(g.abs().sum() > 0 for g in got)


def test_gradient_checkpointing_mode_from_config():
    cfg = from_dict(ModelConfig, {"preset": "tiny", "gradient_checkpointing": 2}, "model.yaml")
    assert from_dict(ModelConfig, {"gradient_checkpointing": True}, "x").gradient_checkpointing is True
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        from_dict(ModelConfig, {"gradient_checkpointing": "2"}, "x")
    model = build_model(cfg).model
    assert [layer.gradient_checkpointing for layer in model.language_model.model.layers] == [True, False] * 2
    with pytest.raises(ValueError, match="layer interval"):
        ModelConfig(preset="tiny", gradient_checkpointing=-1)


def test_no_supervised_tokens_gives_connected_zero_loss():
    model, _ = build()
    model.train()
    batch = pack([([1, 5, 6], [-100, -100, -100], 0)], images(0))
    out = packed_loss(model, model.lm_head, batch)
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


@pytest.mark.parametrize("mode", ["next", "previous"])
def test_lm_forward_with_kv_cache_matches_full_forward(mode):
    """Prefill, a multi-token continuation and single steps with a cache == one full forward."""
    model, _ = build(gates=0.7, lora_b=True)
    ids = torch.tensor([[1, IMG, 11, 12, 13, IMG, 14, 15, 2, 7]])
    latents = model.encode_images(images(2))
    total = torch.tensor([2])
    with torch.no_grad():
        full = model.lm_forward(ids, media(latents, ids, mode)).logits
        logits, cache = [], None
        for a, b in [(0, 4), (4, 7), (7, 8), (8, 9), (9, 10)]:
            before = (ids[:, :a] == IMG).sum(dim=1)
            layout = row_layout(ids[:, a:b], IMG, mode, images_before=before, images_total=total,
                                image_offsets=torch.tensor([0]))
            out = model.lm_forward(ids[:, a:b], MediaContext(latents, layout), cache=cache,
                                   use_cache=True, position_ids=torch.arange(a, b)[None])
            logits.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=0)


def test_lm_forward_left_padded_batch_matches_single_rows():
    model, _ = build(gates=0.7, lora_b=True)
    rows = torch.tensor([[0, 0, 1, IMG, 11, 12], [1, IMG, 21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    latents = model.encode_images(images(2))
    with torch.no_grad():
        padded = model.lm_forward(rows, media(latents, rows),
                                  attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        for b, start in [(0, 2), (1, 0)]:
            row = rows[b:b + 1, start:]
            alone = model.lm_forward(row, media(latents[b:b + 1], row)).logits
            torch.testing.assert_close(padded[b, start:], alone[0], atol=1e-5, rtol=0)


def test_packed_path_builds_no_dense_mask():
    """Packed rows (restarting position_ids, no cache, no padding) get no T x T mask; padding still does."""
    model, _ = build()
    batch = pack(SAMPLES, images(3))
    embeds = torch.zeros(1, batch.num_tokens, 64)
    config = model.language_model.config
    assert create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=batch.position_ids[None]) is None
    padding = torch.ones(1, batch.num_tokens, dtype=torch.long)
    padding[0, 0] = 0
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padding, cache=None,
                              position_ids=torch.arange(batch.num_tokens)[None])
    assert mask is not None and mask.shape[-1] == batch.num_tokens


def test_attention_backends_resolve_for_both_attentions_and_switch_at_run_time():
    model, _ = build()
    assert model.attention_backends(torch.float32, "cpu") == {"self_attention": "sdpa", "cross_attention": "sdpa"}
    model.set_attn_backend("flash_attn")  # not usable on the CPU: named, not silently replaced
    with pytest.raises(ValueError, match="flash_attn"):
        model.attention_backends(torch.float32, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU here")
def test_auto_runs_fused_self_and_cross_attention_for_9b_on_cuda():
    model = build_model(ModelConfig(preset="9b"), meta=True).model
    ran = model.attention_backends(torch.bfloat16, "cuda")
    assert ran["self_attention"] in ("flash_attn", "torch_varlen") and ran["cross_attention"] == ran["self_attention"]
