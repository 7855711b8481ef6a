"""Conversation (what every reader produces) and its tokenisation into a TokenizedSample.

The whole conversation is rendered to one string (templates.render) and tokenised ONCE with
character offsets; a token is supervised iff its span lies inside a response+EOS span. Drops are
returned as a reason string (never raised) so one bad record cannot stop a long run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from mmgpt.data.batch import IGNORE_INDEX, TokenizedSample
from mmgpt.data.templates import render
from mmgpt.models.tokenizer import IMAGE

# Drop reasons returned by tokenize (counted per source in the data report).
EMPTY_RESPONSE = "empty_response"
NO_ROUNDS = "no_rounds"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
TOKEN_STRADDLES_BOUNDARY = "token_straddles_boundary"
TOO_LONG = "too_long"


@dataclass
class Round:
    """One instruction -> response exchange; `input` is the optional context (Dolly, Alpaca)."""

    instruction: str
    response: str
    input: str = ""


@dataclass
class Conversation:
    """A record in template-neutral form.

    `images` are paths relative to the source's image root (validated when loaded). `origin`
    names the file and record (e.g. "dolly.jsonl line 3") for error messages.
    """

    rounds: list[Round]
    images: list[str] = field(default_factory=list)
    source: str = ""
    origin: str = ""


def _supervision(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool] | None:
    """Per token: inside a supervised span? None when a token straddles a span boundary."""
    out: list[bool] = []
    for s, e in offsets:
        inside = any(a <= s and e <= b and s < b for a, b in spans)
        overlaps = any(s < b and e > a for a, b in spans)
        if overlaps and not inside:
            return None
        out.append(inside)
    return out


def _round_ends(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token count at the end of each round (the token that ends at the round's `</s>`)."""
    ends = []
    for _, b in spans:
        ends.append(next(i + 1 for i, (_, e) in enumerate(offsets) if e == b))
    return ends


def tokenize(
    conv: Conversation, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedSample | str:
    """Tokenise with the unified template; a str return is the drop reason.

    Over-long conversations keep the whole leading rounds that fit in `max_length` tokens (the
    images all sit before the first round, so they are always kept with it).
    """
    if not conv.rounds:
        return NO_ROUNDS
    if any(not r.response.strip() for r in conv.rounds):
        return EMPTY_RESPONSE
    text, spans = render(conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if ids.count(image_id) != len(conv.images):
        return IMAGE_COUNT_MISMATCH
    # One BOS and one EOS per round, else the text itself held a special token.
    if ids.count(tokenizer.bos_token_id) != 1 or ids.count(tokenizer.eos_token_id) != len(spans):
        return SPECIAL_TOKEN_IN_TEXT
    supervised = _supervision(offsets, spans)
    if supervised is None:
        return TOKEN_STRADDLES_BOUNDARY
    if len(ids) > max_length:
        fitting = [end for end in _round_ends(offsets, spans) if end <= max_length]
        if not fitting:
            return TOO_LONG
        ids, supervised = ids[: fitting[-1]], supervised[: fitting[-1]]
    labels = [t if sup else IGNORE_INDEX for t, sup in zip(ids, supervised)]
    return TokenizedSample(
        input_ids=ids, labels=labels, source=conv.source, is_vl=bool(conv.images)
    )
