"""Several prompts per forward: greedy generation and answer log-likelihoods over left-padded rows.

Rows are left-padded (pad id, attention mask 0) so that every row's last prompt token sits in the
last column and one new column per step serves all rows; positions come from the mask, so a row's
RoPE positions and its tokens' media are exactly those it has alone. Each row attends its own
images: `latents` hold them row after row and `image_offsets` (mmgpt.media.media_index) say where
each row's start. Greedy decoding keeps one KV cache for the batch; a row that emitted EOS is
finished: it is fed padding that its mask hides and its output is no longer extended. The result
equals `mmgpt.inference.generation.generate` row by row (same banned tokens, same media layout).

All rows of a call must have images, or none: the cross-attention blocks run for every row of
a [B, T] forward when any row has an image (`row_layout`), while a lone image-less prompt skips
them, so mixing the two would change the image-less rows' outputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmgpt.inference.generation import GenerationConfig, logits_processors, special_token_ids
from mmgpt.media import MediaAttention, row_layout
from mmgpt.models.builder import BuiltModel
from mmgpt.models.flamingo import MediaContext


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention_mask, position_ids), each [B, max length], rows right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _media(ids: Tensor, latents: Tensor, image_token_id: int, media_attention: MediaAttention,
           image_offsets: Tensor, images_before: Tensor | None = None,
           images_total: Tensor | None = None) -> MediaContext | None:
    layout = row_layout(ids, image_token_id, media_attention, images_before=images_before,
                        images_total=images_total, image_offsets=image_offsets)
    return None if layout is None else MediaContext(latents, layout)


def _image_counts(ids: Tensor, image_token_id: int, latents: Tensor,
                  image_offsets: Tensor | None) -> tuple[Tensor, Tensor]:
    """Images per row and each row's first image in `latents` (default: row after row)."""
    counts = (ids == image_token_id).sum(dim=1)
    if bool((counts > 0).any()) and not bool((counts > 0).all()):
        raise ValueError("batched rows must all have images or all have none")
    offsets = torch.cumsum(counts, 0) - counts if image_offsets is None else image_offsets.to(ids.device)
    needed = int((offsets + counts).max()) if len(counts) else 0
    if needed > latents.shape[0]:
        raise ValueError(f"rows refer to {needed} images but {latents.shape[0]} were given")
    return counts, offsets


@torch.no_grad()
def generate_batch(built: BuiltModel, prompts: list[list[int]], latents: Tensor, max_new_tokens: int,
                   stop_ids: set[int] = frozenset()) -> list[list[int]]:
    """Greedy continuations (EOS excluded) of several prompts, in the model's media attention;
    `latents` are the images of row 0, then row 1, ...; `stop_ids` end a row as EOS does (few-shot
    prompts: `<|endofchunk|>`)."""
    model, device, media_attention = built.model, built.device, built.media_attention
    image_token_id, eos, banned = special_token_ids(built.tokenizer)
    eos = eos | set(stop_ids)
    pad_id = built.tokenizer.pad_token_id
    processors = logits_processors(GenerationConfig(max_new_tokens=max_new_tokens), banned)
    ids, mask, positions = left_pad(prompts, pad_id, device)
    counts, offsets = _image_counts(ids, image_token_id, latents, None)
    out = model.lm_forward(ids, _media(ids, latents, image_token_id, media_attention, offsets),
                           attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.cache, out.logits[:, -1, :].float()
    next_position = positions[:, -1] + 1
    eos_ids = torch.tensor(sorted(eos), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        tokens = processors(ids, logits).argmax(dim=-1)
        done |= torch.isin(tokens, eos_ids)
        for b in (~done).nonzero().flatten().tolist():
            generated[b].append(int(tokens[b]))
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        tokens = torch.where(done, pad_id, tokens)[:, None]
        ids = torch.cat([ids, tokens], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        media = _media(tokens, latents, image_token_id, media_attention, offsets, images_before=counts,
                       images_total=counts)
        out = model.lm_forward(tokens, media, attention_mask=mask, position_ids=next_position[:, None],
                               cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1, :].float()
        next_position = next_position + 1
    return generated


def answer_logprobs(built: BuiltModel, rows: list[tuple[list[int], list[int]]], latents: Tensor,
                    image_offsets: list[int]) -> list[float]:
    """Sum of log p(answer tokens | prompt) per row (prompt ids, answer ids), in one forward; row r
    attends the images from `latents[image_offsets[r]]` on, so several rows can share one image
    (every choice of a question) without copying its latents."""
    return [score for score, _ in answer_scores(built, rows, latents, image_offsets)]


@torch.no_grad()
def answer_scores(built: BuiltModel, rows: list[tuple[list[int], list[int]]], latents: Tensor,
                  image_offsets: list[int]) -> list[tuple[float, bool]]:
    """`answer_logprobs` with, per row, whether every answer token is the argmax (lmms-eval's
    `is_greedy`)."""
    device = built.device
    image_token_id = special_token_ids(built.tokenizer)[0]
    ids, mask, positions = left_pad([p + a for p, a in rows], built.tokenizer.pad_token_id, device)
    offsets = torch.tensor(image_offsets, dtype=torch.long, device=device)
    _image_counts(ids, image_token_id, latents, offsets)
    logits = built.model.lm_forward(ids, _media(ids, latents, image_token_id, built.media_attention, offsets),
                                    attention_mask=mask, position_ids=positions).logits
    width = ids.shape[1]
    scores = []
    for b, (_, answer) in enumerate(rows):
        if not answer:
            raise ValueError(f"row {b}: empty answer")
        targets = ids[b, width - len(answer):]
        logp = logits[b, width - len(answer) - 1:width - 1].float().log_softmax(dim=-1)
        greedy = bool((logp.argmax(dim=-1) == targets).all())
        scores.append((float(logp.gather(1, targets[:, None]).sum()), greedy))
    return scores
