"""Text generation over `Flamingo.lm_forward`: KV cache, vision features computed once, and every
new token attending its image.

OpenFlamingo v1 lost image attention during cached decoding (the new token had no media
location, so its cross-attention saw nothing). Here each step's tokens get an explicit media
layout (`mmgpt.media.row_layout`, in the model's media attention): exactly what the same
token would get in a full forward, so cached and uncached decoding agree token for token. A prompt
without images skips the cross-attention blocks, as the original chat does.

The loop is written here rather than driving `transformers` `generate()`: the media context of a
step depends on that step's tokens, which `generate()` can only be told through a model-specific
`prepare_inputs_for_generation` hook on a class we do not own. Everything else is transformers':
its logits processors and warpers (repetition penalty, suppressed tokens, temperature, top-k,
top-p), its stopping criteria (max length, EOS) and its streamers.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache, PreTrainedTokenizerBase
from transformers.generation import (EosTokenCriteria, LogitsProcessorList, MaxLengthCriteria,
                                     RepetitionPenaltyLogitsProcessor, StoppingCriteriaList,
                                     SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)
from transformers.generation.streamers import BaseStreamer

from mmgpt.media import MediaAttention, row_layout
from mmgpt.models.builder import BuiltModel
from mmgpt.models.flamingo import Flamingo, MediaContext
from mmgpt.contracts import IMAGE
from mmgpt.inference.generation_config import GenerationConfig


class LanguageModelStepper:
    """Feeds equal-length rows to `Flamingo.lm_forward` step by step and returns next-token logits.

    Every row attends the same images (`latents`, computed once by the caller), with the model's
    `media_attention`. With `use_cache` only the new tokens run (KV cache) and their media
    layout continues the row's (images before them and in the whole sequence); without it the
    whole sequence is recomputed each step (the reference the cache is tested against).
    """

    def __init__(self, model: Flamingo, latents: Tensor, image_token_id: int, use_cache: bool = True,
                 media_attention: MediaAttention = "next"):
        self.model = model
        self.latents = latents
        self.image_token_id = image_token_id
        self.use_cache = use_cache
        self.media_attention = media_attention
        self.ids = torch.zeros(0, 0, dtype=torch.long)  # [B, T] everything fed so far
        self.cache: Cache | None = None

    def _run(self, new_ids: Tensor) -> Tensor:
        rows, length = new_ids.shape
        start = self.ids.shape[1] - length
        positions = torch.arange(start, start + length, device=new_ids.device).expand(rows, length)
        is_image = self.ids == self.image_token_id
        layout = row_layout(new_ids, self.image_token_id, self.media_attention,
                            images_before=is_image[:, :start].sum(dim=1), images_total=is_image.sum(dim=1),
                            image_offsets=torch.zeros(rows, dtype=torch.long))
        media = None if layout is None else MediaContext(self.latents, layout)
        out = self.model.lm_forward(new_ids, media, position_ids=positions, cache=self.cache,
                                    use_cache=self.use_cache)
        if self.use_cache:
            self.cache = out.cache
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def start(self, ids: Tensor) -> Tensor:
        """Run the prompt [B, T]; logits [B, V] for the next token."""
        self.ids, self.cache = ids, None
        return self._run(ids)

    @torch.no_grad()
    def extend(self, tokens: Tensor) -> Tensor:
        """Append one token per row [B]; logits [B, V] for the next token."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self._run(self.ids[:, -1:] if self.use_cache else self.ids)

    def select(self, rows: Tensor) -> None:
        """Keep/duplicate rows (beam search): row i becomes old row rows[i], cache included."""
        self.ids = self.ids[rows]
        if self.cache is not None:
            self.cache.reorder_cache(rows)


def logits_processors(cfg: GenerationConfig, banned: list[int]) -> LogitsProcessorList:
    """transformers' processors, as `generate()` applies them: repetition penalty (CTRL-style, over
    prompt and generated tokens), then the banned tokens suppressed."""
    processors = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if banned:
        processors.append(SuppressTokensLogitsProcessor(banned))
    return processors


def sampling_warpers(cfg: GenerationConfig) -> LogitsProcessorList:
    """transformers' sampling warpers in `generate()`'s order: temperature, top-k, nucleus (top-p).
    Each keeps the most likely token, so top_k=1 (or a tiny top_p) reduces sampling to greedy."""
    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if 0 < cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


