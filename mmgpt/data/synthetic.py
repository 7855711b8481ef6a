"""Random-id samples with the lengths of MultiModal-GPT's training data, for measuring speed and
memory (`mmgpt bench packing` / `bench ops`, the memory plan of `mmgpt plan`).

The length mix imitates that data in LLaMA tokens (template included): short COCO captions and
VQA, long LLaVA answers and dialogues, Dolly/Alpaca/Baize text with a long tail. Token ids are
random: only lengths, image counts and supervision matter for speed and memory. (`mmgpt data
sample` text goes through the bundled 1000-piece tokenizer, whose lengths are not LLaMA's, so it
would misstate LLaMA-sized rows.)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from mmgpt.contracts import IGNORE_INDEX, TokenizedSample


@dataclass(frozen=True)
class SourceLengths:
    """Length model of one source: lognormal around `median` tokens, `weight` = share of samples."""

    name: str
    is_vl: bool
    median: int
    sigma: float
    weight: float
    response_share: float  # fraction of the tokens that are supervised (the responses)


LENGTH_MIX: tuple[SourceLengths, ...] = (
    SourceLengths("coco_caption", True, 70, 0.15, 0.10, 0.2),
    SourceLengths("aokvqa", True, 105, 0.25, 0.08, 0.3),
    SourceLengths("ocr_vqa", True, 90, 0.30, 0.05, 0.2),
    SourceLengths("minigpt4", True, 150, 0.30, 0.05, 0.6),
    SourceLengths("llava_detail", True, 250, 0.25, 0.07, 0.7),
    SourceLengths("llava_complex", True, 300, 0.30, 0.07, 0.7),
    SourceLengths("llava_conversation", True, 380, 0.50, 0.08, 0.6),
    SourceLengths("dolly", False, 180, 0.80, 0.20, 0.5),
    SourceLengths("alpaca_gpt4", False, 250, 0.55, 0.20, 0.7),
    SourceLengths("baize", False, 420, 0.50, 0.10, 0.6),
)


def synthetic_samples(
    n: int,
    *,
    vocab_size: int,
    image_token_id: int,
    image: torch.Tensor,
    max_tokens: int = 4096,
    seed: int = 0,
) -> list[TokenizedSample]:
    """`n` samples drawn from LENGTH_MIX (indices 0..n-1), random ids below `vocab_size`.

    VL samples hold one `<image>` token right after BOS and share the tensor `image` (the frozen
    vision tower costs the same for any pixels), so thousands of samples cost little memory.
    Ids 0..2 (unk, BOS, EOS) and `image_token_id` never appear as ordinary text.
    """
    rng = random.Random(seed)
    weights = [s.weight for s in LENGTH_MIX]
    text_ids = [t for t in range(3, vocab_size) if t != image_token_id]
    samples: list[TokenizedSample] = []
    for index in range(n):
        source = rng.choices(LENGTH_MIX, weights)[0]
        length = round(rng.lognormvariate(math.log(source.median), source.sigma))
        length = max(8, min(length, max_tokens))
        ids = [1] + [rng.choice(text_ids) for _ in range(length - 2)] + [2]
        if source.is_vl:
            ids[1] = image_token_id
        prompt = max(2, length - round(length * source.response_share))
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        samples.append(
            TokenizedSample(
                input_ids=ids,
                labels=labels,
                images=[image] if source.is_vl else [],
                source=source.name,
                is_vl=source.is_vl,
                index=index,
            )
        )
    return samples
