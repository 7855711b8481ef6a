"""Generation: cached == uncached (with an image), image attention kept in cached steps, beam search
against brute force, sampling filters against direct references, seeded sampling, EOS stop.

Tolerances: float32 logits of the cached vs the uncached path agree to atol 1e-4 (same math,
different shapes of the attention calls); token sequences must be identical.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmgpt.data.conversation import Conversation, Round, encode_prompt
from mmgpt.inference.generation import (GenerationConfig, LanguageModelStepper, generate, logits_processors,
                                        sampling_warpers, special_token_ids)
from mmgpt.media import MEDIA_ATTENTION_MODES, MediaLayout
from mmgpt.models.builder import ModelConfig, build_model, preset_image_size
from mmgpt.models.flamingo import MediaContext
from model_helpers import open_gates, randomize_lora_b

SIZE = preset_image_size("tiny")


@pytest.fixture(scope="module")
def model_tok():
    built = build_model(ModelConfig(preset="tiny", seed=0))
    open_gates(built.model, 0.9)  # visible cross-attention: the image changes every logit
    randomize_lora_b(built.model, std=0.2)
    built.model.eval()
    return built


def image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def prompt(tok, images: int = 1) -> list[int]:
    conv = Conversation(rounds=[Round("What is in the picture?", "")], images=["x"] * images)
    return encode_prompt(conv, tok)


@pytest.mark.parametrize("mode", MEDIA_ATTENTION_MODES)
def test_cached_greedy_equals_uncached_with_image(model_tok, mode):
    built = replace(model_tok, media_attention=mode)
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(0))
    cfg = GenerationConfig(max_new_tokens=24)
    cached = generate(built, prompt(tok), latents, cfg, use_cache=True)
    uncached = generate(built, prompt(tok), latents, cfg, use_cache=False)
    assert len(cached) >= 8, "too short to compare cached decoding"
    assert cached == uncached
    other = generate(built, prompt(tok), model.encode_images(image(1)), cfg)
    assert other != cached, "the image should matter (gates are open)"


@pytest.mark.parametrize("mode", ["next", "previous"])
def test_cached_step_logits_match_and_keep_image_attention(model_tok, mode):
    """Step by step the cached logits equal the full recomputation, in each mode. In "previous"
    mode a cached step whose new token has NO media (OpenFlamingo v1's cached-generation bug)
    does not, so this test would catch that regression."""
    built = replace(model_tok, media_attention=mode)
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(0))
    image_id, _, _ = special_token_ids(tok)
    ids = torch.tensor([prompt(tok, images=2)])
    latents = model.encode_images(torch.cat([image(0), image(5)]))
    cached = LanguageModelStepper(model, latents, image_id, use_cache=True, media_attention=mode)
    full = LanguageModelStepper(model, latents, image_id, use_cache=False, media_attention=mode)
    a, b = cached.start(ids), full.start(ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for _ in range(6):
        token = a.argmax(-1)
        a, b = cached.extend(token), full.extend(token)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    if mode == "next":
        return  # after the last image a token attends no image: there is nothing to lose
    # the v1 bug: the new token's media index is -1 (no image) during the cached step
    probe = LanguageModelStepper(model, latents, image_id, use_cache=True, media_attention=mode)
    probe.start(ids)
    no_media = MediaContext(latents, MediaLayout.build(torch.full((1, 1), -1)))
    lost = model.lm_forward(a.argmax(-1)[:, None], no_media, position_ids=torch.tensor([[ids.shape[1]]]),
                            cache=probe.cache, use_cache=True).logits[:, -1].float()
    kept = LanguageModelStepper(model, latents, image_id, use_cache=False, media_attention=mode).start(
        torch.cat([ids, a.argmax(-1)[:, None]], 1))
    assert (lost - kept).abs().max() > 1e-3


def test_beam_cached_equals_uncached_and_one_beam_is_greedy(model_tok):
    built = model_tok
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(2))
    beam = GenerationConfig(max_new_tokens=12, num_beams=3)
    assert generate(built, prompt(tok), latents, beam) == \
        generate(built, prompt(tok), latents, beam, use_cache=False)
    assert generate(built, prompt(tok), latents, GenerationConfig(max_new_tokens=12, num_beams=1)) == \
        generate(built, prompt(tok), latents, GenerationConfig(max_new_tokens=12))


def test_beam_search_two_steps_matches_brute_force(model_tok):
    """Two tokens, B beams: the best of (top-B first tokens) x (all second tokens)."""
    built = model_tok
    model, tok = built.model, built.tokenizer
    beams = 4
    latents = model.encode_images(image(3))
    image_id, eos, banned = special_token_ids(tok)
    ids = torch.tensor([prompt(tok)])
    cfg = GenerationConfig(max_new_tokens=2, num_beams=beams)
    stepper = LanguageModelStepper(model, latents, image_id, use_cache=False)
    lp1 = logits_processors(cfg, banned)(ids, stepper.start(ids)).log_softmax(-1)[0]
    firsts = lp1.topk(beams).indices
    assert not set(firsts.tolist()) & eos
    best, best_seq = -float("inf"), None
    for first in firsts.tolist():
        seq = torch.cat([ids, torch.tensor([[first]])], 1)
        lp2 = logits_processors(cfg, banned)(
            seq, LanguageModelStepper(model, latents, image_id, use_cache=False).start(seq)).log_softmax(-1)[0]
        lp2[list(eos)] = -float("inf")  # an EOS second token is a 1-token hypothesis, scored apart
        score, second = lp2.max(0)
        if lp1[first] + score > best:
            best, best_seq = float(lp1[first] + score), [first, int(second)]
    assert generate(built, ids[0], latents, cfg) == best_seq


def test_sampling_is_seeded_and_top_k_one_is_greedy(model_tok):
    built = model_tok
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(0))
    sample = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=7)
    first = generate(built, prompt(tok), latents, sample)
    assert first == generate(built, prompt(tok), latents, sample)
    others = {tuple(generate(built, prompt(tok), latents,
                             GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=s)))
              for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"
    greedy = generate(built, prompt(tok), latents, GenerationConfig(max_new_tokens=16))
    for cfg in (GenerationConfig(max_new_tokens=16, do_sample=True, top_k=1, seed=3),
                GenerationConfig(max_new_tokens=16, do_sample=True, top_p=1e-6, seed=3)):
        assert generate(built, prompt(tok), latents, cfg) == greedy


def test_filters_match_direct_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)
    kept = torch.isfinite(sampling_warpers(GenerationConfig(top_k=5, temperature=0.7))(None, logits))
    for row in range(3):
        assert set(kept[row].nonzero().flatten().tolist()) == set(logits[row].topk(5).indices.tolist())
    p = 0.6
    kept = torch.isfinite(sampling_warpers(GenerationConfig(top_p=p))(None, logits))
    for row in range(3):
        probs = logits[row].double().softmax(-1)
        order = probs.argsort(descending=True).tolist()
        nucleus, mass = [], 0.0
        for t in order:  # smallest most-likely set whose mass reaches p
            nucleus.append(t)
            mass += float(probs[t])
            if mass >= p:
                break
        assert set(kept[row].nonzero().flatten().tolist()) == set(nucleus)


def test_repetition_penalty_and_banned_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([[0, 1, 1]])
    out = logits_processors(GenerationConfig(repetition_penalty=2.0), banned=[3])(history, logits)
    assert out.tolist() == [[1.0, -2.0, 0.5, float("-inf")]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]], "input must not be modified"


def test_generation_stops_at_eos_and_never_emits_banned(model_tok):
    built = model_tok
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(0))
    image_id, eos, banned = special_token_ids(tok)
    cfg = GenerationConfig(max_new_tokens=20)
    greedy = generate(built, prompt(tok), latents, cfg)
    assert not set(greedy) & (set(banned) | eos)
    head = model.language_model.lm_head.weight
    saved = head.data.clone()
    try:
        with torch.no_grad():  # make EOS outscore the token greedy emitted at step 4
            head[tok.eos_token_id] = 3.0 * head[greedy[4]]
        stopped = generate(built, prompt(tok), latents, cfg)
    finally:
        head.data.copy_(saved)
    assert len(stopped) < len(greedy) and stopped == greedy[:len(stopped)]


def test_prompt_image_count_must_match_latents(model_tok):
    built = model_tok
    model, tok = built.model, built.tokenizer
    with pytest.raises(ValueError, match="1 <image> tokens but 2 images"):
        generate(built, prompt(tok), model.encode_images(torch.cat([image(0), image(1)])),
                 GenerationConfig(max_new_tokens=2))


def test_text_only_prompt_generates(model_tok):
    built = model_tok
    tok = built.tokenizer
    cfg = GenerationConfig(max_new_tokens=8)
    out = generate(built, prompt(tok, images=0), None, cfg)
    assert out == generate(built, prompt(tok, images=0), None, cfg, use_cache=False)
    assert len(out) > 0


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(num_beams=2, do_sample=True),
                                 dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


@pytest.mark.parametrize("extra", [dict(), dict(num_beams=2)])
def test_max_new_tokens_bounds_the_answer(model_tok, extra):
    """transformers' MaxLengthCriteria (greedy) / the beam loop stop at max_new_tokens: a short
    budget gives a prefix of the longer greedy answer (greedy) and never more tokens."""
    built = model_tok
    model, tok = built.model, built.tokenizer
    latents = model.encode_images(image(0))
    long = generate(built, prompt(tok), latents, GenerationConfig(max_new_tokens=12, **extra))
    assert len(long) > 3
    short = generate(built, prompt(tok), latents, GenerationConfig(max_new_tokens=3, **extra))
    assert len(short) == 3
    if not extra:
        assert short == long[:3]