def _greedy_or_sample(stepper: LanguageModelStepper, ids: Tensor, cfg: GenerationConfig,
                      eos: set[int], banned: list[int], streamer: BaseStreamer | None) -> list[int]:
    generator = torch.Generator(device="cpu")  # sampling draws on the CPU: same seed, same text anywhere
    if cfg.seed is not None:
        generator.manual_seed(cfg.seed)
    else:
        generator.seed()
    processors, warpers = logits_processors(cfg, banned), sampling_warpers(cfg)
    stopping = StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + cfg.max_new_tokens),
                                     EosTokenCriteria(sorted(eos))])
    logits = stepper.start(ids)
    out: list[int] = []
    while True:
        scores = processors(stepper.ids, logits)
        if cfg.do_sample:
            probs = warpers(stepper.ids, scores).softmax(dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator)[:, 0].to(ids.device)
        else:
            token = scores.argmax(dim=-1)
        if int(token[0]) not in eos:  # the answer excludes EOS
            out.append(int(token[0]))
            if streamer is not None:
                streamer.put(token.cpu())
        if bool(stopping(torch.cat([stepper.ids, token[:, None]], dim=1), scores).all()):
            break
        logits = stepper.extend(token)
    return out


def _beam_search(stepper: LanguageModelStepper, ids: Tensor, cfg: GenerationConfig,
                 eos: set[int], banned: list[int]) -> list[int]:
    """Standard beam search: `num_beams` live beams; a beam ending in EOS among the top
    `num_beams` candidates becomes a finished hypothesis scored sum(log p) / length**length_penalty.
    Stops when `num_beams` hypotheses are finished and no live beam can beat the worst of them
    at its current length (transformers' default heuristic). Written here because transformers 5
    keeps beam search inside `generate()` (no standalone beam scorer), which cannot carry the media
    state; the logits go through transformers' processors all the same."""
    beams = cfg.num_beams
    processors = logits_processors(cfg, banned)
    logits = stepper.start(ids)
    scores = torch.zeros(1, device=logits.device)  # one live beam until the first expansion
    seqs: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, cfg.max_new_tokens + 1):
        logp = processors(stepper.ids, logits).log_softmax(dim=-1)
        vocab = logp.shape[-1]
        cand = (scores[:, None] + logp).flatten()
        top = cand.topk(min(2 * beams, int(torch.isfinite(cand).sum())))
        rows, tokens, new_scores = [], [], []
        for rank, (value, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row, token = divmod(flat, vocab)
            if token in eos:
                if rank < beams:
                    finished.append((value / step ** cfg.length_penalty, seqs[row]))
                continue
            rows.append(row)
            tokens.append(token)
            new_scores.append(value)
            if len(rows) == beams:
                break
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:beams]
        if not rows:
            break
        scores = torch.tensor(new_scores, device=logits.device)
        seqs = [seqs[r] + [t] for r, t in zip(rows, tokens)]
        if len(finished) == beams and finished[-1][0] >= new_scores[0] / step ** cfg.length_penalty:
            break
        if step == cfg.max_new_tokens:
            break
        stepper.select(torch.tensor(rows, device=ids.device))
        logits = stepper.extend(torch.tensor(tokens, device=ids.device))
    live = [(s / len(q) ** cfg.length_penalty, q) for s, q in zip(scores.tolist(), seqs) if q]
    best = max(finished + live, key=lambda f: f[0], default=(0.0, []))
    return best[1]


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, set[int], list[int]]:
    """(`<image>` id, EOS ids, ids never generated: `<image>` (no image to attend) and padding)."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    banned = [image_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else [])
    return image_token_id, {tokenizer.eos_token_id}, banned


@torch.no_grad()
def generate(built: BuiltModel, input_ids: list[int] | Tensor, latents: Tensor | None, cfg: GenerationConfig,
             use_cache: bool = True, streamer: BaseStreamer | None = None) -> list[int]:
    """New token ids (EOS excluded) continuing one prompt, in the model's own media attention.

    `latents` [M, num_latents, dim_visual] are `model.encode_images(images)` for the prompt's M
    `<image>` tokens (computed once by the caller, reused every step and every round). A
    transformers streamer (e.g. `TextStreamer`) gets each token as it is generated (beam search:
    the best beam at the end, as transformers does).
    """
    model, device = built.model, built.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    image_token_id, eos, banned = special_token_ids(built.tokenizer)
    if latents is None:
        latents = model.encode_images(torch.zeros(0, 3, 1, 1, device=device))
    num_images = int((ids == image_token_id).sum())
    if num_images != latents.shape[0]:
        raise ValueError(f"prompt has {num_images} <image> tokens but {latents.shape[0]} images were given")
    stepper = LanguageModelStepper(model, latents, image_token_id, use_cache, built.media_attention)
    if cfg.num_beams > 1:
        out = _beam_search(stepper, ids, cfg, eos, banned)
        if streamer is not None and out:
            streamer.put(torch.tensor(out))
    else:
        out = _greedy_or_sample(stepper, ids, cfg, eos, banned, streamer)
    if streamer is not None:
        streamer.end()
    return out
